"""Expert parallelism: expert weights split over the mesh's `expert` axis; tokens travel to them and back.

Two dispatch strategies, registered in DISPATCHERS (same signature and stats as mixtral_jax.moe.dispatch):

  ep_capacity  `capacity` per token shard: each shard fills [E, C, D] buffer rows for its n tokens
               (C = dispatch.expert_capacity(n, ...), same claim order and drops as `capacity`), one
               all_to_all sends every expert its rows, the local experts run as one batched matmul, a
               second all_to_all brings the results back.
  ep_dropless  `dropless` across devices: rows grouped by expert are sent with `ragged_all_to_all` (exactly
               the rows each device needs), regrouped by local expert, run through the grouped matmul of
               `grouped_matmul` (gmm.py per backend, or padded blocks), and sent back the same
               way. XLA:CPU has no ragged all-to-all: on CPU the exchange is a padded all_to_all (blocks of
               n*k rows per device pair) driven by the same offsets.

Inside `sharding.use_mesh(...)` both run under jax.shard_map: tokens split over the `batch` rule's axes (plus
`expert`), expert weights over `expert` (E) and `tensor` (F; partial outputs summed over `tensor`), the
fsdp-split D gathered by XLA on the way in. Without a mesh, the per-shard code runs once (ep_capacity then
equals `capacity` exactly, ep_dropless equals `dropless`), so a config moves between one device and a mesh
unchanged. Capacity is per token shard (as in GShard), so with drops the result depends on how the batch is
split; with nothing dropped every strategy equals `dense`.

ep_dropless's receive buffer is static, so it has room for the worst case (every peer sends all its rows
here: `expert` x n*k rows) and the grouped matmul runs over it: memory, and on CPU FLOPs, grow with the
size of the expert axis. Row moves use grouped.take_rows, whose backward pass is a gather, not a scatter.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixtral_jax.parallel import sharding
from mixtral_jax.config import ConfigError
from mixtral_jax.moe.dispatch import DISPATCHERS, expert_capacity, run_rows, slot_ranks
from mixtral_jax.moe.grouped import (block_layout, default_block_size, resolve_grouped_matmul, swiglu, swiglu_blocks,
                                 swiglu_ragged, take_rows)


@dataclasses.dataclass(frozen=True)
class Axes:
  """Mesh axes one shard talks over (empty tuples = no communication) and the expert-axis size."""
  tokens: tuple = ()   # tokens are split over these (a psum over them counts all tokens)
  expert: tuple = ()   # all-to-all group: experts are split over these
  tensor: tuple = ()   # expert FFN width split: outputs are summed over these
  num_expert_shards: int = 1


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _stats(used, kept, axes: Axes):
  """dispatch's statistics over all token shards: dropped / used slots, tokens left with the residual."""
  lost = jnp.any(used, axis=-1) & ~jnp.any(kept, axis=-1)  # [n]
  dropped = _psum(jnp.sum(used & ~kept).astype(jnp.float32), axes.tokens)
  total = _psum(jnp.sum(used).astype(jnp.float32), axes.tokens)
  return {"dropped_fraction": dropped / jnp.maximum(total, 1.0),
          "dropped_tokens": _psum(jnp.sum(lost).astype(jnp.float32), axes.tokens)}


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def _inverse(index, size: int):
  """index [R] (sentinel >= size) -> inverse [size] with inverse[index[r]] = r, sentinel R elsewhere."""
  r = index.shape[0]
  return jnp.full((size,), r, jnp.int32).at[index].set(jnp.arange(r, dtype=jnp.int32), mode="drop")


# --- ep_capacity ---------------------------------------------------------------------------------------------

