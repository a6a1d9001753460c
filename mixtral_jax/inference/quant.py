"""Weight-only quantization of the attention and expert weights: q8 (int8 per channel) and q6..q2
(group-wise, bit-packed), quantized checkpoints, and weight-byte accounting.

Levels (bits per weight including scales, group size G = 32 along the contraction axis):
  q8  int8, symmetric, one float32 scale per output channel                         ~8.0 bits
  q6  6-bit codes, asymmetric (float16 scale + float16 minimum per group), packed    7.0 bits
  q5 / q4 / q3 / q2  the same with 5 / 4 / 3 / 2-bit codes                           6.0 / 5.0 / 4.0 / 3.0
Embeddings, LM head, norms and routers stay in float: they are <5% of Mixtral's bytes and the router's
top-k choice is sensitive to small errors.

How it plugs in: a quantized weight is a `QTensor` stored as the *value* of the same nnx.Param. The
model reads weights as `param[...].astype(dtype)`, and `QTensor.astype` dequantizes, so attention,
every registered dispatch strategy and generation run unchanged; under jit the dequantization fuses
into the consumer (on GPU the int8 convert is fused into the matmul's operand load). A decode dispatcher
that picks experts by index slices a QTensor like an array (`take_expert`) and dequantizes only those.

Packing: a b-bit code is split into pieces of 4, 2 and 1 bits (6 = 4+2, 5 = 4+1, 3 = 2+1), each piece
packed 8/c codes to a byte along the contraction axis, so q6 costs 6 bits per code, not 8.

Why not qwix (0.1.8, checked on PyPI for this issue): qwix quantizes an NNX model by intercepting the
einsum/dot_general calls of a first traced call and swapping the Params it sees. Here the expert
weights reach the matmuls through the registered pure dispatch functions, and the layers run under
`lax.scan` over `nnx.split`/`merge` of the stacked layer state, so that interception would have to
follow tensors through both; its 3/5/6-bit types are stored unpacked in int4/int8 containers (no memory
saving over q4/q8), and its quantized state has no checkpoint format of ours. A ~200-line
self-contained module that works with every dispatcher and packs every level is simpler to trust.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

LEVELS = {  # name -> (bits, group size; 0 = one scale per output channel, symmetric)
    "q8": (8, 0), "q6": (6, 32), "q5": (5, 32), "q4": (4, 32), "q3": (3, 32), "q2": (2, 32)}
PIECES = {6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,), 1: (1,)}

# Which parameters are quantized: path suffix -> (core dims, contraction dims). A weight is
# [*lead, *core] (lead = the stacked layer axis L, and E for experts); the contraction dims come first
# in every core, so [*lead, rows, cols] is a reshape, never a transpose.
TARGETS = {
    ("attn", "wq"): (3, 1), ("attn", "wk"): (3, 1), ("attn", "wv"): (3, 1), ("attn", "wo"): (3, 2),
    ("moe", "w1"): (2, 1), ("moe", "w3"): (2, 1), ("moe", "w2"): (2, 1),
    ("shared", "w1"): (2, 1), ("shared", "w3"): (2, 1), ("shared", "w2"): (2, 1),
}


class QuantError(ValueError):
  """A user-caused quantization error (unknown level, bad checkpoint); one sentence."""


@struct.dataclass
class QTensor:
  """A quantized weight [*lead, *core]. data holds [*lead, R', C] codes: one int8 array (q8) or the
  packed uint8 pieces; scale/offset [*lead, R / G, C] (q8: scale [*lead, 1, C], no offset)."""
  data: tuple
  scale: jax.Array
  offset: Optional[jax.Array]
  bits: int = struct.field(pytree_node=False)
  group: int = struct.field(pytree_node=False)
  core: tuple = struct.field(pytree_node=False)   # logical trailing shape, e.g. (D, H, Dh)
  rows: int = struct.field(pytree_node=False)     # logical contraction size (before padding to G)

  @property
  def shape(self) -> tuple:
    return tuple(self.scale.shape[:-2]) + tuple(self.core)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

  def __getitem__(self, index):
    if index is Ellipsis:  # nnx.Param[...] returns the stored value
      return self
    raise TypeError("index a QTensor with take_expert / jax.tree.map on its leading axes")

  def astype(self, dtype) -> jax.Array:
    return dequantize(self, dtype)


def take_expert(w, index):
  """w[index] on the leading axis for arrays and QTensors alike (the decode dispatcher's expert pick)."""
  if isinstance(w, QTensor):
    return jax.tree.map(lambda a: a[index], w)
  return w[index]


# ----------------------------------------------------------------------------------------------------
# Bit packing along the rows axis (-2) of [..., R, C]

def pack(codes: jax.Array, bits: int) -> tuple:
  """uint8 codes < 2**bits [..., R, C] (R % 8 == 0) -> tuple of packed uint8 pieces [..., R*c/8, C]."""
  out, shift = [], 0
  for c in PIECES[bits]:
    per = 8 // c
    piece = (codes >> shift) & ((1 << c) - 1)  # [..., R, C]
    piece = piece.reshape(*piece.shape[:-2], piece.shape[-2] // per, per, piece.shape[-1])
    weights = jnp.asarray([1 << (c * j) for j in range(per)], jnp.uint8)[:, None]  # [per, 1]
    out.append(jnp.sum(piece.astype(jnp.uint32) * weights, axis=-2).astype(jnp.uint8))
    shift += c
  return tuple(out)


def unpack(data: tuple, bits: int) -> jax.Array:
  """Inverse of pack: packed pieces -> codes uint8 [..., R, C]."""
  codes, shift = None, 0
  for piece, c in zip(data, PIECES[bits]):
    per = 8 // c
    parts = jnp.stack([(piece >> (c * j)) & ((1 << c) - 1) for j in range(per)], axis=-2)  # [.., R', per, C]
    part = parts.reshape(*piece.shape[:-2], piece.shape[-2] * per, piece.shape[-1]) << shift
    codes = part if codes is None else codes | part
    shift += c
  return codes


# ----------------------------------------------------------------------------------------------------
# Quantize / dequantize

def quantize(w, level: str, n_core: int, n_contract: int) -> QTensor:
  """w [*lead, *core] float -> QTensor. The first n_contract core dims are contracted in the matmul."""
  if level not in LEVELS:
    raise QuantError(f"quant level {level!r} is unknown; known: {', '.join(LEVELS)}")
  bits, group = LEVELS[level]
  w = jnp.asarray(w, jnp.float32)
  lead, core = w.shape[:w.ndim - n_core], w.shape[w.ndim - n_core:]
  rows, cols = math.prod(core[:n_contract]), math.prod(core[n_contract:])
  w2 = w.reshape(*lead, rows, cols)  # [*lead, R, C]
  if group == 0:  # int8, symmetric, per output channel
    scale = jnp.max(jnp.abs(w2), axis=-2, keepdims=True) / 127.0  # [*lead, 1, C]
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round(w2 / scale), -127, 127).astype(jnp.int8)
    return QTensor(data=(codes,), scale=scale, offset=None, bits=bits, group=0, core=tuple(core), rows=rows)
  padded = -(-rows // group) * group
  if padded != rows:  # edge-pad so the padding rows do not widen the last group's range
    w2 = jnp.concatenate([w2, jnp.repeat(w2[..., -1:, :], padded - rows, axis=-2)], axis=-2)
  g = w2.reshape(*lead, padded // group, group, cols)  # [*lead, nG, G, C]
  lo, hi = jnp.min(g, axis=-2), jnp.max(g, axis=-2)  # [*lead, nG, C]
  levels = (1 << bits) - 1
  # Stored in float16: compute the codes against the rounded scale/offset actually used to decode.
  scale = ((hi - lo) / levels).astype(jnp.float16)
  scale = jnp.where(scale == 0, jnp.float16(1.0), scale)
  offset = lo.astype(jnp.float16)
  codes = jnp.round((g - offset[..., None, :].astype(jnp.float32)) / scale[..., None, :].astype(jnp.float32))
  codes = jnp.clip(codes, 0, levels).astype(jnp.uint8).reshape(*lead, padded, cols)
  return QTensor(data=pack(codes, bits), scale=scale, offset=offset, bits=bits, group=group,
                 core=tuple(core), rows=rows)


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
  """QTensor -> float array [*lead, *core] in `dtype`."""
  lead = q.scale.shape[:-2]
  if q.group == 0:
    w = q.data[0].astype(dtype) * q.scale.astype(dtype)  # [*lead, R, C]
  else:
    codes = unpack(q.data, q.bits)  # [*lead, R_pad, C]
    n_groups, cols = q.scale.shape[-2:]
    g = codes.reshape(*lead, n_groups, q.group, cols).astype(dtype)
    w = g * q.scale[..., None, :].astype(dtype) + q.offset[..., None, :].astype(dtype)
    w = w.reshape(*lead, n_groups * q.group, cols)[..., :q.rows, :]
  return w.reshape(*lead, *q.core)


def _target(path) -> Optional[tuple]:
  """(core dims, contraction dims) if the parameter at `path` is quantized (a pair of its keys is in
  TARGETS: also matches a layer's `moe.w1` or an unstacked model's `moe.w1.parts.3`)."""
  keys = tuple(str(getattr(p, "key", p)) for p in path)
  for i in range(len(keys) - 1):
    if keys[i:i + 2] in TARGETS:
      return TARGETS[keys[i:i + 2]]
  return None


def quantize_state(state, level: str, *, consume: bool = False):
  """nnx.State -> the same State with its attention and expert weights replaced by QTensors."""
  if level not in LEVELS:
    raise QuantError(f"quant level {level!r} is unknown; known: {', '.join(LEVELS)}")

  def convert(path, value):
    target = _target(path)
    if target is None or isinstance(value, QTensor):
      return value
    out = _quantize_by_slices(value, level, *target)
    if consume and isinstance(value, jax.Array):
      value.delete()  # the float weight is not needed any more: the peak is one weight, not the model
    return out

  pure = nnx.to_pure_dict(state)
  pure = jax.tree_util.tree_map_with_path(convert, pure, is_leaf=lambda x: isinstance(x, QTensor))
  nnx.replace_by_pure_dict(state, pure)
  return state


def _quantize_by_slices(w, level: str, n_core: int, n_contract: int) -> QTensor:
  """quantize(), one leading slice at a time (lax.map) when w has leading axes: the float32 working copy
  is one layer's (one expert's) weight, never a whole [L, E, D, F] stack (60 GB for 8x7B's w1)."""
  fn = functools.partial(quantize, level=level, n_core=n_core, n_contract=n_contract)
  if w.ndim == n_core:
    return jax.jit(fn)(w)
  return jax.jit(lambda w: jax.lax.map(fn, w))(w)


def quantize_model(model, level: str, *, consume: bool = False):
  """A copy of `model` whose attention and expert weights are QTensors (other arrays are shared).
  consume=True frees each float weight as soon as its quantized one exists (`model` is unusable after):
  the peak is the quantized model plus one float weight, which is how an 8x7B is quantized on one GPU."""
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, quantize_state(state, level, consume=consume))
  out.quant = level  # a plain attribute: generation and the planner report it
  return out


def matmul(x, w, dtype):
  """x [M, R] @ w [R, C] for a float or quantized 2-D weight. For q8 the per-channel scale is applied
  to the [M, C] output instead of the weight, so only the int8 -> dtype convert sits on the weight path
  (XLA:GPU fuses that convert into the matmul's operand load)."""
  if isinstance(w, QTensor) and w.group == 0 and len(w.core) == 2 and w.scale.ndim == 2:
    return (x @ w.data[0].astype(dtype)) * w.scale[0].astype(dtype)
  return x @ w.astype(dtype)


def weight_bytes(model) -> dict:
  """{'quantized': bytes of QTensors (or of the float arrays a quantizer would replace), 'other': ...}."""
  totals = {"quantized": 0, "other": 0}
  pure = nnx.to_pure_dict(nnx.state(model))
  for path, leaf in jax.tree_util.tree_flatten_with_path(pure, is_leaf=lambda x: isinstance(x, QTensor))[0]:
    size = leaf.nbytes if isinstance(leaf, QTensor) else int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    totals["quantized" if _target(path) else "other"] += size
  totals["total"] = totals["quantized"] + totals["other"]
  return totals


def bits_per_weight(level: str, rows: int = 4096) -> float:
  """Storage bits per quantized weight including scales (rows: contraction size, for q8's scales)."""
  bits, group = LEVELS[level]
  return bits + (32 / rows if group == 0 else 2 * 16 / group)


# ----------------------------------------------------------------------------------------------------
# Quantized checkpoints: DIR/quantized.json (model config, level, per-tensor layout) + DIR/params.safetensors

QUANT_META, QUANT_ARRAYS = "quantized.json", "params.safetensors"


def is_quantized_checkpoint(path) -> bool:
  return os.path.isfile(os.path.join(path, QUANT_META))


def save_quantized(path, model) -> str:
  """Writes a quantized model so load_quantized(path) rebuilds it (float leaves are stored as-is)."""
  from safetensors.numpy import save_file
  from mixtral_jax import config as config_lib
  os.makedirs(path, exist_ok=True)
  from mixtral_jax.model import state_of
  arrays, layout = {}, {}
  pure = state_of(model)  # canonical (stacked) names, whatever the layout
  for p, leaf in jax.tree_util.tree_flatten_with_path(pure, is_leaf=lambda x: isinstance(x, QTensor))[0]:
    name = ".".join(str(getattr(k, "key", k)) for k in p)
    if isinstance(leaf, QTensor):
      layout[name] = dict(bits=leaf.bits, group=leaf.group, core=list(leaf.core), rows=leaf.rows,
                          pieces=len(leaf.data), offset=leaf.offset is not None)
      for i, piece in enumerate(leaf.data):
        arrays[f"{name}.data{i}"] = np.asarray(piece)
      arrays[f"{name}.scale"] = np.asarray(leaf.scale)
      if leaf.offset is not None:
        arrays[f"{name}.offset"] = np.asarray(leaf.offset)
    else:
      arrays[name] = np.asarray(leaf, np.float32) if leaf.dtype == jnp.bfloat16 else np.asarray(leaf)
  save_file(arrays, os.path.join(path, QUANT_ARRAYS))
  meta = {"format": "mixtral_jax.quantized", "version": 1, "quant": getattr(model, "quant", None),
          "model": config_lib.to_dict(model.config), "layout": layout}
  with open(os.path.join(path, QUANT_META), "w") as f:
    json.dump(meta, f, indent=1)
  return path


def load_quantized(path, execution=None):
  """Rebuilds a model written by save_quantized: a Mixtral whose quantized Params hold QTensors, in
  `execution`'s layout (default: this backend's inference one)."""
  from safetensors.numpy import load_file
  from mixtral_jax.config import from_dict
  from mixtral_jax.model import STACKED, abstract_model, with_execution
  meta_path = os.path.join(path, QUANT_META)
  if not os.path.isfile(meta_path):
    raise QuantError(f"{path} is not a quantized checkpoint ({QUANT_META} is missing)")
  with open(meta_path) as f:
    meta = json.load(f)
  cfg = from_dict(meta["model"])
  arrays = load_file(os.path.join(path, QUANT_ARRAYS))
  graphdef, state = nnx.split(abstract_model(cfg, STACKED))  # stored in the canonical layout

  def restore(p, spec):
    name = ".".join(str(getattr(k, "key", k)) for k in p)
    if name in meta["layout"]:
      lay = meta["layout"][name]
      get = lambda key: jnp.asarray(arrays[f"{name}.{key}"])  # noqa: E731
      return QTensor(data=tuple(get(f"data{i}") for i in range(lay["pieces"])), scale=get("scale"),
                     offset=get("offset") if lay["offset"] else None, bits=lay["bits"], group=lay["group"],
                     core=tuple(lay["core"]), rows=lay["rows"])
    if name not in arrays:
      raise QuantError(f"{path}: tensor {name} is missing from {QUANT_ARRAYS}")
    return jnp.asarray(arrays[name], spec.dtype)

  pure = jax.tree_util.tree_map_with_path(restore, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.quant = meta.get("quant")
  return with_execution(model, execution or model.execution.replace(layout="auto"))
