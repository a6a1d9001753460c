"""Auxiliary MoE losses: pure, keyword-only functions of the per-layer RouterOutput.

Each is registered in LOSSES and has the signature
    fn(router: RouterOutput (leaves [L, B, T, ...]), *, mask: [B, T] or None, num_experts, top_k) -> scalar
Weights are applied in one place only: the training step (`config.train.aux_losses = {name: weight}`).
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


@LOSSES.register("load_balancing")
def load_balancing(router, *, mask=None, num_experts, top_k):
  """Switch Transformer eq. 4-6 as HF transformers computes it for Mixtral (`load_balancing_loss_func`):
  E * sum_e f_e * P_e, with f_e the fraction of top-k slots routed to e and P_e the mean router
  probability, both pooled over all layers and non-padding tokens. Recomputes softmax/top-k from the raw
  logits like HF does. Equals top_k at perfect balance (f_e = k/E, P_e = 1/E); Switch's top-1 form is 1.
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
  """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens and layers of logsumexp(logits)^2.
  Its minimum is not tied to balance: it is 0 only when logsumexp(logits) = 0."""
  logits, m = _flat(router.logits, mask)
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2  # [L, N]
  return jnp.sum(z * m) / (logits.shape[0] * jnp.maximum(jnp.sum(m), 1.0))
