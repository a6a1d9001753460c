"""Routers: token representations -> which experts, with what weights.

Every router is a tiny NNX module registered by name in ROUTERS; the MoE block builds the one named by
`config.model.router`. Constructors take (dim, num_experts, top_k, *, param_dtype, rngs, logits_cap,
**options) where `options` come from `config.model.router_options`; calls take
(x [N, D], *, token_ids [N] | None, train: bool, key: PRNG key | None) and return a RouterOutput.
All routing math is float32 whatever the parameter dtype. Selection rules are pure functions so that
losses, tests and other routers reuse them.

Adding a router is one decorated class (and one test in tests/test_routers.py):

    @ROUTERS.register("my_router")
    class MyRouter(LinearRouter):
      def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
        return topk_gates(self.logits(x), self.top_k, renormalize=True)

Token-dropping (expert_choice, hash) and state-carrying (aux_free_bias) routers live in
mixtral_jax/moe/routers_extra.py; `import mixtral_jax.moe` (the package) registers both.

Routers whose selection is softmax-then-top-k (`softmax_top_k = True`: mixtral_topk, topk, switch, top_p)
also have `select(logits, *, top_k, top_p)`: the inference-time override of execution.Execution
(config.run.top_k / top_p) re-selects from the trained router's logits with it, keeping the router's
renormalisation rule. `routing_override_error` refuses the override for every other router.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax.model.layers import normal_param
from mixtral_jax.registry import Registry

ROUTERS = Registry("router")


@struct.dataclass
class RouterOutput:
  """What one MoE layer decided. N = tokens (or [B, T] once the model reshapes), E experts, k slots.

  A slot whose weight is 0 is unused: dispatchers skip it and metrics do not count it (expert_choice
  leaves most of its E slots per token unused).
  """
  logits: jax.Array    # [N, E] float32 router logits that routing used (z-loss, HF's balancing loss)
  probs: jax.Array     # [N, E] float32 the router's normalised affinities (softmax for most routers)
  experts: jax.Array   # [N, k] int32 chosen expert per slot
  weights: jax.Array   # [N, k] float32 combine weight per slot (0 where a slot is unused)
  # [N] float32 or None: capacity dispatch serves higher priority first (batch-prioritised routing);
  # None = token order, first choices before second choices (GShard / Switch).
  priority: Optional[jax.Array] = None
  # [N, E] float32 or None: Shazeer et al.'s smooth P(expert e is selected) under resampled noise, the
  # differentiable load estimate of the `load_cv2` loss. Only noisy_topk provides it.
  load_probs: Optional[jax.Array] = None


def expert_counts(router: RouterOutput, mask: Optional[jax.Array] = None,
                  num_experts: Optional[int] = None) -> jax.Array:
  """[L, E] float32 number of used (weight != 0), non-padding routing slots per expert.

  router leaves [L, B, T, ...] (as the model returns them); mask [B, T], 1 = real token, 0 = padding.
  """
  num_experts = num_experts or router.probs.shape[-1]
  m = jnp.ones(router.experts.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
  used = (router.weights != 0).astype(jnp.float32) * m[None, :, :, None]  # [L, B, T, k]
  return jnp.einsum("lbtke,lbtk->le", jax.nn.one_hot(router.experts, num_experts, dtype=jnp.float32), used)


def topk_gates(logits: jax.Array, top_k: int, *, renormalize: bool) -> RouterOutput:
  """Softmax over all experts, keep the top-k; `renormalize` rescales the kept k to sum to 1."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [N, E]
  top_probs, experts = jax.lax.top_k(probs, top_k)  # [N, k]
  if renormalize:
    top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  return RouterOutput(logits=logits, probs=probs, experts=experts.astype(jnp.int32), weights=top_probs)