def capacity_shard(x, experts, weights, priority, w1, w3, w2, *, num_experts, top_k, capacity_factor, dtype,
                   axes: Axes, grouped_matmul=None):
  """One token shard. x [n, D], experts/weights [n, k], local experts w1/w3 [El, D, F'], w2 [El, F', D]."""
  del grouped_matmul
  n, d = x.shape
  ep = axes.num_expert_shards
  cap = expert_capacity(n, num_experts, top_k, capacity_factor)
  used = weights != 0
  rank, _ = slot_ranks(experts, used, num_experts, priority)
  kept = used & (rank < cap)
  slot_row = jnp.where(kept, experts * cap + rank, num_experts * cap)  # [n, k]

  def experts_fn(rows):  # [E * C, D] by global expert -> the same rows, through the experts
    buf = rows.reshape(ep, num_experts // ep, cap, d)  # [ep dst, El, C, D]
    if axes.expert:
      buf = jax.lax.all_to_all(buf, axes.expert, 0, 0, tiled=True)  # [ep src, El, C, D]
    local = buf.transpose(1, 0, 2, 3).reshape(buf.shape[1], ep * cap, d)  # [El, ep*C, D]
    out = _psum(swiglu(local, w1.astype(dtype), w3.astype(dtype), w2.astype(dtype)), axes.tensor)
    out = out.reshape(buf.shape[1], ep, cap, d).transpose(1, 0, 2, 3)  # [ep src, El, C, D]
    if axes.expert:
      out = jax.lax.all_to_all(out, axes.expert, 0, 0, tiled=True)  # back: [ep, El, C, D]
    return out.reshape(num_experts * cap, d)

  y = run_rows(x, weights, slot_row, num_experts * cap, experts_fn, dtype)
  return y, _stats(used, kept, axes)


# --- ep_dropless ---------------------------------------------------------------------------------------------

def exchange(operand, out_rows: int, input_offsets, send_sizes, output_offsets, recv_sizes, axes: Axes,
             ragged: bool, block: int):
  """ragged_all_to_all semantics: rows operand[input_offsets[j] : +send_sizes[j]] land on device j at
  output_offsets[j] of its [out_rows, D] result. `ragged=False` emulates it with a padded all_to_all of
  [ep, block, D]; `block` bounds every send_sizes[j]."""
  if ragged:
    # zeros_like keeps the operand's varying-over-mesh-axes type (jnp.zeros would be invariant, and the
    # result, which takes the output buffer's type, would then not match its cotangent).
    output = jnp.zeros_like(operand, shape=(out_rows,) + operand.shape[1:])
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axes.expert)
  ep, m = send_sizes.shape[0], operand.shape[0]
  steps = jnp.arange(block, dtype=jnp.int32)
  send_index = jnp.where(steps < send_sizes[:, None], input_offsets[:, None] + steps, m).reshape(-1)  # [ep*b]
  sent = take_rows(operand, send_index, _inverse(send_index, m)[:, None])  # [ep*block, D]
  received = jax.lax.all_to_all(sent.reshape(ep, block, -1), axes.expert, 0, 0, tiled=True)  # [ep src, b, D]
  at = jax.lax.all_to_all(output_offsets, axes.expert, 0, 0, tiled=True)  # [ep src]: where theirs go here
  place = jnp.where(steps < recv_sizes[:, None], at[:, None] + steps, out_rows).reshape(-1)  # [ep*block]
  return take_rows(received.reshape(ep * block, -1), _inverse(place, out_rows), place[:, None])


