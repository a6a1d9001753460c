"""The sparse MoE block: router looked up by name, stacked SwiGLU experts, dispatch looked up by name.

The block stores what it *is* (router, expert weights); which dispatch strategy runs is an argument of
each call, picked by the model for the phase from its execution spec (mixtral_jax/execution.py).

Block options (all from ModelConfig): shared experts always applied (DeepSeekMoE, Dai et al. 2024,
arXiv:2401.06066); fine-grained experts are just config (more, narrower experts: num_experts x m,
ffn_dim / m, top_k x m); router jitter (multiplicative noise on the router input only, Switch
Transformer); a soft cap on the router logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.moe.dispatch import all_dispatchers
from mixtral_jax.model.layers import normal_param
from mixtral_jax.moe.routers import ROUTERS


class SwiGLU(nnx.Module):
  """A dense always-on FFN (DeepSeekMoE shared experts): w2(silu(x w1) * (x w3))."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.w1 = normal_param(rngs, (dim, hidden), param_dtype, ("embed", "mlp"))
    self.w3 = normal_param(rngs, (dim, hidden), param_dtype, ("embed", "mlp"))
    self.w2 = normal_param(rngs, (hidden, dim), param_dtype, ("mlp", "embed"))
    self.dtype = dtype

  def __call__(self, x):  # [N, D] -> [N, D]
    dt = self.dtype
    x = x.astype(dt)
    h = jax.nn.silu(x @ self.w1[...].astype(dt)) * (x @ self.w3[...].astype(dt))  # [N, F]
    return h @ self.w2[...].astype(dt)


class MoEBlock(nnx.Module):
  """Routes each token to experts and sums their outputs; returns what it computed, no losses."""

  def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, *, router: str,
               router_options: dict, num_shared_experts: int, router_jitter: float, dtype, param_dtype,
               rngs: nnx.Rngs, router_logits_cap: float = 0.0):
    self.router = ROUTERS.get(router)(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs,
                                      logits_cap=router_logits_cap, **router_options)
    self.w1 = normal_param(rngs, (num_experts, dim, ffn_dim), param_dtype, ("expert", "embed", "mlp"))
    self.w3 = normal_param(rngs, (num_experts, dim, ffn_dim), param_dtype, ("expert", "embed", "mlp"))
    self.w2 = normal_param(rngs, (num_experts, ffn_dim, dim), param_dtype, ("expert", "mlp", "embed"))
    self.shared = (SwiGLU(dim, ffn_dim * num_shared_experts, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                   if num_shared_experts else None)
    self.top_k = top_k
    self.router_jitter = router_jitter
    self.dtype = dtype

  def __call__(self, x, *, dispatch: str, token_ids=None, train=False, key=None, capacity_factor=1.25,
               grouped_matmul="blocks", loop_block=128, top_k=0, top_p=0.0):
    """x [B, T, D] -> (y [B, T, D], RouterOutput with [B, T, ...] leaves, stats dict).

    dispatch: a name in DISPATCHERS; capacity_factor, grouped_matmul, loop_block: its tuning.
    top_k, top_p: the execution's routing override (0 = as built): the router's `select` re-selects from
    its logits (routing_override_error, checked when the model is built, says which routers allow it).
    The strategy is given the slots per token the route has (capacity sizes its buffers with them)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)  # [N, D]
    router_key = jitter_key = None
    if key is not None:
      router_key, jitter_key = jax.random.split(key)
    router_in = flat
    if train and self.router_jitter > 0 and jitter_key is not None:
      # Multiplicative jitter on the router's input only (the experts see the clean x).
      noise = jax.random.uniform(jitter_key, flat.shape, jnp.float32,
                                 1.0 - self.router_jitter, 1.0 + self.router_jitter)
      router_in = flat.astype(jnp.float32) * noise
    ids = None if token_ids is None else token_ids.reshape(b * t)
    slots = self.top_k
    if top_k or top_p:
      route = self.router.select(self.router.logits(router_in), top_k=top_k, top_p=top_p)
      slots = route.experts.shape[-1]  # [N, k'] with k' = top_k, or up to E for a top-p override
    else:
      route = self.router(router_in, token_ids=ids, train=train, key=router_key)
    y, stats = all_dispatchers().get(dispatch)(
        flat, route, self.w1[...], self.w3[...], self.w2[...], dtype=self.dtype, top_k=slots,
        capacity_factor=capacity_factor, grouped_matmul=grouped_matmul, loop_block=loop_block)
    if self.shared is not None:
      y = y + self.shared(flat)
    route = jax.tree.map(lambda a: a.reshape(b, t, *a.shape[1:]), route)
    return y.reshape(b, t, d), route, stats
