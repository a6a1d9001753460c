"""Routers beyond tokens-choose-top-k: expert choice, hash routing and DeepSeek-V3's bias balancing.

Registered in mixtral_jax.moe.routers.ROUTERS (that module imports this one); see its docstring for the
router interface.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.moe.routers import ROUTERS, LinearRouter, RouterOutput, expert_counts


@ROUTERS.register("expert_choice")
class ExpertChoice(LinearRouter):
  """Expert-choice routing (Zhou et al. 2022, arXiv:2202.09368): every expert picks its top-C tokens by
  softmax probability, C = ceil(capacity_factor * N / E); a token may get 0..E experts. Perfectly balanced
  by construction, so no balancing loss is needed.

  NOT CAUSAL: which experts a token gets depends on every token in the batch, later ones included. Fine
  for training and scoring whole sequences; the model refuses it with a KV cache (autoregressive decoding).

  Output uses E slots per token: slot e is expert e, with weight = its probability if expert e chose the
  token, else 0 (unused). Dispatch with `capacity` (buffers of exactly C rows when capacity_factor <=
  top_k * config.model.capacity_factor) or `dense`; `dropless` works but processes all N * E slots.

  Options: capacity_factor=None -> top_k (the paper's c: average experts per token; EC-CF2 = 2 matches
  top-2 compute).
  """

  causal = False

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               capacity_factor: Optional[float] = None):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, logits_cap=logits_cap)
    self.capacity_factor = float(top_k if capacity_factor is None else capacity_factor)

  @classmethod
  def config_error(cls, top_k, num_experts, options):
    c = options.get("capacity_factor")
    if c is not None and not float(c) > 0:
      return f"config.model.router_options.capacity_factor must be positive for 'expert_choice', got {c!r}"
    return None

  def expert_capacity(self, num_tokens: int) -> int:
    return max(1, min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    logits = self.logits(x)  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    n, e = probs.shape
    _, chosen = jax.lax.top_k(probs.T, self.expert_capacity(n))  # [E, C] token indices per expert
    picked = jnp.zeros((e, n), bool).at[jnp.arange(e)[:, None], chosen].set(True)  # [E, N]
    weights = jnp.where(picked.T, probs, 0.0)  # [N, E]
    experts = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (n, e))
    return RouterOutput(logits=logits, probs=probs, experts=experts, weights=weights)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a fixed, well-mixing bijection on uint32."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_experts(token_ids: jax.Array, num_experts: int, top_k: int, seed: int = 0) -> jax.Array:
  """Fixed token id -> k distinct experts: [N] -> [N, k] int32. Pure integer arithmetic, so the map is
  the same on every backend, run and batch; each expert's score is a hash of (seed, token, expert)."""
  ids = token_ids.astype(jnp.uint32)
  token_hash = _fmix32(ids * jnp.uint32(0x9E3779B1) ^ jnp.uint32(seed & 0xFFFFFFFF))  # [N]
  salts = _fmix32(jnp.arange(1, num_experts + 1, dtype=jnp.uint32) * jnp.uint32(0x27D4EB2F))  # [E]
  scores = _fmix32(token_hash[:, None] ^ salts[None, :])  # [N, E] uint32
  _, experts = jax.lax.top_k((scores >> 1).astype(jnp.int32), top_k)  # int32 keeps the order exact
  return experts.astype(jnp.int32)


@ROUTERS.register("hash")
class Hash(LinearRouter):
  """Hash layers (Roller et al. 2021, arXiv:2106.04426): a fixed random hash of the token id picks the
  expert; nothing is learned and there is no router parameter. With top_k > 1 each token gets k distinct
  hashed experts averaged with weight 1/k (the paper's MultiHash splits the input instead).

  `logits` are 0 on the chosen experts and -1e4 elsewhere, so `probs` is exactly 1/k on them: HF's
  balancing loss and the metrics read the fixed assignment. Needs token ids (the model passes its input).

  Options: seed=0 (which fixed map).
  """

  needs_token_ids = True

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               seed: int = 0):
    # Deliberately no super().__init__: a hash router has no gate kernel.
    self.num_experts = num_experts
    self.top_k = top_k
    self.seed = int(seed)

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    if token_ids is None:
      raise ValueError("router 'hash' routes by token id: call the MoE block with token_ids")
    experts = hash_experts(token_ids, self.num_experts, self.top_k, self.seed)  # [N, k]
    chosen = jnp.sum(jax.nn.one_hot(experts, self.num_experts, dtype=jnp.float32), axis=1)  # [N, E]
    logits = (chosen - 1.0) * 1e4
    weights = jnp.full(experts.shape, 1.0 / self.top_k, jnp.float32)
    return RouterOutput(logits=logits, probs=jax.nn.softmax(logits, axis=-1), experts=experts, weights=weights)


