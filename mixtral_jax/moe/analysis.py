"""Routing statistics of the Mixtral paper's section 5 (Jiang et al. 2024, arXiv:2401.04088), as pure
functions of the model's RouterOutput (leaves [L, B, T, ...]).

    repeats = consecutive_repeats(out.router, mask, segment_ids)   # per layer, vs random_baselines(E, k)
    both = coactivation(out.router, mask)                           # [L, E, E]

The paper reports, per layer, how often two consecutive tokens get the same first-choice expert, and how
often they share at least one of their top-2 experts, against what random assignment gives: 1/E, and
1 - C(E-k, k) / C(E, k) (46% for 8 experts, top-2). A pair counts only when both tokens are real (mask)
and in the same document (segment ids): the end of one packed document and the start of the next are not
consecutive text.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def random_baselines(num_experts: int, top_k: int) -> dict:
  """What uniformly random top-k assignment gives: same first choice 1/E; some shared expert among two
  tokens' k choices 1 - C(E-k, k) / C(E, k)."""
  overlap = 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
  return {"first_choice": 1.0 / num_experts, "top_k_overlap": overlap}


def first_choice(router) -> jax.Array:
  """[L, B, T] int32: the expert of each token's highest-weight slot (slot order is the router's)."""
  best = jnp.argmax(router.weights, axis=-1)[..., None]  # [L, B, T, 1]
  return jnp.take_along_axis(router.experts, best, axis=-1)[..., 0]


def _chosen(router, num_experts: int) -> jax.Array:
  """[L, B, T, E] bool: the experts each token's used slots chose."""
  hot = jax.nn.one_hot(router.experts, num_experts, dtype=jnp.float32)  # [L, B, T, k, E]
  return jnp.any((hot > 0) & (router.weights[..., None] > 0), axis=-2)


def consecutive_repeats(router, mask: Optional[jax.Array] = None,
                        segment_ids: Optional[jax.Array] = None) -> dict:
  """Per layer [L]: the fraction of consecutive token pairs (t, t+1) with the same first-choice expert,
  and with at least one chosen expert in common. mask [B, T] (1 = real token), segment_ids [B, T]."""
  num_experts = router.probs.shape[-1]
  first = first_choice(router)  # [L, B, T]
  chosen = _chosen(router, num_experts)  # [L, B, T, E]
  b, t = first.shape[1:]
  pair = jnp.ones((b, t - 1), bool)
  if mask is not None:
    pair &= (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
  if segment_ids is not None:
    pair &= segment_ids[:, 1:] == segment_ids[:, :-1]
  pair = pair.astype(jnp.float32)  # [B, T-1]
  count = jnp.maximum(jnp.sum(pair), 1.0)
  same_first = (first[:, :, 1:] == first[:, :, :-1]).astype(jnp.float32)  # [L, B, T-1]
  shared = jnp.any(chosen[:, :, 1:] & chosen[:, :, :-1], axis=-1).astype(jnp.float32)  # [L, B, T-1]
  return {"first_choice": jnp.sum(same_first * pair, axis=(1, 2)) / count,
          "top_k_overlap": jnp.sum(shared * pair, axis=(1, 2)) / count,
          "pairs": jnp.sum(pair)}


def coactivation(router, mask: Optional[jax.Array] = None) -> jax.Array:
  """[L, E, E]: the fraction of real tokens that chose both expert i and expert j (the diagonal: that
  chose expert i). Symmetric; rows of the off-diagonal part sum to (k - 1) x the diagonal."""
  num_experts = router.probs.shape[-1]
  chosen = _chosen(router, num_experts).astype(jnp.float32)  # [L, B, T, E]
  weight = jnp.ones(chosen.shape[1:3]) if mask is None else (mask > 0).astype(jnp.float32)  # [B, T]
  both = jnp.einsum("lbti,lbtj,bt->lij", chosen, chosen, weight)  # [L, E, E]
  return both / jnp.maximum(jnp.sum(weight), 1.0)


def routing_entropy(router, mask: Optional[jax.Array] = None) -> dict:
  """Per layer [L], over real tokens: the mean entropy (nats) of the router's distribution over experts
  (`probs`), the same divided by log E (1 = uniform, 0 = one-hot), and the entropy of the layer's expert
  load (how evenly the used slots spread over the experts, also / log E)."""
  num_experts = router.probs.shape[-1]
  p = router.probs.astype(jnp.float32)  # [L, B, T, E]
  weight = jnp.ones(p.shape[1:3]) if mask is None else (mask > 0).astype(jnp.float32)  # [B, T]
  count = jnp.maximum(jnp.sum(weight), 1.0)
  per_token = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)  # [L, B, T]
  mean = jnp.einsum("lbt,bt->l", per_token, weight) / count
  used = jax.nn.one_hot(router.experts, num_experts, dtype=jnp.float32) * (router.weights[..., None] > 0)
  load = jnp.einsum("lbtke,bt->le", used, weight)  # [L, E] used slots per expert
  share = load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)
  load_entropy = -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.where(share > 0, share, 1.0)), 0.0), axis=-1)
  log_e = math.log(num_experts) if num_experts > 1 else 1.0
  return {"entropy": mean, "normalized": mean / log_e, "load_entropy": load_entropy / log_e}
