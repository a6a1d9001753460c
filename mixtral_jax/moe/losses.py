"""Auxiliary MoE losses: pure, keyword-only functions of the per-layer RouterOutput.

Each is registered in LOSSES and has the signature
    fn(router: RouterOutput (leaves [L, B, T, ...]), *, mask: [B, T] or None, num_experts, top_k) -> scalar
Weights are applied in one place only: the training step (`config.train.aux_losses = {name: weight}`).
`mask` is 1 for real tokens and 0 for padding; padding never counts.

Value at perfect balance (every expert gets the same share of slots and of probability) — codebases
normalise differently, so a weight tuned for one does not transfer to another:

  load_balancing   top_k  (HF transformers' Mixtral; Switch's top-1 form is 1; Megatron/DeepSpeed-style
                           implementations that divide by k report 1)
  z_loss           log(E)^2 for uniform logits at 0; not a balance loss (0 iff logsumexp(logits) = 0)
  importance_cv2   0      (Shazeer et al. 2017)
  load_cv2         0      (Shazeer et al. 2017)
  seq_aux          1      (DeepSeek-V2/V3's sequence-wise loss before its alpha; some codebases omit
                           the E / k factor of f and report k / E)
  dynamic_entropy  log(E) (Huang et al. 2024's dynamic loss; not a balance loss: it is *maximal* at
                           uniform probabilities and 0 for a one-hot router, pulling against balance)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.registry import Registry

LOSSES = Registry("loss")


def _flat(x, mask):
  """[L, B, T, ...] -> ([L, N, ...], mask [N] float32)."""
  lead = x.shape[:3]
  flat = x.reshape(lead[0], lead[1] * lead[2], *x.shape[3:])
  m = jnp.ones(lead[1:], jnp.float32) if mask is None else mask.astype(jnp.float32)
  return flat, m.reshape(-1)


def cv_squared(x: jax.Array, axis: int = -1, eps: float = 1e-10) -> jax.Array:
  """Squared coefficient of variation, population variance / mean^2 (Shazeer et al.'s cv_squared)."""
  x = x.astype(jnp.float32)
  return jnp.var(x, axis=axis) / (jnp.mean(x, axis=axis) ** 2 + eps)


def gates(router, num_experts: int) -> jax.Array:
  """[..., E] combine weight per expert (Shazeer's G(x)): the router weights scattered over experts."""
  one_hot = jax.nn.one_hot(router.experts, num_experts, dtype=jnp.float32)  # [..., k, E]
  return jnp.einsum("...ke,...k->...e", one_hot, router.weights.astype(jnp.float32))


@LOSSES.register("load_balancing")
def load_balancing(router, *, mask=None, num_experts, top_k):
  """Switch Transformer eq. 4-6 as HF transformers computes it for Mixtral (`load_balancing_loss_func`):
  E * sum_e f_e * P_e, with f_e the fraction of top-k slots routed to e and P_e the mean router
  probability, both pooled over all layers and non-padding tokens. Recomputes softmax/top-k from the raw
  logits like HF does (so for routers that do not pick the softmax top-k — sinkhorn in training,
  aux_free_bias, expert_choice, hash — it scores the softmax's preference, not their choice; use
  seq_aux for the actual choice). Equals top_k at perfect balance (f_e = k/E, P_e = 1/E).
  """
  logits, m = _flat(router.logits, mask)  # [L, N, E], [N]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  _, chosen = jax.lax.top_k(probs, top_k)  # [L, N, k]
  counts = jnp.einsum("lnke,n->e", jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), m)
  prob_sum = jnp.einsum("lne,n->e", probs, m)
  rows = logits.shape[0] * jnp.sum(m)
  return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


@LOSSES.register("z_loss")
def z_loss(router, *, mask=None, num_experts=None, top_k=None):
  """Router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, eq. 5): mean over tokens and layers of
  logsumexp(logits)^2. Keeps router logits small so float32 softmax stays well conditioned; its minimum
  is not tied to balance (0 iff logsumexp(logits) = 0; log(E)^2 for all-zero logits)."""
  return jnp.mean(z_loss_per_layer(router, mask))


def z_loss_per_layer(router, mask=None) -> jax.Array:
  """[L] masked mean of logsumexp(logits)^2 per layer (also reported by metrics.moe_metrics)."""
  logits, m = _flat(router.logits, mask)
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2  # [L, N]
  return jnp.einsum("ln,n->l", z, m) / jnp.maximum(jnp.sum(m), 1.0)


