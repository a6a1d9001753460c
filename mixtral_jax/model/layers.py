"""Dense building blocks: RMSNorm, rotary embeddings and the grouped-query attention layer.

The attention functions themselves (masks, reference, flash, kernels) live in mixtral_jax/attention.

Shapes: B batch, T query length, S key length (cache slots), D model width, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import mixtral_jax.attention.api as attention_api
import mixtral_jax.attention.reference as attention_reference

# HF's initializer_range for Mixtral; also what random full-width benchmarks use.
INIT_STD = 0.02


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

  def __call__(self, x, positions, segment_ids, cache=None, *, attention: Optional[dict] = None,
               rope_identity: bool = False):
    """x [B, T, D]; positions, segment_ids [B, T]. attention: keyword arguments of attention.attend
    (impl, min_len, block, flash_block: the execution's choice); rope_identity: execution tuning.

    cache: None, or (k [B, K, S, Dh], v [B, K, S, Dh] (heads-major: a decode step reads each head's keys
    where they lie), k_pos [B, S], k_seg [B, S], old_pos [B, S], old_seg [B, S], slots [T], fresh) where
    k_pos/k_seg already describe the cache *after* this step's write, old_pos/old_seg before it, `slots`
    are the slots written and `fresh` (a Python bool) says the cache held nothing before this call.
    Returns (y [B, T, D], (k, v) updated cache or None).
    """
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))  # [B, T, H, Dh]
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))  # [B, T, K, Dh]
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))  # [B, T, K, Dh]
    cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, identity=rope_identity)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attend = functools.partial(attention_api.attend, window=self.sliding_window, **(attention or {}))
    heads_major = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  [B, S, K, Dh] <-> [B, K, S, Dh]

    if cache is None:
      out = attend(q, k, v, positions, positions, segment_ids, segment_ids, causal_self=True)
      new_cache = None
    else:
      k_cache, v_cache, k_pos, k_seg, old_pos, old_seg, slots, fresh = cache
      if q.shape[1] == 1:
        # Decode: attend over [cache before the write ; the new token] (equal to the cache after it: the
        # slot written holds nothing visible), then write the slot. Nothing reads the written cache, so
        # XLA updates it in place and reads the cache once.
        out = attention_reference.decode_attention(q, k, v, k_cache.astype(dt), v_cache.astype(dt), positions,
                                                   old_pos, segment_ids, old_seg, self.sliding_window)
        slot = slots[0]
        # A data dependency (exact: adds 0) so the write is scheduled after the read. Otherwise XLA:CPU may
        # write first and copy the cache to keep the old keys for the read (2.8x slower at 32k).
        after = out[:, :, :1, :1].astype(k.dtype) * 0  # [B, 1, 1, 1]
        k, v = k + after, v + after
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, heads_major(k).astype(k_cache.dtype), slot, 2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, heads_major(v).astype(v_cache.dtype), slot, 2)
      else:
        # Prefill / chunk: attend over [old cache ; new keys], then write. Correct even when a rolling
        # cache is shorter than the chunk, where writing first would overwrite keys still in the window.
        # A fresh cache holds nothing: the new keys alone are attended over.
        keys, values, key_pos, key_seg = k, v, positions, segment_ids
        if not fresh:
          keys = jnp.concatenate([heads_major(k_cache.astype(dt)), k], axis=1)  # [B, S + T, K, Dh]
          values = jnp.concatenate([heads_major(v_cache.astype(dt)), v], axis=1)
          key_pos = jnp.concatenate([old_pos, positions], axis=1)  # [B, S + T]
          key_seg = jnp.concatenate([old_seg, segment_ids], axis=1)
        out = attend(q, keys, values, positions, key_pos, segment_ids, key_seg, causal_self=fresh)
        keep = slots.shape[0]  # the last min(T, S) tokens are the ones a cache of S slots can hold
        k_cache = k_cache.at[:, :, slots].set(heads_major(k[:, -keep:]).astype(k_cache.dtype))
        v_cache = v_cache.at[:, :, slots].set(heads_major(v[:, -keep:]).astype(v_cache.dtype))
      new_cache = (k_cache, v_cache)
    y = jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt))  # [B, T, D]
    return y, new_cache
