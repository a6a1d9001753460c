"""Reading the released Mixtral checkpoint layouts tensor by tensor, and writing safetensors.

Every reader answers `names()`, `shape(name)`, `dtype(name)`, `where(name)` (the file, for messages) and
`read(name, index)`, where `index` is a tuple of leading integers optionally ending in a slice of the next
axis. Such a region is contiguous in C order, so a read is one `pread` of exactly the bytes needed: a
single expert of a fused `[E, 2F, D]` tensor or of an early stacked `[E*F, D]` one costs that expert only.

safetensors is parsed here (an 8-byte length, a JSON header, raw little-endian bytes) rather than through
`safe_open`: a memory map would keep every page it touched resident (counted in RSS) until closed, and the
header check below turns a truncated or corrupt shard into one sentence naming the file before any
output is written. `.pth` files are pickles: they are opened only with `torch.load(weights_only=True)`
(which refuses to build anything but tensors and containers, so a malicious file cannot run code) and
memory-mapped, and torch is imported only when such a file is actually given.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A problem with the user's files, reported in one sentence naming the file, tensor or field."""


SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = {"float32": np.dtype("<f4"), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype("<f2")}
_MAX_HEADER = 100 << 20  # a header larger than this is corruption, not a real checkpoint


def error_line(e: BaseException) -> str:
  """A user-caused error (CheckpointError, ConfigError, or an OSError: permissions, a full disk, a file
  vanishing mid-run, still the user's environment) as the one line the command-line tools print."""
  if isinstance(e, OSError):
    where = f"{e.filename}: " if e.filename else ""
    return f"error: {where}{e.strerror or e}"
  return f"error: {' '.join(str(e).split())}"


def dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def _region(shape: Sequence[int], index: Tuple) -> Tuple[int, int, Tuple[int, ...]]:
  """(first element, element count, result shape) of a leading-integers[-then-slice] index."""
  strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
  start, axis = 0, 0
  for axis, i in enumerate(index):
    if isinstance(i, slice):
      lo, hi, step = i.indices(shape[axis])
      assert step == 1 and axis == len(index) - 1, "only a trailing contiguous slice is supported"
      return start + lo * strides[axis], (hi - lo) * strides[axis], (hi - lo, *shape[axis + 1:])
    assert 0 <= i < shape[axis], (index, shape)
    start += i * strides[axis]
  n = len(index)
  return start, math.prod(shape[n:]), tuple(shape[n:])


class SafetensorsFile:
  """One .safetensors file: header parsed and checked against the file size up front."""

  def __init__(self, path: Path):
    self.path = Path(path)
    try:
      size = self.path.stat().st_size
      with open(self.path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
          raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER):
          raise CheckpointError(f"{self.path}: corrupt or truncated safetensors file (header length {n} "
                                f"with {size} bytes on disk)")
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_start = 8 + n
    self.entries: Dict[str, Tuple[np.dtype, Tuple[int, ...], int]] = {}
    for name, entry in header.items():
      try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{self.path}: corrupt safetensors header entry for tensor {name}") from None
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise CheckpointError(f"{self.path}: corrupt safetensors header: tensor {name} has shape {shape} "
                              f"but {end - begin} bytes")
      if self.data_start + end > size:
        raise CheckpointError(f"{self.path} is truncated: tensor {name} needs bytes up to "
                              f"{self.data_start + end}, the file has {size}")
      self.entries[name] = (dtype, shape, begin)
    self._fd = None

  def read(self, name: str, index: Tuple = ()) -> np.ndarray:
    dtype, shape, begin = self.entries[name]
    first, count, out_shape = _region(shape, index)
    out = np.empty(count, dtype)
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    view, offset = memoryview(out.view(np.uint8)), self.data_start + begin + first * dtype.itemsize
    while len(view):
      got = os.preadv(self._fd, [view], offset)
      if got <= 0:
        raise CheckpointError(f"{self.path} is truncated: reading tensor {name} hit the end of the file")
      view, offset = view[got:], offset + got
    return out.reshape(out_shape)

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class TensorReader:
  """Tensors spread over several files (shards); each name lives in exactly one file."""

  def __init__(self, files: Mapping[str, object]):
    self.files = files  # tensor name -> file object with .entries/.read/.path

  def names(self) -> List[str]:
    return list(self.files)

  def shape(self, name: str) -> Tuple[int, ...]:
    return self.files[name].entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self.files[name].entries[name][0]

  def where(self, name: str) -> str:
    return self.files[name].path.name

  def read(self, name: str, index: Tuple = ()) -> np.ndarray:
    return self.files[name].read(name, index)

  def close(self):
    for f in {id(f): f for f in self.files.values()}.values():
      f.close()


