"""Grouped matmul: rows sorted by group, each group times its own weight, forward and backward dropless.

    gmm(lhs [M, K], rhs [G, K, N], group_sizes [G] int32, impl=...) -> [M, N]
    out[r] = lhs[r] @ rhs[g(r)] for the rows of group g (contiguous, in group order); rows past
    sum(group_sizes) are zero.

One name, one implementation per backend (GMMS; the execution spec's BACKENDS picks):
  loop        CPU. A static loop over groups; each group runs a data-dependent loop of [tile, K] @ [K, N]
              row tiles, then tiles of tile/4 rows for the rest. FLOPs are the active ones plus less
              than tile/4 rows per group; no weight copies per tile, no padding of the row buffer.
              Custom VJP in the megablox pattern: d lhs is the same grouped product against the
              transposed weights, d rhs a transposed grouped product (tgmm: lhs_g^T @ dout_g accumulated
              over each group's tiles), so the backward pass has no scatter-add and no [G, C, *] buffers.
  ragged_dot  jax.lax.ragged_dot (XLA's own lowering and autodiff).
  tokamax     tokamax.ragged_dot (openxla/tokamax): Mosaic / Triton kernels on NVIDIA GPUs, its XLA path
              elsewhere; its own VJP. Its GPU kernels check the device at trace time; under
              `tokamax.config.cross_compile(True)` a CPU machine exports its Triton kernel for `cuda`
              (Mosaic GPU still needs the device).
  megablox    Pallas TPU grouped matmul (jax.experimental.pallas.ops.tpu.megablox, custom VJP gmm/tgmm);
              `megablox_interpret` runs it in the Pallas interpreter off TPU (tests). The kernel leaves
              rows past the groups unwritten; they are zeroed here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.registry import Registry

GMMS = Registry("grouped_matmul")
TAIL_STEPS = 4  # a group's last rows run in tiles of tile / TAIL_STEPS rows
LOOP_TILE = 256  # rows per tile of the CPU loop (256 beat 128 and 512 on 2 cores at K=512, N=1792)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "loop",
        tile: int = LOOP_TILE) -> jax.Array:
  """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N] (rows past the groups 0)."""
  return GMMS.get(impl)(lhs, rhs, group_sizes.astype(jnp.int32), tile=tile)


def _past_groups_zero(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
  rows = jnp.arange(out.shape[0])[:, None]  # [M, 1]
  return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))


def _for_each_tile(group_sizes, tile, carry, body, weights=None):
  """Calls body(carry, w, row, size, rest) for every tile of every group j in order (w = weights[j]; j
  itself when weights is None): whole tiles of `tile` rows, then tiles of tile / TAIL_STEPS rows for the
  rest. `row` is traced, `size` static, `rest` (traced) the rows of the tile that are the group's; rows
  row + rest .. row + size belong to later groups (or padding). Both are data-dependent fori_loops with
  the carry in place (a lax.switch over tail sizes would copy the carry into its branches)."""
  starts = jnp.cumsum(group_sizes) - group_sizes  # [G]
  step = max(1, tile // TAIL_STEPS)
  for j in range(group_sizes.shape[0]):
    # The barrier keeps XLA from sinking the slice of group j's weight into the loop (a copy per tile).
    wj = j if weights is None else jax.lax.optimization_barrier(weights[j])
    whole, end = group_sizes[j] // tile, starts[j] + group_sizes[j]
    carry = jax.lax.fori_loop(0, whole, lambda i, c, j=j, wj=wj: body(c, wj, starts[j] + i * tile, tile, tile), carry)
    row = starts[j] + whole * tile
    tails = (end - row + step - 1) // step
    carry = jax.lax.fori_loop(0, tails, lambda i, c, wj=wj, row=row, end=end: body(
        c, wj, row + i * step, step, end - row - i * step), carry)
  return carry


def _varying_like(x, *refs):
  """x (zeros) typed varying over every mesh axis any of refs varies over: inside shard_map a loop's
  initial carry must carry the axes its body's outputs do. A select on a false scalar keeps the values
  and takes the refs' axes."""
  for ref in refs:
    x = jnp.where(False, ref.reshape(-1)[0].astype(x.dtype), x)
  return x


