"""Inference dispatch strategies that read each routed expert's weights once, and never copy them.

Registered into dispatch.DISPATCHERS (same signature as the strategies there), chosen by generation:
  routed_cond  decode (few tokens): one `lax.cond` per expert, skipped unless some token chose it; the
               expert runs on all N tokens (N is tiny) scaled by its combine weight. Batch-1 decode reads
               k experts per layer instead of E (dense) and does no gather of weights.
  sorted_loop  prefill (many tokens): routing slots sorted by expert; each expert runs a loop over
               blocks of `block` of its slots (`[block, D] @ [D, F]` matmuls), then its remaining rows as
               one block of block/4, block/2, 3 block/4 or block rows: the FLOPs are the active ones plus
               less than block/4 rows per expert.
Both take the expert weights as a stacked [E, ...] array, or as an `ExpertList` of E separate buffers
(the "unstacked" layout, model.py): XLA:CPU cannot feed a slice of a larger buffer to a matmul without copying
it first, which for decode triples the bytes an expert costs (read, write the copy, read it again).
Weights may be QTensors (quant.py): only the chosen experts are dequantized. They may be AdaptedExperts
(adapted.py, per-expert LoRA): each chosen expert runs x W + s (x A) B with its own adapters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.moe.adapted import product
from mixtral_jax.moe.dispatch import DISPATCHERS, _drop_stats, combine_matrix
from mixtral_jax.inference.quant import matmul, take_expert


@struct.dataclass
class ExpertList:
  """E expert weights as separate buffers (arrays or QTensors), shaped like a stacked [E, ...] array."""
  parts: tuple

  @property
  def shape(self) -> tuple:
    return (len(self.parts),) + tuple(self.parts[0].shape)

  @property
  def nbytes(self) -> int:
    return sum(p.nbytes for p in self.parts)

  def __getitem__(self, index):
    if index is Ellipsis:  # nnx.Param[...] returns the stored value
      return self
    return self.parts[index]

  def astype(self, dtype):  # dense fallback: materialises the stack
    return jnp.stack([p.astype(dtype) for p in self.parts])


def expert(w, j: int):
  """Expert j's weight: a separate buffer for an ExpertList, a slice (copied by XLA) otherwise."""
  return w.parts[j] if isinstance(w, ExpertList) else take_expert(w, j)


def swiglu(x, w1, w3, w2, dtype):  # [M, D] -> [M, D]; one expert's weights (AdaptedExperts: [In, r], [r, Out])
  mm = lambda h, w: matmul(h, w, dtype)  # noqa: E731  [M, In] x [In, Out] -> [M, Out]
  h = jax.nn.silu(product(mm, x, w1)) * product(mm, x, w3)  # [M, F]
  return product(mm, h, w2)  # [M, D]


@DISPATCHERS.register("routed_cond")
def routed_cond(x, route, w1, w3, w2, *, dtype, top_k=None, capacity_factor=None, grouped_matmul=None, loop_block=None):
  num_experts = w1.shape[0]
  x = x.astype(dtype)
  combine = combine_matrix(route, num_experts).astype(dtype)  # [N, E]
  y = jnp.zeros(x.shape, dtype)
  for j in range(num_experts):
    def run(x, j=j):  # the weights are picked inside the branch: untaken experts are never touched
      return swiglu(x, expert(w1, j), expert(w3, j), expert(w2, j), dtype) * combine[:, j, None]
    y = y + jax.lax.cond(jnp.any(combine[:, j] > 0), run, jnp.zeros_like, x)  # [N, D]
  used = route.weights != 0
  return y, _drop_stats(used, used)  # nothing is dropped


TAIL_STEPS = 4  # sizes of an expert's last block in `sorted_loop`: loop_block * (1..TAIL_STEPS) / TAIL_STEPS


@DISPATCHERS.register("sorted_loop")
def sorted_loop(x, route, w1, w3, w2, *, dtype, loop_block=128, top_k=None, capacity_factor=None,
                grouped_matmul=None):
  """Forward: the loop below. Backward: `dropless`'s (the loop's trip counts are data-dependent, which
  reverse-mode cannot differentiate; both compute the same function, so the gradient is exact)."""
  from mixtral_jax.moe.dispatch import dropless

  def forward(x, route, w1, w3, w2):
    return _sorted_loop(x, route, w1, w3, w2, dtype=dtype, block=loop_block)

  def reference(x, route, w1, w3, w2):
    as_stack = lambda w: w.astype(dtype) if isinstance(w, ExpertList) else w  # noqa: E731
    return dropless(x, route, as_stack(w1), as_stack(w3), as_stack(w2), dtype=dtype, grouped_matmul="blocks")

  @jax.custom_vjp
  def run(*args):
    return forward(*args)

  def run_fwd(*args):
    return forward(*args), args

  def run_bwd(args, cotangent):
    return jax.vjp(reference, *args)[1](cotangent)

  run.defvjp(run_fwd, run_bwd)
  return run(x, route, w1, w3, w2)


def _sorted_loop(x, route, w1, w3, w2, *, dtype, block):
  n, d = x.shape
  k = route.experts.shape[1]
  num_experts = w1.shape[0]
  slots = n * k
  bk = min(block, slots)
  step = max(1, bk // TAIL_STEPS)
  tails = list(range(step, bk, step)) + [bk]  # last-block sizes: the smallest that holds the remainder
  flat = route.experts.reshape(slots)  # [N*k] expert of each routing slot
  order = jnp.argsort(flat, stable=True)  # [N*k] slots sorted by expert
  counts = jnp.bincount(flat, length=num_experts)  # [E]
  starts = jnp.cumsum(counts) - counts  # [E] first sorted row of each expert
  xs = jnp.take(x.astype(dtype), order // k, axis=0)  # [N*k, D] tokens in expert order
  xs = jnp.concatenate([xs, jnp.zeros((bk, d), dtype)])  # room for the last partial block
  out = jnp.zeros((slots + bk, d), dtype)
  for j in range(num_experts):
    # Experts run in order: whole blocks, then one block of the smallest tail size that holds the rest.
    # A tail larger than the rest spills garbage into the next expert's rows, which that expert then
    # overwrites (the last one spills into the padding).
    ws = (expert(w1, j), expert(w3, j), expert(w2, j))

    def run(out, row, size, ws=ws):
      xb = jax.lax.dynamic_slice_in_dim(xs, row, size)  # [size, D]
      return jax.lax.dynamic_update_slice_in_dim(out, swiglu(xb, *ws, dtype), row, axis=0)

    whole = counts[j] // bk
    out = jax.lax.fori_loop(0, whole, lambda i, out, j=j: run(out, starts[j] + i * bk, bk), out)
    tail_row, rest = starts[j] + whole * bk, counts[j] - whole * bk
    branches = [lambda out: out] + [lambda out, size=size, row=tail_row: run(out, row, size) for size in tails]
    pick = jnp.sum(rest > jnp.asarray([0] + tails[:-1]))  # 0 when nothing is left, else 1 + tail index
    out = jax.lax.switch(pick, branches, out)
  sorted_row = jnp.zeros((slots,), jnp.int32).at[order].set(jnp.arange(slots, dtype=jnp.int32))  # [N*k]
  per_slot = jnp.take(out, sorted_row, axis=0)  # [N*k, D] back in slot order (a gather, not a scatter)
  y = jnp.einsum("nkd,nk->nd", per_slot.reshape(n, k, d), route.weights.astype(dtype))
  used = route.weights != 0
  return y, _drop_stats(used, used)  # nothing is dropped