@LOSSES.register("importance_cv2")
def importance_cv2(router, *, mask=None, num_experts, top_k=None):
  """Importance loss (Shazeer et al. 2017, arXiv:1701.06538, eq. 6-7): CV(Importance)^2 where
  Importance_e = sum over tokens of the gate value G(x)_e (the combine weights). Computed per layer,
  averaged over layers. 0 at perfect balance."""
  g, m = _flat(gates(router, num_experts), mask)  # [L, N, E]
  importance = jnp.einsum("lne,n->le", g, m)  # [L, E]
  return jnp.mean(cv_squared(importance))


@LOSSES.register("load_cv2")
def load_cv2(router, *, mask=None, num_experts, top_k=None):
  """Load loss (Shazeer et al. 2017, appendix A, eq. 8-11): CV(Load)^2 where Load_e = sum over tokens of
  the smooth probability that e is selected under resampled noise (`router.load_probs`, from
  noisy_topk). Routers without noise have no such estimator; for them Load_e falls back to the summed
  router probabilities (then equal to an importance loss over probs). Per layer, averaged. 0 at balance."""
  soft = router.probs if router.load_probs is None else router.load_probs
  p, m = _flat(soft, mask)  # [L, N, E]
  load = jnp.einsum("lne,n->le", p.astype(jnp.float32), m)
  return jnp.mean(cv_squared(load))


@LOSSES.register("seq_aux")
def seq_aux(router, *, mask=None, num_experts, top_k):
  """Sequence-wise balance loss (DeepSeek-V3, arXiv:2412.19437, eq. 17-20; DeepSeek-V2's expert-level
  loss per sequence): for each sequence, sum_e f_e * P_e with f_e = E / (k T) * (number of its T tokens
  that chose e) and P_e = mean over its tokens of the normalised affinity `router.probs`. Uses the
  router's actual choice (biased selection for aux_free_bias). Averaged over sequences with at least one
  real token and over layers. 1 at perfect balance (f_e = 1, P_e = 1/E)."""
  m = jnp.ones(router.experts.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
  used = (router.weights != 0).astype(jnp.float32) * m[None, :, :, None]  # [L, B, T, k]
  counts = jnp.einsum("lbtke,lbtk->lbe", jax.nn.one_hot(router.experts, num_experts, dtype=jnp.float32), used)
  tokens = jnp.sum(m, axis=-1)  # [B]
  safe = jnp.maximum(tokens, 1.0)[None, :, None]
  f = counts * num_experts / (top_k * safe)  # [L, B, E]
  p = jnp.einsum("lbte,bt->lbe", router.probs.astype(jnp.float32), m) / safe  # [L, B, E]
  per_seq = jnp.sum(f * p, axis=-1)  # [L, B]
  real = (tokens > 0).astype(jnp.float32)
  return jnp.sum(per_seq * real[None]) / (per_seq.shape[0] * jnp.maximum(jnp.sum(real), 1.0))


@LOSSES.register("dynamic_entropy")
def dynamic_entropy(router, *, mask=None, num_experts=None, top_k=None):
  """Dynamic loss of top-p routing (Huang et al. 2024, arXiv:2403.07652): the entropy
  -sum_e P_e log P_e of the router distribution `router.probs`, averaged over real tokens and layers.
  Minimised, it makes the router confident, so the `top_p` router reaches its threshold with fewer
  experts (without it, a flat router would select many experts to reach p). The paper adds it beside a
  load-balancing loss, which keeps confidence from collapsing onto a few experts. log(E) for uniform
  probabilities, 0 for one-hot ones."""
  return jnp.mean(entropy_per_layer(router, mask))


def entropy_per_layer(router, mask=None) -> jax.Array:
  """[L] masked mean over tokens of the entropy of `router.probs` in nats (also metrics.moe_metrics)."""
  p, m = _flat(router.probs, mask)  # [L, N, E]
  p = p.astype(jnp.float32)
  positive = p > 0
  # 0 log 0 = 0, with finite gradients: the log never sees the zeros it is not used for.
  plogp = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)  # [L, N, E]
  return jnp.einsum("ln,n->l", -jnp.sum(plogp, axis=-1), m) / jnp.maximum(jnp.sum(m), 1.0)
