"""Reference attention: the full (or block-causal) score matrix, materialised. Exact; quadratic memory.

The "xla" implementation of mixtral_jax.attention: short sequences and decode against a cache (one query
row per sequence reads the cache once, in its heads-major layout), where it is the fastest on XLA:CPU.

Shapes: B batch, T query length, S key length (cache slots), H query heads, K kv heads, G = H // K, Dh.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

_NEG_INF = jnp.finfo(jnp.float32).min  # finite: a fully masked row softmaxes to uniform, never NaN


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


def decode_attention(q, k, v, k_cache, v_cache, q_pos, k_pos, q_seg, k_seg, window: Optional[int]) -> jax.Array:
  """One decode step: q, k, v [B, 1, H|K, Dh] (the new token), a heads-major cache k_cache/v_cache
  [B, K, S, Dh] *before* the new token is written, described by k_pos/k_seg [B, S] -> [B, 1, H, Dh].

  Attends over [cache ; new token], which equals attending over the cache after the write (the slot the
  token goes to holds nothing visible: empty, or in a rolling cache the key that leaves the window). The
  cache is read where it lies, [G, Dh] @ [Dh, S] per (batch row, kv head), and nothing here depends on the
  write: XLA updates the slot in place afterwards instead of copying the cache to give the read its own.
  """
  b, t, h, dh = q.shape
  kv_heads = k_cache.shape[1]
  g = h // kv_heads
  qg = q.reshape(b, kv_heads, g, dh)  # [B, K, G, Dh] (t = 1)
  cached = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache, preferred_element_type=jnp.float32)  # [B, K, G, S]
  mask = attention_mask(q_pos, k_pos, q_seg, k_seg, window)  # [B, 1, S]
  cached = jnp.where(mask[:, None], cached * dh ** -0.5, _NEG_INF)  # [B, K, G, S]
  own = jnp.einsum("bkgd,bkd->bkg", qg, k.reshape(b, kv_heads, dh),
                   preferred_element_type=jnp.float32)[..., None] * dh ** -0.5  # [B, K, G, 1]: always visible
  probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=-1), axis=-1).astype(v.dtype)  # [B, K, G, S + 1]
  out = jnp.einsum("bkgs,bksd->bkgd", probs[..., :-1], v_cache) + probs[..., -1:] * v.reshape(b, kv_heads, 1, dh)
  return out.reshape(b, t, h, dh)