def top_p_gates(logits: jax.Array, threshold: float, max_k: int, *, renormalize: bool) -> RouterOutput:
  """Top-p (dynamic) routing, Huang et al. 2024 (arXiv:2403.07652): softmax over all experts,
  sorted descending; keep the smallest prefix whose cumulative probability reaches `threshold` (the
  paper's t = argmin_k sum_{j <= k} P_j >= p), at least one expert and at most `max_k` slots. Slots beyond
  the prefix get weight 0 (unused: every dispatcher skips them, metrics do not count them); `renormalize`
  rescales the kept weights to sum to 1.

  Slot j is kept iff the probability mass *before* it is < threshold, so the top expert always is. In
  float32 that mass can round up to 1.0 before the last experts when their probabilities are below
  ~6e-8; threshold >= 1 therefore keeps all `max_k` slots outright (= top-k with k = max_k, whatever the
  rounding). (The authors' code, github.com/ZhenweiAn/Dynamic_MoE, keeps the prefix whose mass exceeds
  p strictly and does not renormalise: renormalize=False and max_k = E reproduce it up to exact ties.)
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [N, E]
  top_probs, experts = jax.lax.top_k(probs, max_k)  # [N, k] descending
  before = jnp.cumsum(top_probs, axis=-1) - top_probs  # [N, k] mass of the better experts
  keep = (before < threshold) | (threshold >= 1.0)  # [N, k]; slot 0 always (before = 0 < threshold)
  weights = jnp.where(keep, top_probs, 0.0)  # [N, k]
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)  # > 0: slot 0 holds >= 1/E
  return RouterOutput(logits=logits, probs=probs, experts=experts.astype(jnp.int32), weights=weights)


def softmax_gates(logits: jax.Array, *, top_k: int, top_p: float, renormalize: bool) -> RouterOutput:
  """top_p > 0: top_p_gates with threshold top_p and at most top_k slots; else topk_gates with top_k."""
  if top_p > 0:
    return top_p_gates(logits, top_p, top_k, renormalize=renormalize)
  return topk_gates(logits, top_k, renormalize=renormalize)


def topk_renormalized(logits: jax.Array, top_k: int) -> RouterOutput:
  """Mixtral: softmax over all experts, keep the top-k, renormalise them to sum to 1."""
  return topk_gates(logits, top_k, renormalize=True)


def soft_cap(logits: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(logits / cap): bounds router logits to (-cap, cap) smoothly; cap <= 0 leaves them as is.

  A hard ceiling on what the z-loss only discourages: logits cannot drift to magnitudes where float32
  softmax saturates (ST-MoE's motivation for the z-loss), whatever the auxiliary-loss weights.
  """
  return logits if cap <= 0 else cap * jnp.tanh(logits / cap)


def sinkhorn_log(logits: jax.Array, num_iters: int) -> jax.Array:
  """Balanced assignment scores: alternately normalise exp(logits) so that every token's row sums to 1
  and every expert's column sums to N / E (log domain; fixed iteration count so it jits). [N, E]."""
  n, e = logits.shape
  log_col_target = math.log(n / e)

  def step(_, log_p):
    log_p = log_p - jax.nn.logsumexp(log_p, axis=1, keepdims=True)  # rows -> 1
    return log_p - jax.nn.logsumexp(log_p, axis=0, keepdims=True) + log_col_target  # columns -> N/E
  return jax.lax.fori_loop(0, num_iters, step, logits.astype(jnp.float32))