def _local_grouped(received, recv_counts, w1, w3, w2, dtype, axes: Axes, grouped_matmul: str):
  """received [R, D] holds runs (source, local expert) in that order, recv_counts [ep, El] long; regroups
  them by local expert, runs the grouped SwiGLU, and returns the outputs in `received`'s order."""
  ep, local_experts = recv_counts.shape
  size = received.shape[0]
  counts = recv_counts.reshape(-1)  # [ep*El]
  run_ends = jnp.cumsum(counts)
  run = jnp.searchsorted(run_ends, jnp.arange(size, dtype=jnp.int32), side="right")  # [R]
  valid = run < ep * local_experts
  run = jnp.minimum(run, ep * local_experts - 1)
  expert = run % local_experts
  earlier = (jnp.cumsum(recv_counts, axis=0) - recv_counts).reshape(-1)  # rows of this expert from lower sources
  rank = earlier[run] + jnp.arange(size, dtype=jnp.int32) - (run_ends - counts)[run]  # [R] rank in its expert
  group_sizes = recv_counts.sum(0)  # [El]
  w1, w3, w2 = w1.astype(dtype), w3.astype(dtype), w2.astype(dtype)
  impl = resolve_grouped_matmul(grouped_matmul)
  if impl == "loop":  # its custom VJP cannot yet type cotangents by mesh axes inside shard_map (vma)
    impl = "blocks"
  if impl != "blocks":  # a grouped matmul over contiguous groups (gmm.GMMS)
    starts, num_rows = _exclusive_cumsum(group_sizes), size
    experts_fn = lambda rows: swiglu_ragged(rows, group_sizes, w1, w3, w2, impl)  # noqa: E731
  else:
    block = default_block_size(size, local_experts)
    starts, block_expert, num_blocks = block_layout(group_sizes, size, block)
    num_rows = num_blocks * block
    experts_fn = lambda rows: swiglu_blocks(rows, block_expert, w1, w3, w2)  # noqa: E731
  dest = jnp.where(valid, starts[expert] + rank, num_rows)  # [R] row in the grouped layout
  source = _inverse(dest, num_rows)  # [num_rows]
  out = _psum(experts_fn(take_rows(received, source, dest[:, None])), axes.tensor)  # [num_rows, D]
  return take_rows(out, dest, source[:, None])  # [R, D]


def dropless_shard(x, experts, weights, priority, w1, w3, w2, *, num_experts, top_k, capacity_factor, dtype,
                   axes: Axes, grouped_matmul="auto", ragged=False):
  """One token shard, no slot dropped. Shapes as capacity_shard."""
  del priority, capacity_factor
  used = weights != 0
  if not axes.expert:  # nothing to exchange: the single-device strategy, outputs summed over `tensor`
    route = SimpleNamespace(experts=experts, weights=weights, priority=None)
    y, _ = DISPATCHERS.get("dropless")(x, route, w1, w3, w2, dtype=dtype, top_k=top_k,
                                       grouped_matmul=grouped_matmul)
    return _psum(y, axes.tensor), _stats(used, used, axes)
  ep = axes.num_expert_shards
  m = experts.size  # rows this shard sends: one per slot, grouped by global expert (unused slots last)
  rank, counts = slot_ranks(experts, used, num_experts)
  slot_row = jnp.where(used, _exclusive_cumsum(counts)[experts] + rank, m)  # [n, k]

  def experts_fn(rows):  # [m, D] grouped by global expert
    per_dest = counts.reshape(ep, num_experts // ep)  # [ep dst, El] rows for each device, per its expert
    send_sizes = per_dest.sum(1)  # [ep]
    input_offsets = _exclusive_cumsum(send_sizes)
    recv_counts = jax.lax.all_to_all(per_dest, axes.expert, 0, 0, tiled=True)  # [ep src, El]
    recv_sizes = recv_counts.sum(1)  # [ep src]
    recv_offsets = _exclusive_cumsum(recv_sizes)  # where each source's rows start here
    output_offsets = jax.lax.all_to_all(recv_offsets, axes.expert, 0, 0, tiled=True)  # [ep dst]
    received = exchange(rows, ep * m, input_offsets, send_sizes, output_offsets, recv_sizes, axes, ragged,
                        block=m)  # worst case: every source sends me all m rows
    out = _local_grouped(received, recv_counts, w1, w3, w2, dtype, axes, grouped_matmul)
    back_offsets = jax.lax.all_to_all(input_offsets, axes.expert, 0, 0, tiled=True)  # [ep src]
    # Each source sent me at most its m rows, so `m` also bounds what goes back to one device.
    return exchange(out, m, recv_offsets, recv_sizes, back_offsets, send_sizes, axes, ragged, block=m)

  y = run_rows(x, weights, slot_row, m, experts_fn, dtype)
  return y, _stats(used, used, axes)


# --- the shard_map wrapper -----------------------------------------------------------------------------------

def mesh_axes(mesh, rules, num_experts: int, ffn_dim: int) -> Axes:
  """Which mesh axes the shards talk over, from the sharding rules; checks the sizes divide."""
  live = lambda name: tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1)  # noqa: E731
  expert, tensor = live("expert"), live("mlp")
  tokens = live("batch") + tuple(a for a in expert if a not in live("batch"))
  if set(tensor) & set(tokens):
    raise ConfigError(f"config.mesh.rules: 'mlp' axes {tensor} overlap the token axes {tokens}")
  ep = math.prod(mesh.shape[a] for a in expert)
  if num_experts % ep:
    raise ConfigError(f"config.model.num_experts={num_experts} is not divisible by the {ep} expert shards "
                      f"(config.mesh.expert)")
  tp = math.prod(mesh.shape[a] for a in tensor)
  if ffn_dim % tp:
    raise ConfigError(f"config.model.ffn_dim={ffn_dim} is not divisible by the {tp} tensor shards "
                      f"(config.mesh.tensor)")
  return Axes(tokens=tokens, expert=expert, tensor=tensor, num_expert_shards=ep)


