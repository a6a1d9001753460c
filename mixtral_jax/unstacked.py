"""The same Mixtral with one buffer per layer and per expert: the inference layout.

Training keeps the layers stacked ([L, ...] Params, applied with lax.scan): compile time independent of
depth. For decoding that layout costs bandwidth on XLA:CPU: each scan step slices the layer's weights
out of the stack, and a matmul cannot read a slice of a larger buffer in place, so the slice is copied
first (a read and a write before the matmul's own read). `unstack(model)` splits the stack once into
per-layer DecoderLayers whose expert weights are `ExpertList`s of per-expert buffers, and applies them
in a Python loop: every matmul reads its weights where they live. Outputs (logits, router decisions,
KVCache) have exactly Mixtral's format, so sampling.generate, the evaluator and the tests use either.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.dispatch_decode import ExpertList
from mixtral_jax.model import KVCache, ModelOutput, advance_cache, embed_tokens, output_head, prepare_inputs
from mixtral_jax.quant import QTensor, take_expert


def _split_experts(layer) -> None:
  moe = layer.moe
  for name in ("w1", "w3", "w2"):
    param = getattr(moe, name)
    w = param[...]
    param.set_value(ExpertList(tuple(take_expert(w, j) for j in range(w.shape[0]))))


class UnstackedMixtral(nnx.Module):
  """Mixtral with per-layer modules and per-expert weight buffers (build it with `unstack`)."""

  def __init__(self, config, embed, lm_head, final_norm, layers, quant: Optional[str] = None):
    self.config = config
    self.embed, self.lm_head, self.final_norm = embed, lm_head, final_norm
    for layer in layers:
      _split_experts(layer)
    self.layers = nnx.List(layers)
    self.quant = quant

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache: Optional[KVCache] = None,
               train: bool = False, key=None, return_hidden: bool = False) -> ModelOutput:
    """Same arguments and result as Mixtral.__call__."""
    cfg = self.config
    positions, segment_ids, shared = prepare_inputs(cfg, tokens, positions, segment_ids, cache)
    x = embed_tokens(self.embed[...], tokens, cfg.jnp_dtype)  # [B, T, D]
    keys = [None] * cfg.num_layers if key is None else list(jax.random.split(key, cfg.num_layers))
    k_all, v_all = (None, None) if cache is None else (cache.k, cache.v)
    routes, stats = [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i], *shared)
      x, route, stat, new_kv = layer(x, positions, segment_ids, cache=layer_cache, token_ids=tokens,
                                     train=train, key=keys[i])
      if cache is not None:  # in-place updates of the stacked cache (no [L, ...] re-stack)
        k_all, v_all = k_all.at[i].set(new_kv[0]), v_all.at[i].set(new_kv[1])
      routes.append(route)
      stats.append(stat)
    hidden, logits = output_head(self.final_norm, self.lm_head[...], x, cfg.jnp_dtype)
    stack = lambda *a: jnp.stack(a)  # noqa: E731
    new_cache = None if cache is None else advance_cache(cache, k_all, v_all, shared, tokens.shape[1])
    return ModelOutput(logits=logits, router=jax.tree.map(stack, *routes), moe_stats=jax.tree.map(stack, *stats),
                       cache=new_cache, hidden=hidden if return_hidden else None)


def unstack(model) -> UnstackedMixtral:
  """The inference layout of `model` (a Mixtral, float or quantized). Copies the weights once: drop the
  stacked model afterwards if memory is tight."""
  if isinstance(model, UnstackedMixtral):
    return model
  graphdef, state = nnx.split(model.layers)
  is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
  layers = [nnx.merge(graphdef, jax.tree.map(lambda a: take_expert(a, i), state, is_leaf=is_q))
            for i in range(model.config.num_layers)]
  return UnstackedMixtral(model.config, model.embed, model.lm_head, model.final_norm, layers,
                          getattr(model, "quant", None))


def build_unstacked(config, seed: int = 0, quant: Optional[str] = None) -> UnstackedMixtral:
  """Random weights directly in the inference layout, one layer at a time (quantized as it goes when
  `quant` is set): the peak is the result plus one float layer, never a float [L, ...] stack. Used for
  full-size benchmarks (8x7B: 93 GB in bfloat16)."""
  from mixtral_jax import quant as quant_lib
  from mixtral_jax.layers import RMSNorm, normal_param
  from mixtral_jax.model import DecoderLayer
  rngs = nnx.Rngs(params=seed)
  pdt = config.jnp_param_dtype
  embed = normal_param(rngs, (config.vocab_size, config.dim), pdt, ("vocab", "embed"))
  lm_head = normal_param(rngs, (config.dim, config.vocab_size), pdt, ("embed", "vocab"))
  final_norm = RMSNorm(config.dim, eps=config.norm_eps, param_dtype=pdt)
  layers = []
  for i in range(config.num_layers):
    layer = DecoderLayer(config, rngs=nnx.Rngs(params=seed * 1000 + i + 1))
    if quant:
      graphdef, state = nnx.split(layer)
      layer = nnx.merge(graphdef, quant_lib.quantize_state(state, quant))
    jax.block_until_ready(nnx.state(layer))
    layers.append(layer)
  return UnstackedMixtral(config, embed, lm_head, final_norm, layers, quant)