class LinearRouter(nnx.Module):
  """Shared base: a bias-free gate W [D, E] producing float32 logits (optionally soft-capped)."""

  causal = True              # False: a token's routing depends on later tokens (no KV-cache decoding)
  needs_token_ids = False    # True: the router reads token ids (hash routing)
  # True: selection is softmax over `logits` then top-k (or top-p), in every phase, so `select` can
  # re-select with another k or threshold (config.run.top_k / top_p). Noise, balancing, biases, hashes
  # or expert choice make it something else: False.
  softmax_top_k = False

  def __init__(self, dim: int, num_experts: int, top_k: int, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs, logits_cap: float = 0.0):
    self.kernel = normal_param(rngs, (dim, num_experts), param_dtype, ("embed", "expert"))
    self.num_experts = num_experts
    self.top_k = top_k
    self.logits_cap = logits_cap

  def logits(self, x: jax.Array) -> jax.Array:  # [N, D] -> [N, E] float32
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
    return soft_cap(logits, self.logits_cap)

  @classmethod
  def config_error(cls, top_k: int, num_experts: int, options: dict) -> Optional[str]:
    """A one-line problem with these settings for this router (naming the field), or None."""
    return None

  def override_slots(self, top_k: int, top_p: float) -> int:
    """Slots per token under a config.run override: top_k if set; else every expert for top-p (it picks
    how many it needs); else the router's own top_k."""
    return top_k or (self.num_experts if top_p else self.top_k)

  def select(self, logits: jax.Array, *, top_k: int = 0, top_p: float = 0.0) -> RouterOutput:
    """softmax_top_k routers: experts and weights from `logits` [N, E] with the config.run override
    (top_k > 0: that many slots; top_p > 0: top-p with that threshold; 0: as built)."""
    raise NotImplementedError(f"router {type(self).__name__} has no softmax-then-top-k selection")


def routing_override_error(router: str, top_k: int, top_p: float, num_experts: int) -> Optional[str]:
  """config.run.top_k / top_p against the model's config.model.router and num_experts: a one-line
  problem naming the field, or None. Checked where the model is built (Mixtral.__init__)."""
  if not (top_k or top_p):
    return None
  field = " and ".join(f"config.run.{name}={value!r}" for name, value in (("top_k", top_k), ("top_p", top_p))
                       if value)
  if not ROUTERS.get(router).softmax_top_k:
    usable = ", ".join(n for n in ROUTERS.names() if ROUTERS.get(n).softmax_top_k)
    return (f"{field} re-selects experts from a softmax-then-top-k router, which config.model.router="
            f"{router!r} is not; it works with {usable} (0 = as trained)")
  if top_k > num_experts:
    return f"config.run.top_k={top_k} exceeds config.model.num_experts={num_experts}"
  return None


def _options_of(cls) -> dict:
  """The router-specific keyword options of a router class and their defaults."""
  base = {"self", "dim", "num_experts", "top_k", "param_dtype", "rngs", "logits_cap"}
  params = inspect.signature(cls.__init__).parameters.values()
  return {p.name: p.default for p in params if p.name not in base and p.kind == p.KEYWORD_ONLY}


def check_router_config(name: str, top_k: int, num_experts: int, options: dict) -> Optional[str]:
  """Validation used by config.validate: unknown options and router-specific constraints."""
  cls = ROUTERS.get(name)
  known = _options_of(cls)
  unknown = sorted(set(options) - set(known))
  if unknown:
    return (f"config.model.router_options has unknown option(s) {', '.join(unknown)} for router "
            f"{name!r}; known: {', '.join(sorted(known)) or 'none'}")
  return cls.config_error(top_k, num_experts, options)


@ROUTERS.register("mixtral_topk")
class MixtralTopK(LinearRouter):
  """Mixtral (Jiang et al. 2024, arXiv:2401.04088): softmax -> top-k -> renormalise; k=2 by default.

  Equal to softmax over the top-k logits. No noise, no state, no options. Under a config.run.top_p
  override without top_k, up to all E experts (renormalised).
  """

  softmax_top_k = True

  def select(self, logits, *, top_k=0, top_p=0.0) -> RouterOutput:
    return softmax_gates(logits, top_k=self.override_slots(top_k, top_p), top_p=top_p, renormalize=True)

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    return self.select(self.logits(x))