class RouterBias(nnx.Variable):
  """Per-expert selection bias of aux_free_bias: model state, not a parameter. nnx.grad and optimizers
  filtered on nnx.Param never see it; `update_aux_free_bias` changes it between steps."""


@ROUTERS.register("aux_free_bias")
class AuxFreeBias(LinearRouter):
  """Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437, sec. 2.1.2; Wang et al. 2024,
  arXiv:2408.15664): experts are the top-k of (scores + b) with a per-expert bias b, but the combine
  weights use the unbiased scores, normalised over the chosen k and multiplied by route_scale. After each
  training step, outside the gradient, b_e += bias_rate * sign(mean_load - load_e)
  (`update_aux_free_bias`, called by the training step).

  `probs` holds the normalised affinities s / sum(s), which DeepSeek's sequence-wise auxiliary loss uses.
  Options: score="sigmoid" (V3; "softmax" as in V2), bias_rate=1e-3 (V3's gamma for most of training),
  route_scale=1.0 (V3 uses 2.5 with 256 experts).
  """

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               score: str = "sigmoid", bias_rate: float = 1e-3, route_scale: float = 1.0):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, logits_cap=logits_cap)
    self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32), logical_axes=("expert",))
    self.score = score
    self.bias_rate = float(bias_rate)
    self.route_scale = float(route_scale)

  @classmethod
  def config_error(cls, top_k, num_experts, options):
    if options.get("score", "sigmoid") not in ("sigmoid", "softmax"):
      return f"config.model.router_options.score={options['score']!r} is not one of sigmoid, softmax"
    return None

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    logits = self.logits(x)  # [N, E]
    scores = jax.nn.sigmoid(logits) if self.score == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    bias = jax.lax.stop_gradient(self.bias[...].astype(jnp.float32))  # [E]
    _, experts = jax.lax.top_k(scores + bias, self.top_k)  # [N, k]: the bias only steers selection
    chosen = jnp.take_along_axis(scores, experts, axis=-1)  # [N, k]
    weights = self.route_scale * chosen / jnp.sum(chosen, axis=-1, keepdims=True)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return RouterOutput(logits=logits, probs=probs, experts=experts.astype(jnp.int32), weights=weights)


def aux_free_bias_update(bias: jax.Array, router: RouterOutput, *, rate: float,
                         mask: Optional[jax.Array] = None) -> jax.Array:
  """Pure DeepSeek-V3 update: bias + rate * sign(mean_load - load), from one step's routing.

  bias [L, E] with router leaves [L, B, T, ...] (as the model returns them), or bias [E] with leaves
  [B, T, ...] (one MoE block); mask [B, T], 1 = real token. Underloaded experts gain bias, overloaded
  ones lose it; the result is not differentiated (it is state, not a parameter).
  """
  if bias.ndim == 1:
    return aux_free_bias_update(bias[None], jax.tree.map(lambda a: a[None], router), rate=rate, mask=mask)[0]
  load = expert_counts(router, mask, bias.shape[-1])  # [L, E]
  mean = jnp.mean(load, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(bias + rate * jnp.sign(mean - load).astype(bias.dtype))


def update_aux_free_bias(model: nnx.Module, router: RouterOutput, mask: Optional[jax.Array] = None) -> None:
  """Applies `aux_free_bias_update` in place to every aux_free_bias router in `model`, at the rate it
  was built with. The training step calls it once per step, after the optimizer update, with the
  RouterOutput of that step's forward pass (works inside nnx.jit). No-op for other routers."""
  for path, module in nnx.iter_graph(model):
    if isinstance(module, AuxFreeBias):
      bias = module.bias[...]
      layer_router = router
      if bias.ndim == 1:  # one layer of the unstacked layout (path: layers, i, moe, router): its own routing
        index = path[path.index("layers") + 1]
        layer_router = jax.tree.map(lambda a: a[index], router)
      module.bias.value = aux_free_bias_update(bias, layer_router, rate=module.bias_rate, mask=mask)


__all__ = ["ExpertChoice", "Hash", "AuxFreeBias", "RouterBias", "hash_experts", "aux_free_bias_update",
           "update_aux_free_bias"]
