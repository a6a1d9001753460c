"""The Mixtral decoder: embedding -> scanned decoder layers (attention + MoE) -> RMSNorm -> LM head.

`Mixtral(config)(tokens)` returns a ModelOutput holding logits and, per layer, what the routers decided,
so losses and metrics are computed outside the layers (in the train step).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import Attention, RMSNorm, normal_param
from mixtral_jax.moe import MoEBlock
from mixtral_jax.routers import RouterOutput, require_causal
from mixtral_jax.sharding import constrain

REMAT = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class KVCache:
  """Preallocated keys/values for all layers. S slots; a sliding-window model may use S = window (rolling).

  pos/seg describe each slot (seg 0 = empty); `index` counts tokens written so far, the next slot is
  index % S. `fresh` (static) marks a cache nothing was written to yet (KVCache.init): its prefill
  attends over the new tokens alone instead of [empty slots ; new tokens].
  """
  k: jax.Array      # [L, B, S, K, Dh]
  v: jax.Array      # [L, B, S, K, Dh]
  pos: jax.Array    # [B, S] int32
  seg: jax.Array    # [B, S] int32
  index: jax.Array  # [] int32
  fresh: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def init(cls, config: ModelConfig, batch: int, size: int, dtype=None) -> "KVCache":
    shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.jnp_dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               pos=jnp.zeros((batch, size), jnp.int32), seg=jnp.zeros((batch, size), jnp.int32),
               index=jnp.zeros((), jnp.int32), fresh=True)

  @property
  def size(self) -> int:
    return self.k.shape[2]


@struct.dataclass
class ModelOutput:
  logits: jax.Array              # [B, T, V] float32
  router: RouterOutput           # leaves [L, B, T, ...]
  moe_stats: dict                # name -> [L] per-layer scalars from the dispatch strategy
  cache: Optional[KVCache] = None
  hidden: Optional[jax.Array] = None  # [B, T, D] final normed hidden states


# The parts of a forward pass around the layers, shared by Mixtral (scanned layers) and
# unstacked.UnstackedMixtral (a Python loop over layers), so both read and write caches identically.

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


def embed_tokens(embed, tokens, dtype):
  return jnp.take(embed, tokens, axis=0).astype(dtype)  # [V, D] -> [B, T, D]


def output_head(final_norm, lm_head, x, dtype):
  """Final RMSNorm and LM head: (hidden [B, T, D], float32 logits [B, T, V])."""
  hidden = final_norm(x)
  logits = jnp.einsum("btd,dv->btv", hidden, lm_head.astype(dtype),
                      preferred_element_type=jnp.float32)  # [B, T, V]
  return hidden, logits


def advance_cache(cache: KVCache, k, v, slot_update, t: int) -> KVCache:
  """The cache after t new tokens: the layers' new keys/values k, v [L, B, S, K, Dh] and the slot
  update from prepare_inputs."""
  return KVCache(k=k, v=v, pos=slot_update[0], seg=slot_update[1], index=cache.index + t)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
    self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta,
                          sliding_window=cfg.sliding_window, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.moe = MoEBlock(cfg.dim, cfg.ffn_dim, cfg.num_experts, cfg.top_k, router=cfg.router,
                        router_options=cfg.router_kwargs, dispatch=cfg.dispatch,
                        capacity_factor=cfg.capacity_factor, num_shared_experts=cfg.num_shared_experts,
                        router_jitter=cfg.router_jitter, router_logits_cap=cfg.router_logits_cap,
                        grouped_matmul=cfg.grouped_matmul, dtype=dt, param_dtype=pdt, rngs=rngs)

  def __call__(self, x, positions, segment_ids, *, cache=None, token_ids=None, train=False, key=None):
    h, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    h = x + h.astype(x.dtype)
    y, route, stats = self.moe(self.ffn_norm(h), token_ids=token_ids, train=train, key=key)
    return h + y.astype(h.dtype), route, stats, new_cache


class Mixtral(nnx.Module):
  """Mixtral-style sparse MoE decoder. Layers are created with nnx.vmap (params get a leading L axis)
  and applied with jax.lax.scan, so compile time does not grow with depth."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    pdt = config.jnp_param_dtype
    self.embed = normal_param(rngs, (config.vocab_size, config.dim), pdt, ("vocab", "embed"))
    layer_keys = jax.random.split(rngs.params(), config.num_layers)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make_layer(key):
      return DecoderLayer(config, rngs=nnx.Rngs(params=key))

    self.layers = make_layer(layer_keys)
    self.final_norm = RMSNorm(config.dim, eps=config.norm_eps, param_dtype=pdt)
    self.lm_head = normal_param(rngs, (config.dim, config.vocab_size), pdt, ("embed", "vocab"))

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache: Optional[KVCache] = None,
               train: bool = False, key=None, return_hidden: bool = False) -> ModelOutput:
    """tokens int32 [B, T]. positions [B, T] default to arange (continuing from the cache);
    segment_ids [B, T] default to 1 (0 marks padding). With a cache, the new tokens' keys/values are
    written to it and the updated cache is returned in the output."""
    cfg = self.config
    positions, segment_ids, shared = prepare_inputs(cfg, tokens, positions, segment_ids, cache)
    x = embed_tokens(self.embed[...], tokens, cfg.jnp_dtype)  # [B, T, D]
    x = constrain(x, ("batch", "seq", "act_embed"))  # a no-op outside sharding.use_mesh

    graphdef, layer_state = nnx.split(self.layers)
    keys = None if key is None else jax.random.split(key, cfg.num_layers)

    def body(h, xs):
      state, kv, layer_key = xs
      layer = nnx.merge(graphdef, state)
      h = constrain(h, ("batch", "seq", "act_embed"))
      layer_cache = None if kv is None else (kv[0], kv[1], *shared)
      h, route, stats, new_kv = layer(h, positions, segment_ids, cache=layer_cache, token_ids=tokens,
                                      train=train, key=layer_key)
      return h, (route, stats, new_kv)

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    kv = None if cache is None else (cache.k, cache.v)
    if cfg.scan_layers:
      x, (route, stats, new_kv) = jax.lax.scan(body, x, (layer_state, kv, keys))
    else:  # unrolled: handy for debugging a single layer
      outs = []
      for i in range(cfg.num_layers):
        x, out = body(x, jax.tree.map(lambda a: a[i], (layer_state, kv, keys)))
        outs.append(out)
      route, stats, new_kv = jax.tree.map(lambda *a: jnp.stack(a), *outs)

    hidden, logits = output_head(self.final_norm, self.lm_head[...], x, cfg.jnp_dtype)
    logits = constrain(logits, ("batch", "seq", "act_vocab"))
    new_cache = None if cache is None else advance_cache(cache, new_kv[0], new_kv[1], shared, tokens.shape[1])
    return ModelOutput(logits=logits, router=route, moe_stats=stats, cache=new_cache,
                       hidden=hidden if return_hidden else None)


