"""The Mixtral decoder: embedding -> decoder layers (attention + MoE) -> RMSNorm -> LM head.

`Mixtral(config)(tokens)` returns a ModelOutput holding logits and, per layer, what the routers decided,
so losses and metrics are computed outside the layers (in the train step). How it runs (dispatch per
phase, layer layout, dtype, remat, block sizes) is its `execution` (mixtral_jax/execution.py), resolved
once when the model is built or loaded; `with_execution` converts a model to another one.

Weights have one canonical form whatever the layout: `params_of(model)` / `state_of(model)` return the
stacked tree (`layers` leaves [L, ...], experts [L, E, ...]) that checkpoints store, and
`from_params(cfg, params, execution)` builds any layout from it.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax.config import DTYPES, ConfigError, ModelConfig
from mixtral_jax.model.cache import KVCache, advance_cache, prepare_inputs
from mixtral_jax.moe.dispatch_decode import ExpertList
from mixtral_jax.execution import Execution, resolve
from mixtral_jax.model.layers import Attention, RMSNorm, normal_param
from mixtral_jax.moe.block import MoEBlock
from mixtral_jax.moe.routers import RouterOutput, routing_override_error
from mixtral_jax.parallel.sharding import constrain

REMAT = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class ModelOutput:
  logits: jax.Array              # [B, T, V] float32
  router: RouterOutput           # leaves [L, B, T, ...]
  moe_stats: dict                # name -> [L] per-layer scalars from the dispatch strategy
  cache: Optional[KVCache] = None
  hidden: Optional[jax.Array] = None  # [B, T, D] final normed hidden states


# The parts of a forward pass around the layers (prepare_inputs, advance_cache: cache.py).

def embed_tokens(embed, tokens, dtype):
  return jnp.take(embed, tokens, axis=0).astype(dtype)  # [V, D] -> [B, T, D]


def output_head(final_norm, lm_head, x, dtype):
  """Final RMSNorm and LM head: (hidden [B, T, D], float32 logits [B, T, V])."""
  hidden = final_norm(x)
  logits = jnp.einsum("btd,dv->btv", hidden, lm_head.astype(dtype),
                      preferred_element_type=jnp.float32)  # [B, T, V]
  return hidden, logits


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    pdt = cfg.jnp_param_dtype
    self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta,
                          sliding_window=cfg.sliding_window, dtype=dtype, param_dtype=pdt, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.moe = MoEBlock(cfg.dim, cfg.ffn_dim, cfg.num_experts, cfg.top_k, router=cfg.router,
                        router_options=cfg.router_kwargs, num_shared_experts=cfg.num_shared_experts,
                        router_jitter=cfg.router_jitter, router_logits_cap=cfg.router_logits_cap,
                        dtype=dtype, param_dtype=pdt, rngs=rngs)

  def __call__(self, x, positions, segment_ids, *, run: Execution, dispatch: str, cache=None, token_ids=None,
               train=False, key=None):
    h, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, attention=attention_options(run),
                             rope_identity=run.rope_identity == "on")
    h = x + h.astype(x.dtype)
    y, route, stats = self.moe(self.ffn_norm(h), dispatch=dispatch, token_ids=token_ids, train=train, key=key,
                               capacity_factor=run.capacity_factor, grouped_matmul=run.grouped_matmul,
                               loop_block=run.loop_block, top_k=run.top_k, top_p=run.top_p)
    return h + y.astype(h.dtype), route, stats, new_cache


def attention_options(run: Execution) -> dict:
  """The execution's attention choice as keyword arguments of mixtral_jax.attention.attend."""
  return dict(impl=run.attention, min_len=run.attention_min_len, block=run.causal_block,
              flash_block=run.flash_block)


def phase_of(train: bool, cache: Optional[KVCache], num_tokens: int) -> str:
  """train=True: train; one token per row against a cache: decode; anything else: prefill."""
  if train:
    return "train"
  return "decode" if cache is not None and num_tokens == 1 else "prefill"