@ROUTERS.register("topk")
class TopK(LinearRouter):
  """Tokens choose top-k without renormalisation: GShard (Lepikhin et al. 2020, arXiv:2006.16668) and
  flaxformer's `TokensChooseMaskedRouter`. Weights are the softmax probabilities of the chosen experts,
  so they sum to less than 1.

  Options: batch_prioritized=False. True = batch-prioritised routing (Riquelme et al. 2021, V-MoE,
  arXiv:2106.05974): under capacity dispatch, tokens with the highest top-1 probability claim expert
  buffers first instead of tokens earlier in the batch. GShard's random dropping of the second expert is
  not implemented.
  """

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               batch_prioritized: bool = False):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, logits_cap=logits_cap)
    self.batch_prioritized = bool(batch_prioritized)

  softmax_top_k = True

  def select(self, logits, *, top_k=0, top_p=0.0) -> RouterOutput:
    out = softmax_gates(logits, top_k=self.override_slots(top_k, top_p), top_p=top_p, renormalize=False)
    if self.batch_prioritized:
      out = out.replace(priority=out.weights[:, 0])  # [N] top-1 probability
    return out

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    return self.select(self.logits(x))


@ROUTERS.register("switch")
class Switch(TopK):
  """Switch Transformer (Fedus et al. 2021, arXiv:2101.03961): top-1; the expert output is scaled by its
  router probability (not renormalised, so the router gets a gradient). Requires top_k=1.

  Options: batch_prioritized=False (as for `topk`). Capacity factor comes from config.model.capacity_factor
  (the paper's default is 1.0-1.25).
  """

  @classmethod
  def config_error(cls, top_k, num_experts, options):
    if top_k != 1:
      return f"config.model.router='switch' routes each token to one expert: set config.model.top_k=1 (got {top_k})"
    return None


@ROUTERS.register("top_p")
class TopP(LinearRouter):
  """Dynamic (top-p) routing, Huang et al. 2024, "Harder Tasks Need More Experts" (arXiv:2403.07652):
  each token gets the fewest experts whose softmax probabilities reach `threshold` (`top_p_gates`), at
  most config.model.top_k of them: confident tokens use one expert, uncertain ones more. Pair it with the
  paper's `dynamic_entropy` loss (losses.py), which makes the router confident so fewer experts are
  needed, and a balancing loss; metrics.experts_per_token measures the compute it spends.

  Options: threshold=0.4 (the paper's p; its released config sets top_p_threshold=0.4), renormalize=True
  (kept weights sum to 1; the authors' code weights by the raw probabilities: False). config.model.top_k
  caps the slots (buffers and capacity are sized for it); top_k = num_experts is the paper's uncapped rule.
  """

  softmax_top_k = True

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               threshold: float = 0.4, renormalize: bool = True):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, logits_cap=logits_cap)
    self.threshold = float(threshold)
    self.renormalize = bool(renormalize)

  @classmethod
  def config_error(cls, top_k, num_experts, options):
    t = options.get("threshold", 0.4)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
      return f"config.model.router_options.threshold must be in (0, 1] for router 'top_p', got {t!r}"
    return None

  def select(self, logits, *, top_k=0, top_p=0.0) -> RouterOutput:
    """config.run.top_p replaces the threshold, config.run.top_k the maximum number of slots."""
    return top_p_gates(logits, top_p or self.threshold, top_k or self.top_k, renormalize=self.renormalize)

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    return self.select(self.logits(x))


