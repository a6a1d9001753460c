"""Dispatch strategies: given routed tokens, run the experts and combine their outputs.

Each strategy is a pure function registered in DISPATCHERS:
    fn(x [N, D], route: RouterOutput, w1 [E, D, F], w3 [E, D, F], w2 [E, F, D], *, dtype, top_k,
       capacity_factor, grouped_matmul, loop_block) -> (y [N, D], stats: dict of float32 scalars)
(the keyword tuning comes from the execution spec; every strategy accepts exactly these keywords and
ignores those it does not use, so a misspelt keyword is an error, not silently dropped).
Experts are SwiGLU: w2(silu(x w1) * (x w3)). Slots with weight 0 are unused and skipped.
An expert weight may be AdaptedExperts (moe/adapted.py, per-expert LoRA): capacity and dropless run its
adapters through their own batched / grouped matmuls; dense merges it (`astype`), the reference.

  dense     every expert on every token; E/k times the active FLOPs; the reference.
  capacity  GShard / Switch: each expert has C = ceil(top_k * N * capacity_factor / E) buffer rows;
            slots claim rows first choices first, then in token order (or by route.priority);
            slots beyond C are dropped and contribute 0 (the token keeps its residual).
  dropless  every slot computed: rows sorted by expert, then a grouped matmul — padded blocks through a
            batched matmul (CPU) or jax.lax.ragged_dot (accelerators); `grouped_matmul` picks.

All strategies return the same stats: dropped_fraction (dropped / used slots) and dropped_tokens
(tokens whose every used slot was dropped: their MoE output is 0). Padding tokens are routed and counted
like any other token (the block does not see the padding mask).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mixtral_jax.moe.adapted import cast
from mixtral_jax.moe.grouped import (block_layout, default_block_size, resolve_grouped_matmul, swiglu,
                                 swiglu_blocks, swiglu_ragged, take_rows)
from mixtral_jax.registry import Registry

DISPATCHERS = Registry("dispatch")


def all_dispatchers() -> Registry:
  """DISPATCHERS with every module that registers strategies imported (inference and expert-parallel)."""
  from mixtral_jax.moe import dispatch_decode
  from mixtral_jax.parallel import expert_parallel  # noqa: F401
  return DISPATCHERS


def combine_matrix(route, num_experts: int) -> jax.Array:
  """[N, E] float32: the weight each expert's output gets for each token (0 if not chosen)."""
  one_hot = jax.nn.one_hot(route.experts, num_experts, dtype=jnp.float32)  # [N, k, E]
  return jnp.einsum("nke,nk->ne", one_hot, route.weights)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Buffer rows per expert: ceil(top_k * N * capacity_factor / E), at least 1 (Switch eq. 3 for top-k)."""
  return max(1, math.ceil(top_k * num_tokens * capacity_factor / num_experts))


def slot_ranks(experts: jax.Array, used: jax.Array, num_experts: int, priority=None):
  """Each used slot's rank among the used slots of its expert, in claim order: all first choices, then
  all second choices, ...; within a choice, token order, or descending `priority` [N] when given
  (batch-prioritised routing). experts/used [N, k] -> (rank [N, k] int32, counts [E] int32)."""
  n, k = experts.shape
  order = None if priority is None else jnp.argsort(-priority, stable=True)  # [N] tokens by priority
  if order is not None:
    experts, used = experts[order], used[order]
  one_hot = jax.nn.one_hot(experts.T, num_experts, dtype=jnp.int32) * used.T[..., None]  # [k, N, E]
  one_hot = one_hot.reshape(k * n, num_experts)
  before = jnp.cumsum(one_hot, axis=0) - one_hot  # [k * N, E] exclusive running count per expert
  rank = jnp.sum(before * one_hot, axis=-1).reshape(k, n).T  # [N, k]
  if order is not None:
    rank = jnp.zeros_like(rank).at[order].set(rank)  # back to token order
  return rank.astype(jnp.int32), jnp.sum(one_hot, axis=0).astype(jnp.int32)


def _drop_stats(used, kept):
  """Dispatch statistics from used / kept slot masks [N, k]."""
  used_f = used.astype(jnp.float32)
  dropped = used_f - kept.astype(jnp.float32)
  lost = jnp.any(used, axis=-1) & ~jnp.any(kept, axis=-1)  # [N] tokens left with the residual only
  return {"dropped_fraction": jnp.sum(dropped) / jnp.maximum(jnp.sum(used_f), 1.0),
          "dropped_tokens": jnp.sum(lost.astype(jnp.float32))}


def run_rows(x, weights, slot_row, num_rows: int, experts_fn, dtype):
  """Moves tokens into expert buffer rows, applies `experts_fn` [R, D] -> [R, D], and combines.

  slot_row [N, k]: the buffer row of each slot, or num_rows for a slot that is unused or dropped. Rows
  move through `take_rows`, whose backward pass is a gather as well.
  """
  n, k = slot_row.shape
  flat = slot_row.reshape(-1)  # [S]
  row_slot = jnp.full((num_rows,), n * k, jnp.int32).at[flat].set(
      jnp.arange(n * k, dtype=jnp.int32), mode="drop")  # [R] inverse map; S = empty row
  row_token = jnp.where(row_slot < n * k, row_slot // k, n)  # [R]; N = empty row
  rows_in = take_rows(x.astype(dtype), row_token, slot_row)  # [R, D]
  rows_out = experts_fn(rows_in)  # [R, D]
  per_slot = take_rows(rows_out, flat, row_slot[:, None]).reshape(n, k, -1)  # [N, k, D]
  return jnp.einsum("nkd,nk->nd", per_slot, weights.astype(dtype))


@DISPATCHERS.register("dense")
def dense(x, route, w1, w3, w2, *, dtype, top_k=None, capacity_factor=None, grouped_matmul=None, loop_block=None):
  """Every expert on every token, weighted by the combine matrix. E/k times the active FLOPs: the
  reference the sparse strategies are tested against."""
  num_experts = w1.shape[0]
  x = x.astype(dtype)
  gate = jnp.einsum("nd,edf->enf", x, w1.astype(dtype))  # [E, N, F]
  up = jnp.einsum("nd,edf->enf", x, w3.astype(dtype))  # [E, N, F]
  out = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, w2.astype(dtype))  # [E, N, D]
  combine = combine_matrix(route, num_experts).astype(dtype)  # [N, E]
  y = jnp.einsum("end,ne->nd", out, combine)
  used = route.weights != 0
  return y, _drop_stats(used, used)


def _buffered(x, weights, experts, rank, kept, cap, w1, w3, w2, dtype):
  """Kept slots into per-expert buffers of `cap` rows ([E, C, D]), one batched matmul per weight with
  the expert weights as they are (no per-block copies), back to tokens."""
  d = x.shape[-1]
  num_experts = w1.shape[0]
  slot_row = jnp.where(kept, experts * cap + rank, num_experts * cap)  # [N, k]

  def experts_fn(rows):  # [E * C, D]
    return swiglu(rows.reshape(num_experts, cap, d), w1, w3, w2).reshape(num_experts * cap, d)
  return run_rows(x, weights, slot_row, num_experts * cap, experts_fn, dtype)


@DISPATCHERS.register("capacity")
def capacity(x, route, w1, w3, w2, *, dtype, capacity_factor, top_k, grouped_matmul=None, loop_block=None):
  """GShard (Lepikhin et al. 2020) / Switch (Fedus et al. 2021) capacity dispatch. Semantically the
  one-hot dispatch/combine tensors [N, E, C] of those papers; built as row gathers instead of einsums
  with [N, E, C] one-hots (which cost O(N^2) FLOPs per group). Experts run as one batched matmul over
  [E, C, D] with the weights as they are."""
  num_experts = w1.shape[0]
  cap = expert_capacity(x.shape[0], num_experts, top_k, capacity_factor)
  used = route.weights != 0
  rank, _ = slot_ranks(route.experts, used, num_experts, route.priority)
  kept = used & (rank < cap)
  y = _buffered(x, route.weights, route.experts, rank, kept, cap, cast(w1, dtype), cast(w3, dtype),
                cast(w2, dtype), dtype)
  return y, _drop_stats(used, kept)


# Buffer rows per expert, relative to a perfectly balanced load, that dropless dispatch tries first on
# CPU. Random and load-balanced routers stay below it; when any expert overflows, the padded blocks run.
FAST_CAPACITY = 1.125


@DISPATCHERS.register("dropless")
def dropless(x, route, w1, w3, w2, *, dtype, grouped_matmul="auto", top_k=None, capacity_factor=None,
             loop_block=None, block_size=None, fast_capacity=FAST_CAPACITY):
  """Dropless MoE (MegaBlocks, Gale et al. 2022, arXiv:2211.15841): every used slot is computed. Rows are
  grouped by expert (ranks from a running count, no sort needed), then
    blocks:     if every expert's load fits ceil(fast_capacity * S / E) rows (S slots), per-expert buffers
                through one batched matmul with the weights as they are; otherwise (lax.cond, decided
                at run time) each expert's group padded to whole blocks of `block_size` rows (default:
                grouped.default_block_size), one batched matmul over blocks with per-block weights.
                Both branches are exact; the buffers only skip the per-block weight copies and padding.
    loop | ragged_dot | tokamax | megablox: contiguous groups through that grouped matmul (gmm.py:
                forward and backward without padding or per-block weight copies)."""
  num_experts = w1.shape[0]
  num_slots = route.experts.size
  used = route.weights != 0
  rank, counts = slot_ranks(route.experts, used, num_experts)
  w1, w3, w2 = cast(w1, dtype), cast(w3, dtype), cast(w2, dtype)  # AdaptedExperts stay unmerged
  impl = resolve_grouped_matmul(grouped_matmul or "auto")
  if impl != "blocks":  # contiguous groups through a grouped matmul (gmm.GMMS)
    starts = jnp.cumsum(counts) - counts  # [E]
    slot_row = jnp.where(used, starts[route.experts] + rank, num_slots)  # [N, k]
    experts_fn = lambda rows: swiglu_ragged(rows, counts, w1, w3, w2, impl)  # noqa: E731
    return run_rows(x, route.weights, slot_row, num_slots, experts_fn, dtype), _drop_stats(used, used)

  block = block_size or default_block_size(num_slots, num_experts)
  starts, block_expert, num_blocks = block_layout(counts, num_slots, block)
  cap = math.ceil(fast_capacity * num_slots / num_experts) if fast_capacity else 0

  def via_blocks(checkpoint=False):
    slot_row = jnp.where(used, starts[route.experts] + rank, num_blocks * block)  # [N, k]
    experts_fn = lambda rows: swiglu_blocks(rows, block_expert, w1, w3, w2)  # noqa: E731
    if checkpoint:  # inside lax.cond: keep the per-block weight copies out of the saved residuals
      experts_fn = jax.checkpoint(experts_fn, policy=jax.checkpoint_policies.checkpoint_dots)
    return run_rows(x, route.weights, slot_row, num_blocks * block, experts_fn, dtype)

  if 0 < num_experts * cap < num_blocks * block:  # buffers would be the smaller layout
    y = jax.lax.cond(jnp.max(counts) <= cap,
                     lambda: _buffered(x, route.weights, route.experts, rank, used, cap, w1, w3, w2, dtype),
                     lambda: via_blocks(checkpoint=True))
  else:
    y = via_blocks()
  return y, _drop_stats(used, used)