def _merge(files: Iterable, what: str) -> TensorReader:
  by_name = {}
  for f in files:
    for name in f.entries:
      if name in by_name:
        raise CheckpointError(f"tensor {name} appears in both {by_name[name].path.name} and {f.path.name} "
                              f"({what})")
      by_name[name] = f
  return TensorReader(by_name)


def safetensors_reader(paths: Sequence[Path], index_file: Path | None = None) -> TensorReader:
  """Opens shards; with an index, exactly the shards it names, and each tensor must be where it says."""
  if index_file is None:
    return _merge([SafetensorsFile(p) for p in paths], "no index file to disambiguate")
  try:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    assert isinstance(weight_map, dict)
  except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
    raise CheckpointError(f"{index_file}: corrupt index (expected a JSON object with a 'weight_map')") from None
  shards = {}
  for shard in sorted(set(weight_map.values())):
    path = index_file.parent / shard
    if not path.is_file():
      raise CheckpointError(f"{index_file.name} names shard {shard}, which does not exist in {index_file.parent}")
    shards[shard] = SafetensorsFile(path)
  reader = _merge(shards.values(), f"listed in {index_file.name}")
  for name, shard in weight_map.items():
    if name not in shards[shard].entries:
      raise CheckpointError(f"{index_file.name} places tensor {name} in {shard}, which does not hold it")
  return reader


class TorchFile:
  """A consolidated.NN.pth state dict, memory-mapped and loaded without executing code."""

  def __init__(self, path: Path):
    import torch  # only here: a .pth was actually given
    self.path = Path(path)
    try:
      try:
        state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError as e:  # pre-1.6 (non-zip) files cannot be memory-mapped: read them whole
        if "mmap" not in str(e):
          raise
        state = torch.load(self.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for bad files; all mean "unreadable"
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if "weights_only" in str(e) or "Unsupported global" in str(e):
        reason = "it holds objects other than tensors, refused for safety (weights_only=True)"
      raise CheckpointError(f"{self.path}: cannot be read as a PyTorch state dict: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      raise CheckpointError(f"{self.path}: expected a flat dict of tensors (a consolidated state dict)")
    self._tensors = state
    self._dtypes = {torch.float32: FLOAT_DTYPES["float32"], torch.bfloat16: FLOAT_DTYPES["bfloat16"],
                    torch.float16: FLOAT_DTYPES["float16"]}
    self.entries = {}
    for name, t in state.items():
      if t.dtype not in self._dtypes:
        raise CheckpointError(f"{self.path}: tensor {name} has dtype {t.dtype}, expected a float type")
      self.entries[name] = (self._dtypes[t.dtype], tuple(t.shape), 0)

  def read(self, name: str, index: Tuple = ()) -> np.ndarray:
    import torch
    t = self._tensors[name][index].contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()

  def close(self):
    self._tensors = {}


def torch_reader(paths: Sequence[Path]) -> TensorReader:
  return _merge([TorchFile(p) for p in paths], "a state dict split over files must not repeat keys")


def transposed(a: np.ndarray, dtype=None, tile: int = 128) -> np.ndarray:
  """a.T of a 2D array as a new C-contiguous array (optionally cast), copied tile by tile: a plain
  np.ascontiguousarray(a.T) walks one side with a stride of a whole row and runs 4-10x slower on
  expert-sized matrices (measured: 1.0 s vs 0.23 s for a [14336, 4096] bfloat16 one)."""
  rows, cols = a.shape
  out = np.empty((cols, rows), dtype or a.dtype)
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      out[j:j + tile, i:i + tile] = a[i:i + tile, j:j + tile].T
  return out


def plan_shards(tensors: Sequence[Tuple[str, Tuple[int, ...], np.dtype]], max_bytes: int) -> List[List[int]]:
  """Greedy, in order: indices of the tensors in each shard, each shard <= max_bytes unless one tensor is
  larger on its own."""
  shards, size = [[]], 0
  for i, (_, shape, dtype) in enumerate(tensors):
    n = math.prod(shape) * np.dtype(dtype).itemsize
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(i)
    size += n
  return shards


def write_safetensors(path: Path, tensors: Sequence[Tuple[str, Tuple[int, ...], np.dtype]], arrays: Iterable,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file streaming: header from the (name, shape, dtype) list, then each array of
  `arrays` (an iterator, consumed in the same order) as it comes, so only one tensor is in memory."""
  header, offset = {}, 0
  for name, shape, dtype in tensors:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _DTYPE_CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    count = 0
    for (name, shape, dtype), array in zip(tensors, arrays):
      array = np.ascontiguousarray(array, dtype=dtype)
      assert array.shape == tuple(shape), (name, array.shape, shape)
      f.write(memoryview(array.view(np.uint8).reshape(-1)))
      count += 1
    assert count == len(tensors), "fewer arrays than tensors"