@ROUTERS.register("noisy_topk")
class NoisyTopK(LinearRouter):
  """Noisy top-k gating (Shazeer et al. 2017, arXiv:1701.06538, eq. 3-5):
  H = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon); weights = softmax over the top-k of H.

  The noise is trainable (W_noise is a parameter, initialised to zeros as in the paper) and applied only
  in training, drawn from the `key` the model is called with. W_g uses this repository's N(0, 0.02) init
  (the paper's all-zero init would make every top-k a tie). `logits` holds H, so z-loss and HF's
  balancing loss see what routing saw. `load_probs` carries the paper's smooth load estimator
  P(x, e) = Phi((clean_e - kth_excluding_e(H)) / std_e) (eq. 8-9) for the `load_cv2` loss.

  Options: noise_epsilon=1e-2 (the floor on the noise scale used by tensor2tensor's implementation).
  """

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               noise_epsilon: float = 1e-2):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, logits_cap=logits_cap)
    self.noise_kernel = nnx.Param(jnp.zeros((dim, num_experts), param_dtype), logical_axes=("embed", "expert"))
    self.noise_epsilon = float(noise_epsilon)

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    clean = self.logits(x)  # [N, E]
    noise_std = jax.nn.softplus(jnp.einsum("nd,de->ne", x.astype(jnp.float32),
                                           self.noise_kernel[...].astype(jnp.float32))) + self.noise_epsilon
    noisy = clean
    if train:
      if key is None:
        raise ValueError("router 'noisy_topk' needs a PRNG key in training: call the model with key=...")
      noisy = clean + jax.random.normal(key, clean.shape, jnp.float32) * noise_std
    top_logits, experts = jax.lax.top_k(noisy, self.top_k)  # [N, k]
    weights = jax.nn.softmax(top_logits, axis=-1)  # softmax over the kept k (KeepTopK then softmax)
    return RouterOutput(logits=noisy, probs=jax.nn.softmax(noisy, axis=-1), experts=experts.astype(jnp.int32),
                        weights=weights, load_probs=_smooth_load(clean, noisy, noise_std, self.top_k))


def _smooth_load(clean, noisy, noise_std, top_k):
  """Shazeer et al. 2017 eq. 9: probability that each expert stays in the top-k when only its own noise
  is resampled. [N, E]."""
  n, e = clean.shape
  if top_k >= e:
    return jnp.ones_like(clean)
  top_values, _ = jax.lax.top_k(noisy, top_k + 1)  # [N, k + 1]
  threshold_if_in = top_values[:, top_k:top_k + 1]  # the (k+1)-th value: to beat when e is in the top k
  threshold_if_out = top_values[:, top_k - 1:top_k]  # the k-th value: to beat when e is outside
  is_in = noisy > threshold_if_in
  threshold = jnp.where(is_in, threshold_if_in, threshold_if_out)  # [N, E]
  return jax.scipy.stats.norm.cdf((clean - threshold) / noise_std)


@ROUTERS.register("sinkhorn")
class Sinkhorn(LinearRouter):
  """Sinkhorn-balanced routing, S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language
  Models", arXiv:2202.01169; the balanced-assignment idea of BASE layers, Lewis et al. 2021).

  Training: experts are the top-k of the Sinkhorn-balanced assignment of exp(logits) (rows sum to 1,
  columns to N/E; no gradient through the balancing); weights are the plain softmax probabilities of the
  chosen experts, so the router still learns from the task loss. Inference: plain top-k of the softmax.

  Options: num_iters=8 (fixed Sinkhorn iterations; enough to balance to a few percent on random logits),
  renormalize=False (True rescales the k weights to sum to 1, as mixtral_topk does).
  """

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, logits_cap=0.0,
               num_iters: int = 8, renormalize: bool = False):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, logits_cap=logits_cap)
    self.num_iters = int(num_iters)
    self.renormalize = bool(renormalize)

  @classmethod
  def config_error(cls, top_k, num_experts, options):
    if int(options.get("num_iters", 8)) < 1:
      return "config.model.router_options.num_iters must be >= 1 for router 'sinkhorn'"
    return None

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    logits = self.logits(x)
    out = topk_gates(logits, self.top_k, renormalize=self.renormalize)
    if not train:
      return out
    balanced = sinkhorn_log(jax.lax.stop_gradient(logits), self.num_iters)  # [N, E]
    _, experts = jax.lax.top_k(balanced, self.top_k)  # [N, k]
    weights = jnp.take_along_axis(out.probs, experts, axis=-1)  # [N, k]
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return out.replace(experts=experts.astype(jnp.int32), weights=weights)


def require_causal(router: str) -> None:
  """Raises ValueError if `router` cannot route one token at a time (called for KV-cache decoding)."""
  if not ROUTERS.get(router).causal:
    raise ValueError(f"config.model.router={router!r} is not causal (a token's experts depend on later "
                     f"tokens of the batch), so it cannot decode autoregressively with a KV cache; "
                     f"use a token-choice router such as 'mixtral_topk'")