def param_count(model_or_state: Any) -> int:
  """Number of parameters (works on abstract ShapeDtypeStructs from nnx.eval_shape too)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(state))


def active_param_count(config: ModelConfig) -> int:
  """Parameters one token touches: everything but the experts it was not routed to."""
  expert = 3 * config.dim * config.ffn_dim
  total = param_count(nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0))))
  return total - config.num_layers * (config.num_experts - config.top_k) * expert


def build(config: ModelConfig, seed: int = 0) -> Mixtral:
  return Mixtral(config, rngs=nnx.Rngs(params=seed))


def from_params(config: ModelConfig, params: Any) -> Mixtral:
  """A Mixtral holding `params` (a pure dict shaped like nnx.to_pure_dict(nnx.state(model))).

  Nothing is randomly initialised (the skeleton comes from nnx.eval_shape); a missing, extra or
  mis-shaped tensor raises ValueError naming its path. Non-parameter state (the aux_free_bias router's
  bias) starts at its initial value, zero.
  """
  model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
  other = nnx.state(model, nnx.Not(nnx.Param))
  if jax.tree.leaves(other):
    nnx.update(model, jax.tree.map(lambda spec: jnp.zeros(spec.shape, spec.dtype), other))
  state = nnx.state(model, nnx.Param)
  expected = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])
  given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  name = lambda path: ".".join(str(getattr(p, "key", p)) for p in path)  # noqa: E731
  missing = sorted(name(p) for p in set(expected) - set(given))
  extra = sorted(name(p) for p in set(given) - set(expected))
  if missing or extra:
    raise ValueError(f"parameter tree mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
  for path, spec in expected.items():
    if tuple(given[path].shape) != tuple(spec.shape):
      raise ValueError(f"tensor {name(path)} has shape {tuple(given[path].shape)}, "
                       f"the config expects {tuple(spec.shape)}")
  dtype = config.jnp_param_dtype
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
  nnx.update(model, state)
  return model


def params_of(model: Mixtral) -> dict:
  """The model's parameters as a pure dict (the inverse of from_params)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
