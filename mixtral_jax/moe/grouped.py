"""Building blocks of sparse dispatch: row permutations whose backward pass is a gather, and SwiGLU
experts applied to rows grouped by expert (batched, padded blocks, or ragged_dot). Expert weights may be
AdaptedExperts (moe/adapted.py: per-expert LoRA), whose adapters run through the same matmuls.

Why a custom VJP for row gathers: the transpose of a gather is a scatter-add, which XLA:CPU runs as a
slow serial loop and which made a straightforward capacity-dispatch training step slower than PyTorch.
Every gather here moves rows through a partial one-to-one map between slots and buffer rows, so its
transpose is the inverse gather — matmul-free, scatter-free, and as fast as the forward.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mixtral_jax.moe.adapted import product, take_experts

# "blocks": padded blocks with per-block weight copies (below); the rest are gmm.GMMS implementations.
GROUPED_MATMULS = ("auto", "blocks", "loop", "ragged_dot", "tokamax", "megablox", "megablox_interpret")


def _take(src: jax.Array, index: jax.Array) -> jax.Array:
  """Rows of src; an out-of-range index (the sentinel len(src)) reads zeros."""
  return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def take_rows(src: jax.Array, index: jax.Array, readers: jax.Array) -> jax.Array:
  """out[r] = src[index[r]] (zeros where index[r] == len(src)).

  src [S, D]; index [R] int32; readers [S, m] int32: the rows r with index[r] == s (padded with the
  sentinel R). Each src row may be read by up to m rows, each out row reads at most one src row, and the
  two maps must agree; then the backward pass is dsrc[s] = sum_m dout[readers[s, m]], also a gather.
  """
  return _take(src, index)


def _take_rows_fwd(src, index, readers):
  return _take(src, index), (index, readers)


def _take_rows_bwd(res, grad):
  index, readers = res
  s, m = readers.shape
  dsrc = _take(grad, readers.reshape(-1))  # [S * m, D]
  if m > 1:
    dsrc = jnp.sum(dsrc.reshape(s, m, -1), axis=1)
  return dsrc, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _batched(h: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.einsum("gci,gio->gco", h, w)  # [G, C, In] x [G, In, Out] -> [G, C, Out]


def swiglu(x: jax.Array, w1, w3, w2) -> jax.Array:
  """Experts applied group-wise: x [G, C, D], w1/w3 [G, D, F], w2 [G, F, D] -> [G, C, D]. A weight may be
  AdaptedExperts (adapters [G, D, r] / [G, r, F]): its low-rank products are batched einsums as well."""
  gate = product(_batched, x, w1)  # [G, C, F] (adapters: [G, C, r] -> [G, C, F])
  up = product(_batched, x, w3)  # [G, C, F]
  return product(_batched, jax.nn.silu(gate) * up, w2)  # [G, C, D] (adapters: [G, C, r] -> [G, C, D])


def resolve_grouped_matmul(name: str) -> str:
  """'auto' -> this backend's default from execution.BACKENDS (the one place it is decided)."""
  if name not in GROUPED_MATMULS:
    raise ValueError(f"grouped_matmul={name!r} is not one of {', '.join(GROUPED_MATMULS)}")
  if name == "auto":
    from mixtral_jax.execution import backend_defaults
    return backend_defaults()["grouped_matmul"]
  return name


def default_block_size(num_slots: int, num_experts: int) -> int:
  """Rows per block for the padded-blocks path: a power of two near num_slots / (4 E), within [1, 256].

  Padding costs up to E * (block - 1) extra rows of compute (here <= 1/4 of the active rows); smaller
  blocks mean more per-block weight copies and smaller matmuls (measured on 2 CPU cores at 8192 slots:
  256-row blocks beat 128 and 64). A handful of slots (decoding) gets one slot per block: each token
  then reads only the weights of its own k experts.
  """
  target = max(1, num_slots // (4 * num_experts))
  return int(min(256, 2 ** int(math.log2(target))))


def block_layout(counts: jax.Array, num_slots: int, block: int):
  """Per-expert groups padded to whole blocks. counts [E] int32 (sum <= num_slots) ->
  (group start row [E], expert of each block [NB], NB). NB is static: the padded total never exceeds
  num_slots + E * (block - 1), rounded down to a whole number of blocks."""
  num_experts = counts.shape[0]
  num_blocks = max(1, (num_slots + num_experts * (block - 1)) // block)
  padded = (counts + block - 1) // block * block  # [E]
  ends = jnp.cumsum(padded)  # [E]
  block_starts = jnp.arange(num_blocks, dtype=jnp.int32) * block  # [NB]
  block_expert = jnp.sum(ends[None, :] <= block_starts[:, None], axis=1)  # [NB]
  # Blocks past the last group hold only zero rows; any expert will do.
  return ends - padded, jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32), num_blocks


def swiglu_blocks(rows: jax.Array, block_expert: jax.Array, w1, w3, w2) -> jax.Array:
  """rows [NB * b, D] grouped by expert in whole blocks -> [NB * b, D] via one batched matmul per weight.

  Each block's expert weights are gathered ([NB, D, F]); their gradient is a segment sum over blocks.
  AdaptedExperts weights gather their adapters per block too ([NB, D, r], [NB, r, F]).
  """
  nb = block_expert.shape[0]
  x = rows.reshape(nb, rows.shape[0] // nb, rows.shape[1])  # [NB, b, D]
  g1, g3, g2 = (take_experts(w, block_expert) for w in (w1, w3, w2))  # [NB, D, F], [NB, F, D]
  return swiglu(x, g1, g3, g2).reshape(rows.shape)


def swiglu_ragged(rows: jax.Array, group_sizes: jax.Array, w1, w3, w2, impl: str = "ragged_dot") -> jax.Array:
  """rows [R, D] sorted by expert (group e has group_sizes[e] rows; rows past the groups are zero),
  through the grouped matmul `impl` (gmm.GMMS). An AdaptedExperts weight runs its adapters through the
  same grouped matmul and group sizes: gmm(gmm(rows, a), b), no dense per-expert delta."""
  from mixtral_jax.moe.gmm import gmm

  def grouped(h, w):  # [R, In] x [E, In, Out] -> [R, Out], row r times its group's weight
    return gmm(h, w, group_sizes, impl=impl)
  gate = product(grouped, rows, w1)  # [R, F] (adapters: [R, r] -> [R, F])
  up = product(grouped, rows, w3)  # [R, F]
  return product(grouped, jax.nn.silu(gate) * up, w2)  # [R, D] (adapters: [R, r] -> [R, D])
