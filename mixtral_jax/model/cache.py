"""The KV cache of a Mixtral and the slot bookkeeping of a forward pass that writes to it."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.config import ModelConfig
from mixtral_jax.moe.routers import require_causal


@struct.dataclass
class KVCache:
  """Preallocated keys/values for all layers. S slots; a sliding-window model may use S = window (rolling).

  k/v: one [L, B, K, S, Dh] array (the stacked layout scans over it), or, `per_layer`, a tuple of L
  [B, K, S, Dh] buffers (the unstacked layout: each layer writes its slot and reads its keys in place; a
  slice of one stacked array would be copied out and back every step). Heads-major: a decode step reads
  each head's keys where they lie.
  pos/seg describe each slot (seg 0 = empty); `index` counts tokens written so far, the next slot is
  index % S. `fresh` (static) marks a cache nothing was written to yet (KVCache.init): its prefill
  attends over the new tokens alone instead of [empty slots ; new tokens].
  """
  k: Any            # [L, B, K, S, Dh] or L x [B, K, S, Dh]
  v: Any
  pos: jax.Array    # [B, S] int32
  seg: jax.Array    # [B, S] int32
  index: jax.Array  # [] int32
  fresh: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def init(cls, config: ModelConfig, batch: int, size: int, dtype=None, *, per_layer: bool = False) -> "KVCache":
    """dtype: the model's compute dtype (`model.dtype`); default the parameters' dtype. per_layer: one
    buffer per layer (what the unstacked layout reads in place; sampling picks it from the model)."""
    shape = (batch, config.num_kv_heads, size, config.head_dim)
    dtype = dtype or config.jnp_param_dtype
    if per_layer:
      k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    else:
      k, v = jnp.zeros((config.num_layers, *shape), dtype), jnp.zeros((config.num_layers, *shape), dtype)
    return cls(k=k, v=v, pos=jnp.zeros((batch, size), jnp.int32), seg=jnp.zeros((batch, size), jnp.int32),
               index=jnp.zeros((), jnp.int32), fresh=True)

  @classmethod
  def for_model(cls, model, batch: int, size: int) -> "KVCache":
    """The cache `model` reads fastest: its compute dtype, and per-layer buffers for the unstacked layout
    (one [L, ...] array for the stacked one, which scans over it)."""
    return cls.init(model.config, batch, size, model.dtype, per_layer=model.execution.layout == "unstacked")

  @property
  def size(self) -> int:
    return self.k[0].shape[2]


def prepare_inputs(cfg: ModelConfig, tokens, positions, segment_ids, cache: Optional[KVCache]):
  """int32 positions [B, T] (default: arange continuing from the cache) and segment_ids [B, T] (default
  1), and, with a cache, the slot update every layer's attention applies:
  (new pos [B, S], new seg [B, S], old pos, old seg, slots [keep], cache.fresh) -- None without a cache."""
  b, t = tokens.shape
  if cache is not None:
    require_causal(cfg.router)  # expert_choice cannot decode token by token
  start = 0 if cache is None else cache.index
  if positions is None:
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
  if cache is None:
    return positions, segment_ids, None
  keep = min(t, cache.size)  # a rolling cache smaller than the chunk keeps only the chunk's last tokens
  slots = (cache.index + t - keep + jnp.arange(keep, dtype=jnp.int32)) % cache.size  # [keep]
  new_pos = cache.pos.at[:, slots].set(positions[:, -keep:])
  new_seg = cache.seg.at[:, slots].set(segment_ids[:, -keep:])
  return positions, segment_ids, (new_pos, new_seg, cache.pos, cache.seg, slots, cache.fresh)


def advance_cache(cache: KVCache, k, v, slot_update, t: int) -> KVCache:
  """The cache after t new tokens: the layers' new keys/values k, v (as in KVCache) and the slot
  update from prepare_inputs."""
  return KVCache(k=k, v=v, pos=slot_update[0], seg=slot_update[1], index=cache.index + t)
