"""Per-expert LoRA on the routed rows: an expert weight with its adapters, which dispatch computes through.

LoRA (Hu et al. 2021, arXiv:2106.09685) on expert weights W [E, In, Out] with per-expert adapters
A [E, In, r], B [E, r, Out] computes, for the rows routed to expert e,

    y = x W_e + s (x A_e) B_e        (s = alpha / r)

with the adapter products through the same grouped matmul and group sizes as W. Merging W + s A B instead
builds a dense per-expert delta every step: E In Out r 2 FLOPs, a full extra copy of the expert weights, and
as much again in the backward pass (d(A B) [E, In, Out]); the low-rank path costs 2 M r (In + Out) FLOPs for
M routed rows and keeps only [M, r] intermediates.

How it plugs in, like `QTensor` (inference/quant.py) and `ExpertList` (dispatch_decode.py): AdaptedExperts is
the *value* of the expert's nnx.Param (lora.apply builds the tree). In the stacked layout its leaves carry
the leading L axis and lax.scan slices them per layer. Strategies that know it cast it with `cast` and run
each weight's matmul through `product`; any other code calls `astype` and gets the merged dense weight,
which is exact (the reference path: `dense` dispatch). Expert-parallel dispatch passes each weight through
shard_map with one PartitionSpec per weight, which does not fit the adapter leaves: for those strategies
(not in TAKES_ADAPTERS) LoRA merges the expert weights before the model runs (correct, not grouped).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

# Dispatch strategies (dispatch.DISPATCHERS names) that take an AdaptedExperts weight as is: grouped
# (capacity, dropless, sorted_loop, routed_cond) or merged on the spot (dense, the reference).
TAKES_ADAPTERS = ("dense", "capacity", "dropless", "sorted_loop", "routed_cond")


@struct.dataclass
class AdaptedExperts:
  """Expert weights with low-rank adapters, shaped like the base: base [*lead, E, In, Out] (an array or a
  QTensor), a [*lead, E, In, r], b [*lead, E, r, Out]; the weight they stand for is base + scale * a @ b."""
  base: Any
  a: jax.Array
  b: jax.Array
  scale: float = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple:
    return tuple(self.base.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    return self.base.dtype

  def __getitem__(self, index):
    """Ellipsis: self (nnx.Param[...] returns the stored value); otherwise the same index on every leaf's
    leading axes, e.g. expert j's [In, Out] weight with its [In, r] and [r, Out] adapters (take_expert)."""
    if index is Ellipsis:
      return self
    return jax.tree.map(lambda leaf: leaf[index], self)

  def astype(self, dtype) -> jax.Array:
    """The merged dense weight base + scale * a @ b in `dtype` (float32 arithmetic): the reference path."""
    delta = jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))  # [.., In, Out]
    return (self.base.astype(jnp.float32) + self.scale * delta).astype(dtype)


def cast(w, dtype):
  """An expert weight in the compute dtype: arrays and QTensors as `astype` (dequantized), AdaptedExperts with
  each part cast (a QTensor base dequantized), still unmerged."""
  if isinstance(w, AdaptedExperts):
    return AdaptedExperts(w.base.astype(dtype), w.a.astype(dtype), w.b.astype(dtype), w.scale)
  return w.astype(dtype)


def product(matmul: Callable, x, w):
  """matmul(x, w) for a plain weight; for AdaptedExperts matmul(x, base) + scale * matmul(matmul(x, a), b),
  so the adapters go through the same (grouped, batched, per-expert) matmul as the base weight.
  matmul(x [.., In], w [.., In, Out]) -> [.., Out], whatever the leading axes."""
  if isinstance(w, AdaptedExperts):
    low = matmul(matmul(x, w.a), w.b)  # [.., r] then [.., Out]
    return matmul(x, w.base) + w.scale * low  # [.., Out]
  return matmul(x, w)


def take_experts(w, index: jax.Array):
  """w[index] on the expert axis (0) of an array or of every leaf of an AdaptedExperts: index [NB] -> [NB, ...]
  (the padded-blocks path's per-block weights; the adapters' copies are [NB, In, r] and [NB, r, Out])."""
  return jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=0), w)


def takes_adapters(dispatch: str) -> bool:
  """Whether the dispatch strategy `dispatch` computes AdaptedExperts weights itself (TAKES_ADAPTERS)."""
  return dispatch in TAKES_ADAPTERS
