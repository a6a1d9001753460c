"""Routers: token representations -> which experts, with what weights.

Every router is a tiny NNX module registered by name in ROUTERS; the MoE block builds the one named by
`config.model.router`. Constructors take (dim, num_experts, top_k, *, param_dtype, rngs, **options);
calls take (x [N, D], *, token_ids [N] | None, train: bool, key: PRNG key | None) and return a
RouterOutput. All routing math is float32 whatever the parameter dtype. The selection rules are pure
functions below so that losses, tests and other routers reuse them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax.layers import normal_param
from mixtral_jax.registry import Registry

ROUTERS = Registry("router")


@struct.dataclass
class RouterOutput:
  """What one MoE layer decided. N = tokens (or [B, T] once the model reshapes), E experts, k choices."""
  logits: jax.Array    # [N, E] float32 raw router logits (z-loss and HF's balancing loss read these)
  probs: jax.Array     # [N, E] float32 softmax over all experts
  experts: jax.Array   # [N, k] int32 chosen expert per slot
  weights: jax.Array   # [N, k] float32 combine weight per slot (0 where a slot is unused)


def topk_renormalized(logits: jax.Array, top_k: int) -> RouterOutput:
  """Mixtral: softmax over all experts, keep the top-k, renormalise them to sum to 1."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [N, E]
  top_probs, experts = jax.lax.top_k(probs, top_k)  # [N, k]
  weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  return RouterOutput(logits=logits, probs=probs, experts=experts.astype(jnp.int32), weights=weights)


class LinearRouter(nnx.Module):
  """Shared base: a bias-free gate W [D, E] producing float32 logits."""

  def __init__(self, dim: int, num_experts: int, top_k: int, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = normal_param(rngs, (dim, num_experts), param_dtype, ("embed", "expert"))
    self.num_experts = num_experts
    self.top_k = top_k

  def logits(self, x: jax.Array) -> jax.Array:  # [N, D] -> [N, E] float32
    return jnp.einsum("nd,de->ne", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))


@ROUTERS.register("mixtral_topk")
class MixtralTopK(LinearRouter):
  """Mixtral (Jiang et al. 2024, arXiv:2401.04088): softmax -> top-k -> renormalise; k=2 by default.

  Equal to softmax over the top-k logits. No noise, no state.
  """

  def __call__(self, x, *, token_ids=None, train=False, key=None) -> RouterOutput:
    return topk_renormalized(self.logits(x), self.top_k)