def _spec(axes: tuple):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def run_sharded(shard_fn, x, route, w1, w3, w2, **kwargs):
  """Runs `shard_fn` per token shard under shard_map on the active mesh, or once without one."""
  num_experts = w1.shape[0]
  kwargs.setdefault("top_k", None)
  kwargs["top_k"] = kwargs["top_k"] or route.experts.shape[1]
  args = (x, route.experts, route.weights, route.priority, w1, w3, w2)
  active = sharding.current()
  if active is None:
    return shard_fn(*args, num_experts=num_experts, axes=Axes(), **kwargs)
  mesh, rules = active
  axes = mesh_axes(mesh, rules, num_experts, w1.shape[-1])
  if x.shape[0] % math.prod(mesh.shape[a] for a in axes.tokens):
    # E.g. decoding one token on a big mesh: one shard, and GSPMD gathers what it needs (correct, not fast;
    # capacity then counts over all tokens at once).
    return shard_fn(*args, num_experts=num_experts, axes=Axes(), **kwargs)
  tok, ep, tp = _spec(axes.tokens), _spec(axes.expert), _spec(axes.tensor)
  body = functools.partial(shard_fn, num_experts=num_experts, axes=axes, **kwargs)
  in_specs = (P(tok, None), P(tok, None), P(tok, None), None if route.priority is None else P(tok),
              P(ep, None, tp), P(ep, None, tp), P(ep, tp, None))
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P(tok, None), P()))
  return fn(*args)


@DISPATCHERS.register("ep_capacity")
def ep_capacity(x, route, w1, w3, w2, *, dtype, capacity_factor=1.25, top_k=None, grouped_matmul=None,
                loop_block=None):
  """Expert-parallel capacity dispatch (GShard): `capacity` per token shard, all-to-all to the experts."""
  return run_sharded(capacity_shard, x, route, w1, w3, w2, dtype=dtype, capacity_factor=capacity_factor,
                     top_k=top_k)


@DISPATCHERS.register("ep_dropless")
def ep_dropless(x, route, w1, w3, w2, *, dtype, capacity_factor=None, top_k=None, grouped_matmul="auto",
                loop_block=None):
  """Expert-parallel dropless dispatch: ragged_all_to_all (padded all_to_all on CPU) + grouped matmul."""
  ragged = jax.default_backend() != "cpu"
  return run_sharded(dropless_shard, x, route, w1, w3, w2, dtype=dtype, capacity_factor=capacity_factor,
                     top_k=top_k, grouped_matmul=grouped_matmul or "auto", ragged=ragged)
