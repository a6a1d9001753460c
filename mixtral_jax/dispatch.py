"""Dispatch strategies: given routed tokens, run the experts and combine their outputs.

Each strategy is a pure function registered in DISPATCHERS:
    fn(x [N, D], route: RouterOutput, w1 [E, D, F], w3 [E, D, F], w2 [E, F, D], *, dtype,
       capacity_factor) -> (y [N, D], stats: dict of scalars)
Experts are SwiGLU: w2(silu(x w1) * (x w3)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.registry import Registry

DISPATCHERS = Registry("dispatch")


def combine_matrix(route, num_experts: int) -> jax.Array:
  """[N, E] float32: the weight each expert's output gets for each token (0 if not chosen)."""
  one_hot = jax.nn.one_hot(route.experts, num_experts, dtype=jnp.float32)  # [N, k, E]
  return jnp.einsum("nke,nk->ne", one_hot, route.weights)


@DISPATCHERS.register("dense")
def dense(x, route, w1, w3, w2, *, dtype, capacity_factor=None):
  """Every expert on every token, weighted by the combine matrix. E/k times the active FLOPs: the
  reference the sparse strategies are tested against."""
  num_experts = w1.shape[0]
  x = x.astype(dtype)
  gate = jnp.einsum("nd,edf->enf", x, w1.astype(dtype))  # [E, N, F]
  up = jnp.einsum("nd,edf->enf", x, w3.astype(dtype))  # [E, N, F]
  out = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, w2.astype(dtype))  # [E, N, D]
  combine = combine_matrix(route, num_experts).astype(dtype)  # [N, E]
  y = jnp.einsum("end,ne->nd", out, combine)
  return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}
