"""Expert parallelism: expert weights split over the mesh's `expert` axis; tokens travel to them and back.

Two dispatch strategies, registered in DISPATCHERS (same signature as mixtral_jax.dispatch):

  ep_capacity  GShard-style. Each token shard fills an [E, C, D] buffer (C = ceil(capacity_factor * n * k / E)
               slots per expert for its n local tokens, first choices before second choices; the rest are
               dropped and pass through the residual), one all_to_all sends every expert its slots, the
               experts run as one batched matmul, a second all_to_all brings the results back.
  ep_dropless  Every assignment is kept. Rows are sorted by expert, sent with `ragged_all_to_all` (exactly
               the rows each device needs), regrouped by local expert, run through `ragged_dot`, and sent
               back the same way. XLA:CPU has no ragged all-to-all, so on CPU the exchange is emulated by a
               padded all_to_all (blocks of the worst case n*k rows per device pair) with the same offsets.

Inside `sharding.use_mesh(...)` both run under jax.shard_map: tokens split over the `batch` rule's axes (plus
`expert`), expert weights over `expert` (E) and `tensor` (F; partial outputs are summed over `tensor`), the
fsdp-split D gathered by XLA on the way in. Without a mesh the same per-shard code runs with one shard, so a
config moves between one device and a mesh unchanged. Capacity is per token shard, so with drops the result
depends on how tokens are split (as in GShard); with nothing dropped both equal the dense reference.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixtral_jax import sharding
from mixtral_jax.config import ConfigError
from mixtral_jax.dispatch import DISPATCHERS


@dataclasses.dataclass(frozen=True)
class Axes:
  """Mesh axes one shard talks over (empty tuples = no communication) and their sizes."""
  tokens: tuple = ()   # tokens are split over these (a psum over them counts all tokens)
  expert: tuple = ()   # all-to-all group: experts are split over these
  tensor: tuple = ()   # expert FFN width split: outputs are summed over these
  num_expert_shards: int = 1


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert for `num_tokens` tokens: ceil(cf * n * k / E), at least 1, at most n (a token picks an
  expert at most once, so n slots can never overflow)."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _expert_ffn(xe, w1, w3, w2, dtype, axes: Axes):
  """SwiGLU per local expert. xe [El, M, D], w1/w3 [El, D, F'], w2 [El, F', D] -> [El, M, D]."""
  gate = jnp.einsum("emd,edf->emf", xe, w1.astype(dtype))  # [El, M, F']
  up = jnp.einsum("emd,edf->emf", xe, w3.astype(dtype))  # [El, M, F']
  out = jnp.einsum("emf,efd->emd", jax.nn.silu(gate) * up, w2.astype(dtype))  # [El, M, D]
  return _psum(out, axes.tensor)


def _grouped_ffn(rows, group_sizes, w1, w3, w2, dtype, axes: Axes):
  """SwiGLU on rows sorted by expert. rows [M, D], group_sizes [El] (sum <= M; later rows give 0)."""
  gate = jax.lax.ragged_dot(rows, w1.astype(dtype), group_sizes)  # [M, F']
  up = jax.lax.ragged_dot(rows, w3.astype(dtype), group_sizes)  # [M, F']
  out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w2.astype(dtype), group_sizes)  # [M, D]
  return _psum(out, axes.tensor)


# --- ep_capacity ---------------------------------------------------------------------------------------------

def capacity_shard(x, experts, weights, w1, w3, w2, *, num_experts, capacity_factor, dtype, axes: Axes):
  """One token shard. x [n, D], experts/weights [n, k], local experts w1/w3 [El, D, F'], w2 [El, F', D]."""
  n, d = x.shape
  k = experts.shape[1]
  cap = expert_capacity(n, k, num_experts, capacity_factor)
  choice = experts.T.reshape(-1)  # [k*n] choice-major: every first choice is placed before any second
  one_hot = jax.nn.one_hot(choice, num_experts, dtype=jnp.int32)  # [k*n, E]
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # [k*n] place in its expert
  kept = position < cap
  slot = jnp.where(kept, choice * cap + position, num_experts * cap)  # [k*n]; E*C = dropped
  token = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)  # [k*n]
  slot_token = jnp.full((num_experts * cap + 1,), n, jnp.int32).at[slot].set(token)[:-1]  # [E*C]; n = empty
  x_ext = jnp.concatenate([x.astype(dtype), jnp.zeros((1, d), dtype)])  # [n+1, D]
  buf = x_ext[slot_token].reshape(axes.num_expert_shards, num_experts // axes.num_expert_shards, cap, d)
  if axes.expert:  # [ep dst, El, C, D] -> [ep src, El, C, D]
    buf = jax.lax.all_to_all(buf, axes.expert, 0, 0, tiled=True)
  local = buf.transpose(1, 0, 2, 3).reshape(buf.shape[1], -1, d)  # [El, ep*C, D]
  out = _expert_ffn(local, w1, w3, w2, dtype, axes).reshape(buf.shape[1], buf.shape[0], cap, d)
  out = out.transpose(1, 0, 2, 3)  # [ep src, El, C, D]
  if axes.expert:
    out = jax.lax.all_to_all(out, axes.expert, 0, 0, tiled=True)  # back: [ep, El, C, D] by global expert
  out_ext = jnp.concatenate([out.reshape(num_experts * cap, d), jnp.zeros((1, d), dtype)])  # [E*C+1, D]
  combine = weights.T.reshape(-1).astype(dtype)  # [k*n] choice-major, like `slot`
  y = (out_ext[slot] * combine[:, None]).reshape(k, n, d).sum(0)  # [n, D]; dropped rows read zeros
  dropped = _psum(jnp.sum(~kept).astype(jnp.float32), axes.tokens)
  total = _psum(jnp.float32(k * n), axes.tokens)
  return y, {"dropped_fraction": dropped / total}


# --- ep_dropless ---------------------------------------------------------------------------------------------

def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def exchange(operand, out_rows: int, input_offsets, send_sizes, output_offsets, recv_sizes, axes: Axes,
             ragged: bool, block: int):
  """ragged_all_to_all semantics: rows operand[input_offsets[j] : +send_sizes[j]] land on device j at
  output_offsets[j] of its [out_rows, D] result. `ragged=False` emulates it with a padded all_to_all of
  [ep, block, D]; `block` bounds any send_sizes[j] (the most one device can send to another)."""
  output = jnp.zeros((out_rows,) + operand.shape[1:], operand.dtype)
  if ragged:
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axes.expert)
  steps = jnp.arange(block, dtype=jnp.int32)
  rows = jnp.minimum(input_offsets[:, None] + steps, operand.shape[0] - 1)  # [ep, block]
  sent = jnp.where((steps < send_sizes[:, None])[..., None], operand[rows], 0)  # [ep, block, D]
  received = jax.lax.all_to_all(sent, axes.expert, 0, 0, tiled=True)  # [ep src, block, D]
  at = jax.lax.all_to_all(output_offsets, axes.expert, 0, 0, tiled=True)  # [ep src] my offsets for them
  target = jnp.where(steps < recv_sizes[:, None], at[:, None] + steps, out_rows)  # [ep src, block]
  return output.at[target.reshape(-1)].set(received.reshape(-1, *operand.shape[1:]), mode="drop")


def _expert_parallel_rows(rows, counts, w1, w3, w2, dtype, axes: Axes, ragged: bool):
  """rows [M, D] sorted by global expert, counts [E] rows per expert -> expert outputs [M, D], same order."""
  ep = axes.num_expert_shards
  m, local_experts = rows.shape[0], counts.shape[0] // ep
  per_dest = counts.reshape(ep, local_experts)  # [ep dst, El] rows I send to each device, per its expert
  send_sizes = per_dest.sum(1)  # [ep]
  input_offsets = _exclusive_cumsum(send_sizes)
  recv_counts = jax.lax.all_to_all(per_dest, axes.expert, 0, 0, tiled=True)  # [ep src, El]
  recv_sizes = recv_counts.sum(1)  # [ep src]
  recv_offsets = _exclusive_cumsum(recv_sizes)  # where each source's rows start in my buffer
  output_offsets = jax.lax.all_to_all(recv_offsets, axes.expert, 0, 0, tiled=True)  # [ep dst]
  capacity = ep * m  # dropless: in the worst case every source sends me all its rows
  received = exchange(rows, capacity, input_offsets, send_sizes, output_offsets, recv_sizes, axes, ragged,
                      block=m)
  # The buffer holds runs (source, local expert) in that order; regroup by local expert for ragged_dot.
  run_ends = jnp.cumsum(recv_counts.reshape(-1))  # [ep*El]
  run = jnp.searchsorted(run_ends, jnp.arange(capacity, dtype=jnp.int32), side="right")  # [R]
  local_expert = jnp.where(run < ep * local_experts, run % local_experts, local_experts)  # padding last
  order = jnp.argsort(local_expert, stable=True)
  out = _grouped_ffn(received[order], recv_counts.sum(0), w1, w3, w2, dtype, axes)
  out = jnp.zeros_like(out).at[order].set(out)  # [R, D] back in buffer order
  back_offsets = jax.lax.all_to_all(input_offsets, axes.expert, 0, 0, tiled=True)  # [ep src]
  # Each source sent me at most its m rows, so `m` also bounds what goes back to one device.
  return exchange(out, m, recv_offsets, recv_sizes, back_offsets, send_sizes, axes, ragged, block=m)


def dropless_shard(x, experts, weights, w1, w3, w2, *, num_experts, capacity_factor, dtype, axes: Axes,
                   ragged: bool = False):
  """One token shard, no token dropped. Shapes as capacity_shard."""
  del capacity_factor
  n, d = x.shape
  k = experts.shape[1]
  flat = experts.reshape(-1)  # [n*k] token-major
  order = jnp.argsort(flat, stable=True)
  rows = x.astype(dtype)[order // k]  # [n*k, D] sorted by expert
  counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
  if axes.expert:
    out = _expert_parallel_rows(rows, counts, w1, w3, w2, dtype, axes, ragged)
  else:
    out = _grouped_ffn(rows, counts, w1, w3, w2, dtype, axes)
  out = jnp.zeros_like(out).at[order].set(out)  # [n*k, D] token-major again
  y = jnp.einsum("nkd,nk->nd", out.reshape(n, k, d), weights.astype(dtype))
  return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}


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


def run_sharded(shard_fn, x, route, w1, w3, w2, *, dtype, capacity_factor, **kwargs):
  """Runs `shard_fn` per token shard under shard_map on the active mesh, or once without one."""
  num_experts = w1.shape[0]
  experts, weights = route.experts, route.weights
  active = sharding.current()
  if active is None:
    return shard_fn(x, experts, weights, w1, w3, w2, num_experts=num_experts, capacity_factor=capacity_factor,
                    dtype=dtype, axes=Axes(), **kwargs)
  mesh, rules = active
  axes = mesh_axes(mesh, rules, num_experts, w1.shape[-1])
  shards = math.prod(mesh.shape[a] for a in axes.tokens)
  if x.shape[0] % shards:
    # E.g. decoding one token on a big mesh: run as one shard and let GSPMD gather what it needs (correct,
    # not fast; capacity then counts over all tokens at once).
    return shard_fn(x, experts, weights, w1, w3, w2, num_experts=num_experts, capacity_factor=capacity_factor,
                    dtype=dtype, axes=Axes(), **kwargs)
  tok, ep, tp = _spec(axes.tokens), _spec(axes.expert), _spec(axes.tensor)
  body = functools.partial(shard_fn, num_experts=num_experts, capacity_factor=capacity_factor, dtype=dtype,
                           axes=axes, **kwargs)
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(P(tok, None), P(tok, None), P(tok, None), P(ep, None, tp), P(ep, None, tp),
                               P(ep, tp, None)),
                     out_specs=(P(tok, None), P()))
  return fn(x, experts, weights, w1, w3, w2)


@DISPATCHERS.register("ep_capacity")
def ep_capacity(x, route, w1, w3, w2, *, dtype, capacity_factor=1.25):
  """Expert-parallel capacity dispatch (GShard); drops beyond ceil(cf * n * k / E) per shard and expert."""
  return run_sharded(capacity_shard, x, route, w1, w3, w2, dtype=dtype, capacity_factor=capacity_factor)


@DISPATCHERS.register("ep_dropless")
def ep_dropless(x, route, w1, w3, w2, *, dtype, capacity_factor=None):
  """Expert-parallel dropless dispatch: ragged_all_to_all + ragged_dot (padded all_to_all on CPU)."""
  ragged = jax.default_backend() != "cpu"
  return run_sharded(dropless_shard, x, route, w1, w3, w2, dtype=dtype, capacity_factor=capacity_factor,
                     ragged=ragged)