class Mixtral(nnx.Module):
  """Mixtral-style sparse MoE decoder: the one model class, whatever its execution.

  `execution` (mixtral_jax/execution.py) is resolved once, here; its layout decides how the layers are
  held: "stacked" creates them with nnx.vmap (params get a leading L axis) and applies them with
  jax.lax.scan (compile time independent of depth); "unstacked" holds one DecoderLayer per layer whose
  expert weights are ExpertLists of per-expert buffers, applied in a Python loop (every matmul reads its
  weights where they live: the inference layout on XLA:CPU). Both layouts draw the same weights from a
  seed, run the same layer code and produce the same outputs.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, execution: Optional[Execution] = None):
    run = execution if execution is not None and execution.resolved else resolve(
        execution, purpose="inference", param_dtype=config.param_dtype)
    check_routing_override(config, run)
    self.config, self.execution = config, run
    dtype, pdt = DTYPES[run.dtype], config.jnp_param_dtype
    self.embed = normal_param(rngs, (config.vocab_size, config.dim), pdt, ("vocab", "embed"))
    layer_keys = jax.random.split(rngs.params(), config.num_layers)
    if run.layout == "stacked":
      @nnx.vmap(in_axes=0, out_axes=0)
      def make_layer(key):
        return DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(params=key))
      self.layers = make_layer(layer_keys)
    else:  # the same keys one layer at a time: the same weights as the stacked layout
      self.layers = nnx.List([split_experts(DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(params=key)))
                              for key in layer_keys])
    self.final_norm = RMSNorm(config.dim, eps=config.norm_eps, param_dtype=pdt)
    self.lm_head = normal_param(rngs, (config.dim, config.vocab_size), pdt, ("embed", "vocab"))

  @property
  def dtype(self):
    return DTYPES[self.execution.dtype]

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache: Optional[KVCache] = None,
               train: bool = False, key=None, return_hidden: bool = False) -> ModelOutput:
    """tokens int32 [B, T]. positions [B, T] default to arange (continuing from the cache);
    segment_ids [B, T] default to 1 (0 marks padding). With a cache, the new tokens' keys/values are
    written to it and the updated cache is returned in the output. The dispatch strategy is the
    execution's for the phase (`phase_of`)."""
    cfg, run = self.config, self.execution
    dispatch = run.dispatch_for(phase_of(train, cache, tokens.shape[1]))
    positions, segment_ids, shared = prepare_inputs(cfg, tokens, positions, segment_ids, cache)
    x = embed_tokens(self.embed[...], tokens, self.dtype)  # [B, T, D]
    x = constrain(x, ("batch", "seq", "act_embed"))  # a no-op outside sharding.use_mesh
    keys = None if key is None else jax.random.split(key, cfg.num_layers)
    stacked = run.layout == "stacked"
    graphdef, layer_state = nnx.split(self.layers) if stacked else (None, None)

    def body(h, xs):
      layer, kv, layer_key = xs
      layer = nnx.merge(graphdef, layer) if stacked else layer
      h = constrain(h, ("batch", "seq", "act_embed"))
      layer_cache = None if kv is None else (kv[0], kv[1], *shared)
      h, route, stats, new_kv = layer(h, positions, segment_ids, run=run, dispatch=dispatch, cache=layer_cache,
                                      token_ids=tokens, train=train, key=layer_key)
      return h, (route, stats, new_kv)

    if run.remat != "none":
      body = jax.checkpoint(body, policy=REMAT[run.remat], prevent_cse=not stacked)
    kv = None if cache is None else (cache.k, cache.v)
    per_layer = kv is not None and isinstance(kv[0], tuple)
    if stacked and kv is not None and tokens.shape[1] == 1 and not per_layer:
      x, route, stats, new_kv = _scan_decode(body, x, layer_state, kv, keys, slot=shared[4][0])
    elif stacked:
      kv = (jnp.stack(kv[0]), jnp.stack(kv[1])) if per_layer else kv
      x, (route, stats, new_kv) = jax.lax.scan(body, x, (layer_state, kv, keys))
      new_kv = (tuple(new_kv[0]), tuple(new_kv[1])) if per_layer else new_kv
    else:
      outs, new_k, new_v = [], [], []
      for i, layer in enumerate(self.layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        x, (r, st, nkv) = body(x, (layer, layer_kv, None if keys is None else keys[i]))
        if kv is not None:
          new_k.append(nkv[0])
          new_v.append(nkv[1])
        outs.append((r, st))
      route, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)
      new_kv = None
      if kv is not None and per_layer:
        new_kv = (tuple(new_k), tuple(new_v))
      elif kv is not None:  # in-place updates of the stacked cache (no [L, ...] re-stack)
        k_all, v_all = kv
        for i, (k, v) in enumerate(zip(new_k, new_v)):
          k_all, v_all = k_all.at[i].set(k), v_all.at[i].set(v)
        new_kv = (k_all, v_all)

    hidden, logits = output_head(self.final_norm, self.lm_head[...], x, self.dtype)
    logits = constrain(logits, ("batch", "seq", "act_vocab"))
    new_cache = None if cache is None else advance_cache(cache, new_kv[0], new_kv[1], shared, tokens.shape[1])
    return ModelOutput(logits=logits, router=route, moe_stats=stats, cache=new_cache,
                       hidden=hidden if return_hidden else None)


