"""Per-layer MoE metrics computed outside the layers from the model's RouterOutput (pure functions)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def expert_load(router, mask=None, num_experts=None):
  """[L, E] fraction of (non-padding) routing slots each expert received."""
  experts, weights = router.experts, router.weights  # [L, B, T, k]
  num_experts = num_experts or router.probs.shape[-1]
  m = jnp.ones(experts.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
  used = (weights > 0).astype(jnp.float32) * m[None, :, :, None]  # [L, B, T, k]
  counts = jnp.einsum("lbtke,lbtk->le", jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), used)
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def moe_metrics(router, stats=None, mask=None) -> dict:
  """Per-layer ([L]) metrics: load fractions [L, E], router entropy / log E, load CV, max violation,
  dead experts; plus the dispatch statistics passed through."""
  num_experts = router.probs.shape[-1]
  load = expert_load(router, mask, num_experts)  # [L, E]
  m = jnp.ones(router.probs.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
  p = router.probs.astype(jnp.float32)
  entropy = -jnp.sum(p * jnp.log(jnp.clip(p, 1e-9)), axis=-1)  # [L, B, T]
  entropy = jnp.sum(entropy * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m), 1.0) / math.log(num_experts)
  mean = jnp.mean(load, axis=-1, keepdims=True)
  out = {
      "expert_load": load,
      "router_entropy": entropy,
      "load_cv": jnp.std(load, axis=-1) / jnp.squeeze(mean, -1),
      "max_violation": jnp.max(load, axis=-1) / jnp.squeeze(mean, -1) - 1.0,
      "dead_experts": jnp.sum(load == 0, axis=-1).astype(jnp.float32),
  }
  out.update(stats or {})
  return out