def _loop_forward(lhs, rhs, group_sizes, tile, transpose_rhs=False):
  """[M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]. A tail writes past its group into
  the next group's rows, which that group then overwrites (groups run in order); the last one spills
  into `tile` rows of padding."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = max(1, min(tile, m))
  padded = jnp.concatenate([lhs, jnp.zeros((tm, k), lhs.dtype)])  # [M + tm, K]
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

  def body(out, w, row, size, rest):
    xb = jax.lax.dynamic_slice_in_dim(padded, row, size)  # [size, K]
    yb = jax.lax.dot_general(xb, w, (contract, ((), ())))  # [size, N]
    return jax.lax.dynamic_update_slice_in_dim(out, yb.astype(lhs.dtype), row, axis=0)

  init = _varying_like(jnp.zeros((m + tm, n), lhs.dtype), lhs, rhs, group_sizes)  # [M + tm, N]
  out = _for_each_tile(group_sizes, tm, init, body, weights=rhs)
  # Spills reach at most tm - 1 rows past the last group: zero them (in place) instead of masking all rows.
  out = jax.lax.dynamic_update_slice_in_dim(out, jnp.zeros((tm, n), lhs.dtype), jnp.sum(group_sizes), axis=0)
  return out[:m]


def _loop_tgmm(lhs, grad, group_sizes, tile, dtype):
  """d rhs: [G, K, N] with [g] = lhs_g^T @ grad_g over group g's rows, accumulated in float32."""
  m, k = lhs.shape
  n = grad.shape[1]
  tm = max(1, min(tile, m))
  lhs_p = jnp.concatenate([lhs, jnp.zeros((tm, k), lhs.dtype)])  # [M + tm, K]
  grad_p = jnp.concatenate([grad, jnp.zeros((tm, n), grad.dtype)])  # [M + tm, N]

  def body(acc, j, row, size, rest):  # j: the group (no weights to read)
    xb = jax.lax.dynamic_slice_in_dim(lhs_p, row, size)  # [size, K]
    xb = jnp.where(jnp.arange(size)[:, None] < rest, xb, jnp.zeros((), xb.dtype))  # rest.. : next group
    gb = jax.lax.dynamic_slice_in_dim(grad_p, row, size)  # [size, N]
    part = jax.lax.dot_general(xb, gb, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(acc, acc[j] + part, j, axis=0)  # [G, K, N]

  init = _varying_like(jnp.zeros((group_sizes.shape[0], k, n), jnp.float32), lhs, grad, group_sizes)
  acc = _for_each_tile(group_sizes, tm, init, body)
  return acc.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loop_gmm(lhs, rhs, group_sizes, tile):
  return _loop_forward(lhs, rhs, group_sizes, tile)


def _loop_gmm_fwd(lhs, rhs, group_sizes, tile):
  return _loop_forward(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _loop_gmm_bwd(tile, res, grad):
  lhs, rhs, group_sizes = res
  grad = grad.astype(lhs.dtype)
  dlhs = _loop_forward(grad, rhs, group_sizes, tile, transpose_rhs=True)  # [M, K]
  drhs = _loop_tgmm(lhs, grad, group_sizes, tile, rhs.dtype)  # [G, K, N]
  return dlhs, drhs, None


_loop_gmm.defvjp(_loop_gmm_fwd, _loop_gmm_bwd)


@GMMS.register("loop")
def loop(lhs, rhs, group_sizes, *, tile):
  return _loop_gmm(lhs, rhs, group_sizes, tile)


@GMMS.register("ragged_dot")
def ragged_dot(lhs, rhs, group_sizes, *, tile=None):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


@GMMS.register("tokamax")
def tokamax_ragged_dot(lhs, rhs, group_sizes, *, tile=None):
  import tokamax  # imported here: only this implementation needs it
  from absl import flags
  if not flags.FLAGS.is_parsed():  # tokamax reads its absl flags, else parses sys.argv (pytest's, Jupyter's)
    flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


def megablox_tiling(m: int, k: int, n: int) -> tuple:
  """(tm, tk, tn): the largest of 512, 256, 128 (multiples of the TPU MXU) that divides each dimension,
  else the whole dimension."""
  def pick(size, prefer):
    for t in prefer:
      if size % t == 0:
        return t
    return size
  return pick(m, (512, 256, 128)), pick(k, (512, 256, 128)), pick(n, (512, 256, 128))


@GMMS.register("megablox")
def megablox(lhs, rhs, group_sizes, *, tile=None, interpret=False):
  from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
  m, k = lhs.shape
  tiling = megablox_tiling(m, k, rhs.shape[2])
  lhs = _past_groups_zero(lhs, group_sizes)  # its VJP zeroes the kernel's unwritten rows of d lhs
  out = megablox_gmm(lhs, rhs, group_sizes, lhs.dtype, tiling, None, None, False, interpret)
  return _past_groups_zero(out, group_sizes)


@GMMS.register("megablox_interpret")
def megablox_interpret(lhs, rhs, group_sizes, *, tile=None):
  """The megablox kernel run by the Pallas interpreter: for testing it off TPU (slow)."""
  return megablox(lhs, rhs, group_sizes, interpret=True)