def _scan_decode(body, x, layer_state, kv, keys, *, slot):
  """One decode step through the scanned layers with the [L, B, K, S, Dh] cache in the carry: each layer
  reads its keys (one dynamic slice) and only its new token's slot is written back, in place (a scan
  over the cache as xs / ys would copy every layer's slice in and a whole new [L, ...] cache out)."""
  def step(carry, xs):
    h, k_all, v_all = carry
    layer, layer_key, i = xs
    take = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731  [B, K, S, Dh]
    h, (route, stats, (k_i, v_i)) = body(h, (layer, (take(k_all), take(v_all)), layer_key))
    def write(a, new):  # the slot of layer i: [1, B, K, 1, Dh] into [L, B, K, S, Dh]
      token = jax.lax.dynamic_slice_in_dim(new, slot, 1, axis=2)[None]
      return jax.lax.dynamic_update_slice(a, token, (i, 0, 0, slot, 0))
    return (h, write(k_all, k_i), write(v_all, v_i)), (route, stats)

  n = kv[0].shape[0]
  (x, k_all, v_all), (route, stats) = jax.lax.scan(step, (x, *kv), (layer_state, keys, jnp.arange(n)))
  return x, route, stats, (k_all, v_all)


def split_experts(layer: "DecoderLayer") -> "DecoderLayer":
  """Replaces a layer's stacked [E, ...] expert weights by ExpertLists of E buffers (in place)."""
  from mixtral_jax.inference.quant import take_expert
  for name in ("w1", "w3", "w2"):
    param = getattr(layer.moe, name)
    w = param[...]
    if not isinstance(w, ExpertList):
      param.set_value(ExpertList(tuple(take_expert(w, j) for j in range(w.shape[0]))))
  return layer


def param_count(model_or_state: Any) -> int:
  """Number of parameters (works on abstract ShapeDtypeStructs from nnx.eval_shape too)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(state))


def active_param_count(config: ModelConfig) -> int:
  """Parameters one token touches: everything but the experts it was not routed to."""
  expert = 3 * config.dim * config.ffn_dim
  total = param_count(abstract_params(config))
  return total - config.num_layers * (config.num_experts - config.top_k) * expert


STACKED = Execution(layout="stacked")


def check_routing_override(config: ModelConfig, run: Optional[Execution]) -> None:
  """ConfigError (one line) if run.top_k / top_p cannot override config's router (where the model config
  meets the execution: every builder and loader, before anything is traced)."""
  problem = run and routing_override_error(config.router, run.top_k, run.top_p, config.num_experts)
  if problem:
    raise ConfigError(problem)


def abstract_model(config: ModelConfig, execution: Optional[Execution] = None) -> Mixtral:
  """The model's skeleton (ShapeDtypeStruct leaves; nothing allocated)."""
  check_routing_override(config, execution)  # outside eval_shape, which appends JAX's traceback note
  return nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0), execution=execution))


def abstract_params(config: ModelConfig) -> dict:
  """The canonical (stacked) parameter tree as ShapeDtypeStructs: what checkpoints store."""
  return nnx.to_pure_dict(nnx.state(abstract_model(config, STACKED), nnx.Param))


def _is_leaf(x) -> bool:
  from mixtral_jax.inference.quant import QTensor
  return isinstance(x, (ExpertList, QTensor))


def to_canonical(tree: dict, layout: str) -> dict:
  """A pure-dict state of either layout -> the stacked one."""
  if layout == "stacked" or "layers" not in tree:
    return tree
  join = lambda x: _stack(x.parts) if isinstance(x, ExpertList) else x  # noqa: E731
  layers = [jax.tree.map(join, tree["layers"][i], is_leaf=_is_leaf) for i in sorted(tree["layers"])]
  return {**tree, "layers": _stack(layers)}


