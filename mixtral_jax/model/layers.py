"""Dense building blocks: RMSNorm, rotary embeddings, masks and grouped-query attention.

Shapes: B batch, T query length, S key length (cache slots), D model width, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

# HF's initializer_range for Mixtral; also what random full-width benchmarks use.
INIT_STD = 0.02
_NEG_INF = jnp.finfo(jnp.float32).min  # finite: a fully masked row softmaxes to uniform, never NaN


def normal_param(rngs: nnx.Rngs, shape, dtype, axes) -> nnx.Param:
  """A N(0, 0.02) parameter annotated with logical axis names (read by mixtral_jax.parallel.sharding)."""
  value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, normalised in float32 (HF's MixtralRMSNorm)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, *, identity: bool = False):
  """cos/sin tables for rotate-half rotary embeddings: positions [B, T] -> 2 x [B, T, Dh] float32.

  identity (execution.BACKENDS: on for XLA:CPU): the tables leave through a matmul with the identity
  (exact at HIGHEST precision), which XLA cannot fuse into their consumers: otherwise XLA:CPU fuses cos
  and sin into every rotation and evaluates them once per head instead of once per position, ~2% of a
  prefill (optimization_barrier does not stop that on CPU, where it is removed before fusion).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, Dh]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if not identity:
    return cos, sin
  eye = jnp.eye(head_dim, dtype=jnp.float32)
  materialise = lambda t: jnp.einsum("btd,de->bte", t, eye, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
  return materialise(cos), materialise(sin)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF convention: pairs are (i, i + Dh/2). x [B, T, N, Dh], cos/sin [B, T, Dh]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half(x)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def attention_mask(q_pos, k_pos, q_seg, k_seg, sliding_window: Optional[int]) -> jax.Array:
  """Boolean [B, T, S]: causal by position, same segment, optional window.

  Segment 0 marks padding / empty cache slots; real tokens use segments >= 1, so they never see those.
  The window matches HF: key j is visible from query i when i - window < j <= i.
  """
  delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
  mask = (delta >= 0) & (q_seg[:, :, None] == k_seg[:, None, :])
  if sliding_window is not None:
    mask &= delta < sliding_window
  return mask


def _attend(q, k, v, mask) -> jax.Array:
  """q [B, K, G, T, Dh] (grouped by KV head), k/v [B, K, S, Dh], mask [B, T, S] -> [B, K, G, T, Dh].

  Heads lead: each (b, kv-head) pair is one [G*T, Dh] @ [Dh, S] matmul on contiguous rows, which XLA:CPU
  runs ~2x faster than the same einsum with heads between the sequence axes.
  """
  b, kv_heads, g, t, dh = q.shape
  scores = jnp.einsum("bkmd,bksd->bkms", q.reshape(b, kv_heads, g * t, dh), k,
                      preferred_element_type=jnp.float32) * (dh ** -0.5)  # [B, K, G*T, S]
  scores = jnp.where(mask[:, None, None], scores.reshape(b, kv_heads, g, t, -1), _NEG_INF)  # [B, K, G, T, S]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, -1)
  return jnp.einsum("bkms,bksd->bkmd", probs, v).reshape(b, kv_heads, g, t, dh)


def dot_product_attention(q, k, v, mask, *, causal_self: bool = False, block: int = 128) -> jax.Array:
  """Grouped-query attention. q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] -> [B, T, H, Dh].

  causal_self: the keys are the queries' own tokens in the same order (no cache, or a fresh one). Then a
  query never sees a later token of the sequence (HF's index-causal rule, ANDed with `mask`), and queries
  run in blocks of `block` rows (Execution.causal_block) over only the keys up to their block's end: the
  score matrices' upper blocks, all masked, are never computed (5/8 of the work at T = 4 blocks). Exact.
  """
  b, t, h, dh = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
  if causal_self:
    assert s == t, (s, t)
    index = jnp.arange(t)
    mask = mask & (index[:, None] >= index[None, :])  # [B, T, S]
  block = block if causal_self else t
  outs = []
  for start in range(0, t, block):  # one iteration unless causal_self and t > block
    end = min(start + block, t)
    keys = end if causal_self else s
    outs.append(_attend(q[:, :, :, start:end], k[:, :, :keys], v[:, :, :keys], mask[:, start:end, :keys]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, K, G, T, Dh]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings, explicit head_dim and an optional KV cache."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rope_theta: float,
               sliding_window: Optional[int], dtype, param_dtype, rngs: nnx.Rngs):
    self.wq = normal_param(rngs, (dim, num_heads, head_dim), param_dtype, ("embed", "heads", "head_dim"))
    self.wk = normal_param(rngs, (dim, num_kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
    self.wv = normal_param(rngs, (dim, num_kv_heads, head_dim), param_dtype, ("embed", "kv_heads", "head_dim"))
    self.wo = normal_param(rngs, (num_heads, head_dim, dim), param_dtype, ("heads", "head_dim", "embed"))
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.sliding_window = sliding_window
    self.dtype = dtype

  def __call__(self, x, positions, segment_ids, cache=None, *, causal_block: int = 128,
               rope_identity: bool = False):
    """x [B, T, D]; positions, segment_ids [B, T]. causal_block, rope_identity: execution tuning.

    cache: None, or (k [B, S, K, Dh], v [B, S, K, Dh], k_pos [B, S], k_seg [B, S], old_pos [B, S],
    old_seg [B, S], slots [T], fresh) where k_pos/k_seg already describe the cache *after* this step's
    write, old_pos/old_seg before it, `slots` are the slots written and `fresh` (a Python bool) says
    the cache held nothing before this call.
    Returns (y [B, T, D], (k, v) updated cache or None).
    """
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))  # [B, T, H, Dh]
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))  # [B, T, K, Dh]
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))  # [B, T, K, Dh]
    cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, identity=rope_identity)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    if cache is None:
      mask = attention_mask(positions, positions, segment_ids, segment_ids, self.sliding_window)
      out = dot_product_attention(q, k, v, mask, causal_self=True, block=causal_block)
      new_cache = None
    else:
      k_cache, v_cache, k_pos, k_seg, old_pos, old_seg, slots, fresh = cache
      if q.shape[1] == 1:
        # Decode: write first, then attend over the cache (a rolling cache of `window` slots loses only
        # the key that just left the window).
        k_cache = k_cache.at[:, slots].set(k.astype(k_cache.dtype))
        v_cache = v_cache.at[:, slots].set(v.astype(v_cache.dtype))
        mask = attention_mask(positions, k_pos, segment_ids, k_seg, self.sliding_window)
        out = dot_product_attention(q, k_cache.astype(dt), v_cache.astype(dt), mask)
      else:
        # Prefill / chunk: attend over [old cache ; new keys], then write. Correct even when a rolling
        # cache is shorter than the chunk, where writing first would overwrite keys still in the window.
        # A fresh cache holds nothing: the new keys alone are attended over.
        keys, values, key_pos, key_seg = k, v, positions, segment_ids
        if not fresh:
          keys = jnp.concatenate([k_cache.astype(dt), k], axis=1)  # [B, S + T, K, Dh]
          values = jnp.concatenate([v_cache.astype(dt), v], axis=1)
          key_pos = jnp.concatenate([old_pos, positions], axis=1)  # [B, S + T]
          key_seg = jnp.concatenate([old_seg, segment_ids], axis=1)
        mask = attention_mask(positions, key_pos, segment_ids, key_seg, self.sliding_window)
        out = dot_product_attention(q, keys, values, mask, causal_self=fresh, block=causal_block)
        keep = slots.shape[0]  # the last min(T, S) tokens are the ones a cache of S slots can hold
        k_cache = k_cache.at[:, slots].set(k[:, -keep:].astype(k_cache.dtype))
        v_cache = v_cache.at[:, slots].set(v[:, -keep:].astype(v_cache.dtype))
      new_cache = (k_cache, v_cache)
    y = jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt))  # [B, T, D]
    return y, new_cache
