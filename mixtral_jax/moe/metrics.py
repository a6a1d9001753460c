"""Per-layer MoE metrics computed outside the layers from the model's RouterOutput (pure functions)."""
from __future__ import annotations

import math

import jax.numpy as jnp

from mixtral_jax.moe.losses import entropy_per_layer, z_loss_per_layer
from mixtral_jax.moe.routers import expert_counts


def expert_load(router, mask=None, num_experts=None):
  """[L, E] fraction of (non-padding, used) routing slots each expert received."""
  counts = expert_counts(router, mask, num_experts)  # [L, E]
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def experts_per_token(router, mask=None) -> jnp.ndarray:
  """[L] mean number of experts a real token actually used (slots with weight != 0): the compute that
  adaptive routing (top-p, expert choice) spends, k for a top-k router (fewer if weights underflow)."""
  m = jnp.ones(router.weights.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
  used = jnp.sum((router.weights != 0).astype(jnp.float32), axis=-1)  # [L, B, T]
  return jnp.einsum("lbt,bt->l", used, m) / jnp.maximum(jnp.sum(m), 1.0)


def moe_metrics(router, stats=None, mask=None) -> dict:
  """Per-layer metrics of the model's routing (leaves [L, B, T, ...]; mask [B, T], 1 = real token):

    expert_load     [L, E] fraction of used slots per expert (sums to 1)
    router_entropy  [L] mean entropy of `probs` / log E (1 = uniform, 0 = one-hot)
    load_cv         [L] std / mean of expert_load (0 = balanced)
    max_violation   [L] max load / mean load - 1 (0 = balanced; the capacity factor a dropless run would need, minus 1)
    dead_experts    [L] experts that received no slot
    experts_per_token [L] mean number of experts a token used (weight != 0; adaptive compute)
    z_loss          [L] masked mean logsumexp(logits)^2
  plus the dispatch statistics passed through (`dropped_fraction`, `dropped_tokens`, each [L]).
  """
  num_experts = router.probs.shape[-1]
  load = expert_load(router, mask, num_experts)  # [L, E]
  entropy = entropy_per_layer(router, mask)  # [L] nats
  mean = jnp.mean(load, axis=-1)  # [L]; 1/E unless the batch routed nothing
  mean = jnp.where(mean > 0, mean, 1.0)
  out = {
      "expert_load": load,
      "router_entropy": entropy / math.log(num_experts) if num_experts > 1 else jnp.zeros_like(entropy),
      "load_cv": jnp.std(load, axis=-1) / mean,
      "max_violation": jnp.max(load, axis=-1) / mean - 1.0,
      "dead_experts": jnp.sum(load == 0, axis=-1).astype(jnp.float32),
      "experts_per_token": experts_per_token(router, mask),
      "z_loss": z_loss_per_layer(router, mask),
  }
  out.update(stats or {})
  return out