def _from_canonical(tree: dict, layout: str, num_layers: int) -> dict:
  """The stacked pure-dict state -> the given layout's (per-layer dicts, experts as ExpertLists)."""
  if layout == "stacked" or "layers" not in tree:
    return tree
  from mixtral_jax.inference.quant import take_expert
  layers = {}
  for i in range(num_layers):
    layer = jax.tree.map(lambda a, i=i: take_expert(a, i), tree["layers"], is_leaf=_is_leaf)
    moe = dict(layer["moe"])
    for name in ("w1", "w3", "w2"):
      moe[name] = ExpertList(tuple(take_expert(moe[name], j) for j in range(moe[name].shape[0])))
    layers[i] = {**layer, "moe": moe}
  return {**tree, "layers": layers}


def _stack(items):
  return jax.tree.map(lambda *a: jnp.stack(a), *items)


def state_of(model: Mixtral, what=...) -> dict:
  """The model's state (`what`: an nnx filter; default everything) as a canonical, stacked pure dict."""
  return to_canonical(nnx.to_pure_dict(nnx.state(model, what)), model.execution.layout)


def params_of(model: Mixtral) -> dict:
  """The model's parameters as a canonical pure dict (the inverse of from_params)."""
  return state_of(model, nnx.Param)


def with_state(skeleton: Mixtral, state: dict) -> Mixtral:
  """`skeleton` (e.g. abstract_model) filled with a canonical pure-dict state (Params and any others)."""
  graphdef, target = nnx.split(skeleton)
  nnx.replace_by_pure_dict(target, _from_canonical(state, skeleton.execution.layout, skeleton.config.num_layers))
  model = nnx.merge(graphdef, target)
  for name in ("quant",):  # plain attributes carried over (quant.py)
    if hasattr(skeleton, name):
      setattr(model, name, getattr(skeleton, name))
  return model


def with_execution(model: Mixtral, execution: Optional[Execution] = None, **changes) -> Mixtral:
  """`model` running with another execution (fields left "auto" are resolved for inference): the same
  weights, converted to the new layout if it differs (one copy of the weights; drop the old model if
  memory is tight). `with_execution(model, decode_dispatch="dense")` changes one field."""
  run = execution if execution is not None else model.execution
  run = run.replace(**changes) if changes else run
  if not run.resolved:
    run = resolve(run, purpose="inference", param_dtype=model.config.param_dtype)
  if run == model.execution:
    return model
  out = with_state(abstract_model(model.config, run), state_of(model))
  if getattr(model, "quant", None):
    out.quant = model.quant
  return out


def build(config: ModelConfig, seed: int = 0, execution: Optional[Execution] = None) -> Mixtral:
  """Random weights for `config`, in the layout of `execution` (default: this backend's inference one).

  The one constructor: a seed gives the same weights in every layout and on every mesh
  (placement.init_model runs this same program with sharded outputs). One jitted program with the classic
  threefry: eager init compiles one small program per parameter shape, and the partitionable threefry
  makes each slow to compile on CPU (~12 s for a tiny model against ~3 s).
  """
  skeleton = abstract_model(config, execution)
  return with_state(skeleton, init_state(config, seed))


def init_state(config: ModelConfig, seed: int = 0, out_shardings=None) -> dict:
  """The canonical (stacked) pure-dict state `build` fills a model with."""
  def init():
    return nnx.to_pure_dict(nnx.state(Mixtral(config, rngs=nnx.Rngs(params=seed), execution=STACKED)))
  with jax.threefry_partitionable(False):
    return jax.jit(init, out_shardings=out_shardings)()


def from_params(config: ModelConfig, params: Any, execution: Optional[Execution] = None) -> Mixtral:
  """A Mixtral holding `params` (a canonical pure dict, as params_of returns), in `execution`'s layout.

  Nothing is randomly initialised; a missing, extra or mis-shaped tensor raises ValueError naming its
  path. Non-parameter state (the aux_free_bias router's bias) starts at its initial value, zero.
  """
  skeleton = abstract_model(config, STACKED)
  other = nnx.to_pure_dict(nnx.state(skeleton, nnx.Not(nnx.Param)))
  other = jax.tree.map(lambda spec: jnp.zeros(spec.shape, spec.dtype), other)
  expected = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(skeleton, nnx.Param)))[0])
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
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  return with_state(abstract_model(config, execution), merge_trees(params, other))


def subtree(tree: dict, like: dict) -> dict:
  """The entries of pure dict `tree` whose paths are in `like` (e.g. a state's Params only)."""
  if not isinstance(like, dict):
    return tree
  return {k: subtree(tree[k], v) for k, v in like.items() if k in tree}


def merge_trees(a: dict, b: dict) -> dict:
  """Deep union of two pure dicts (Params and other state of the same model)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out
