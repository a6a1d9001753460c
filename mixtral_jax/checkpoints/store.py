"""Orbax checkpoints of a Mixtral that hold everything needed to rebuild it: parameters and model config.

Layout of PATH (one Orbax CompositeCheckpointHandler save):
  PATH/params   an Orbax PyTree checkpoint (OCDBT + zarr) of the tree `model.params_of(model)`
  PATH/config   JSON {"format": "mixtral_jax", "version": 1, "model": config.to_dict(cfg), "source": ...}
so `load_model(PATH)` needs nothing else, and `PATH/params` restores with plain Orbax too.

Writing without holding the model (the converter). orbax-checkpoint 0.12.8 offers two ways to build a
checkpoint in pieces, both unsuitable here: `ocp.partial.save` (experimental v1) adds whole *new* leaves
per call and cannot replace or extend one, and per-layer / per-expert leaves would leave stacked
`[L, E, D, F]` arrays to be concatenated at load time (twice the memory, and no direct restore onto a
mesh). Instead each leaf of the tree is a `Streamed` description (shape, dtype, chunk shape, and a
generator of blocks), saved by `_StreamedHandler`, a TypeHandler registered only in the converter's
private registry: it asks Orbax for the leaf's normal TensorStore write spec (`get_json_tspec_write`,
the spec NumpyHandler would use), sets the zarr chunk shape to the block shape (one layer, or one
expert of one layer), opens the array and writes the blocks in order, keeping at most
WRITES_IN_FLIGHT of them handed to TensorStore (whose threads compress and store them while this one
reads and transposes the next). A block fills a whole chunk, so TensorStore never reads back or buffers
a partial chunk: peak memory is a few blocks (~120 MB each at full width in bf16), never a layer.
Orbax writes everything else (tree metadata, OCDBT manifests, the
commit marker) itself, and the handler reports typestr "np.ndarray", so the result is an ordinary
Orbax checkpoint: any restore path (NumpyHandler, ArrayHandler onto a sharding) reads it.

Every output directory is written to a hidden temporary directory beside PATH and renamed into place
at the end: an interrupted or failed write leaves nothing at PATH, and an existing PATH is replaced
only when `overwrite` is set, and only once the new checkpoint is complete.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax.config import ModelConfig
from mixtral_jax.checkpoints.formats import CheckpointError
from mixtral_jax.checkpoints.sources import Streamed

FORMAT, VERSION = "mixtral_jax", 1
PARAMS, CONFIG = "params", "config"
# Chunk bound for save_model's in-memory arrays: reads of one layer (to_hf, partial restores) then decode
# at most this much more than they need.
SAVE_CHUNK_BYTES = 256 << 20
# Blocks handed to TensorStore before waiting for the oldest: its threads compress and store them while
# this thread reads and transposes the next (peak memory: this many blocks more).
WRITES_IN_FLIGHT = 3


class _StreamedHandler(ocp.type_handlers.NumpyHandler):
  """Saves `Streamed` leaves block by block (see the module docstring); restores as np.ndarray."""

  async def _write(self, values, infos, args):
    pending = collections.deque()  # writes TensorStore is compressing / storing while we read the next
    try:
      await self._write_leaves(values, infos, args, pending)
    except BaseException:
      # Let writes already handed to TensorStore land before the error reaches atomic_dir, which then
      # removes the temporary directory (otherwise they could recreate files in it afterwards).
      for write in pending:
        with contextlib.suppress(Exception):
          await write
      raise

  async def _write_leaves(self, values, infos, args, pending):
    for value, info, arg in zip(values, infos, args):  # one leaf at a time: bounded memory
      await info.await_path_creation()
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.shape,
          dtype=value.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
      meta = spec["base"]["metadata"] if spec.get("driver") == "cast" else spec["metadata"]
      assert "chunks" in meta, "expected zarr v2 metadata (PyTreeCheckpointHandler's default)"
      meta["chunks"] = list(value.chunks)
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
      for index, block in value.blocks():
        block = np.ascontiguousarray(block, dtype=value.dtype)
        pending.append(store[index].write(block, can_reference_source_data_indefinitely=True))
        del block
        while len(pending) >= WRITES_IN_FLIGHT:
          await pending.popleft()
    while pending:
      await pending.popleft()

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args),
                                                             name="streamed_leaves")]


def _registry():
  return ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.get_type_handler(np.ndarray)),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
      (Streamed, _StreamedHandler()))


@contextlib.contextmanager
def atomic_dir(dst, overwrite: bool = False) -> Iterator[Path]:
  """Yields a fresh temporary path beside `dst` (not yet created); on success it becomes `dst`."""
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise CheckpointError(f"{dst} already exists (pass --overwrite / overwrite=True to replace it)")
  if not dst.parent.is_dir():
    raise CheckpointError(f"{dst.parent} does not exist (the parent of the output directory)")
  tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
  _remove(tmp)
  try:
    yield tmp
    if dst.exists():  # overwrite: keep the old one until the new one is in place
      old = dst.parent / f".{dst.name}.old-{os.getpid()}"
      os.rename(dst, old)
      try:
        os.rename(tmp, dst)
      except OSError:
        os.rename(old, dst)
        raise
      _remove(old)
    else:
      os.rename(tmp, dst)
  finally:
    _remove(tmp)
    for stray in dst.parent.glob(f"{tmp.name}.orbax-checkpoint-tmp*"):  # Orbax's own temporary dirs
      _remove(stray)


def _remove(path: Path):
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists() or path.is_symlink():
    path.unlink()


def _quiet_orbax(level=logging.ERROR):
  # Orbax logs informational warnings through absl (the CLI also hides the errors it re-raises to us).
  logging.getLogger("absl").setLevel(max(level, logging.getLogger("absl").level))


def write_tree(path, tree: Any, config: ModelConfig, *, overwrite: bool = False,
               source: Optional[Dict[str, Any]] = None) -> Path:
  """Writes `tree` (leaves: jax/numpy arrays or Streamed) and `config` as a checkpoint at `path`."""
  _quiet_orbax()
  meta = {"format": FORMAT, "version": VERSION, "model": config_lib.to_dict(config), "source": source or {}}
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES), tree)
  with atomic_dir(path, overwrite) as tmp:
    handler = ocp.CompositeCheckpointHandler(**{
        PARAMS: ocp.PyTreeCheckpointHandler(type_handler_registry=_registry()),
        CONFIG: ocp.JsonCheckpointHandler()})
    with ocp.Checkpointer(handler) as checkpointer:
      checkpointer.save(epath.Path(tmp), ocp.args.Composite(**{
          PARAMS: ocp.args.PyTreeSave(tree, save_args=save_args), CONFIG: ocp.args.JsonSave(meta)}))
  return Path(path).absolute()


def save_model(path, model: Union[nnx.Module, Dict[str, Any]], config: Optional[ModelConfig] = None, *,
               overwrite: bool = False) -> Path:
  """Saves a Mixtral (or a parameter pure dict plus its `config`) so load_model(path) rebuilds it.
  Sharded jax.Arrays are written shard by shard by Orbax (works multi-host)."""
  if isinstance(model, nnx.Module):
    from mixtral_jax.model import state_of
    config = config or model.config
    tree = state_of(model)  # the canonical (stacked) tree, whatever the model's layout
  else:
    tree = model
  if config is None:
    raise ValueError("save_model needs the ModelConfig when given a parameter dict")
  return write_tree(path, tree, config.replace(param_dtype=_tree_dtype(tree, config.param_dtype)),
                    overwrite=overwrite)


def _tree_dtype(tree, default: str) -> str:
  dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(tree)}
  return dtypes.pop() if len(dtypes) == 1 else default


def _check_dir(path) -> epath.Path:
  path = epath.Path(Path(path).absolute())
  if not path.exists():
    raise CheckpointError(f"{path} does not exist")
  if not (path / CONFIG).is_dir() or not (path / PARAMS).is_dir():
    raise CheckpointError(f"{path} is not a mixtral_jax checkpoint (expected {CONFIG}/ and {PARAMS}/ inside)")
  return path


def load_metadata(path) -> Dict[str, Any]:
  """The JSON stored beside the parameters: {"format", "version", "model", "source"}."""
  path = _check_dir(path)
  _quiet_orbax()
  meta = ocp.JsonCheckpointHandler().restore(path / CONFIG)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{path / CONFIG}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                          f"expected {FORMAT!r} version {VERSION}")
  return meta


def load_config(path, **overrides) -> ModelConfig:
  """The stored ModelConfig (execution fields older versions stored are dropped), with `overrides`
  (ModelConfig fields: an execution field here is an error naming its config.run home)."""
  stored = config_lib.to_dict(_stored_config(path))
  return config_lib.model_config_from({**stored, **overrides})


def _stored_config(path) -> ModelConfig:
  try:
    return config_lib.from_dict(load_metadata(path)["model"])
  except config_lib.ConfigError as e:
    raise CheckpointError(f"{Path(path) / CONFIG}: {e}") from None


Shardings = Union[None, jax.sharding.Sharding, Any, Callable[[nnx.State], Any]]


def load_model(path, dtype: Optional[str] = "float32", shardings: Shardings = None, *,
               execution=None, quant: Optional[str] = None, **config_overrides):
  """The Mixtral saved at `path`, ready to call, running the backend's fastest exact strategy.

  path: a converted checkpoint (the converter or save_model), and, through mixtral_jax.checkpoints.loading, also a
    quantized checkpoint, a training workdir, an HF directory or a Mistral release.
  dtype: parameter dtype ("float32", "bfloat16", ...; None keeps the stored one); the cast happens while
    reading. The compute dtype follows it unless `execution.dtype` says otherwise.
  execution: how it runs (mixtral_jax.execution.Execution; "auto" fields = this backend's inference
    defaults). config_overrides: ModelConfig fields (router options, jitter...).
  shardings: where each parameter goes; each device reads only its own slice from disk. One of
    None (the default device), a single jax.sharding.Sharding for every parameter (e.g. replicated
    NamedSharding(mesh, P())), a pytree of Shardings shaped like params_of(model) or like nnx.State,
    or a callable taking the abstract nnx.State (Params carry `logical_axes` metadata) and returning
    one of those. With shardings the layout is the stacked one (what a mesh splits).
  """
  from mixtral_jax.checkpoints import loading
  from mixtral_jax.execution import resolve
  from mixtral_jax.model import abstract_model, with_state
  if loading.kind_of(path) != "mixtral_jax":
    if shardings is not None or config_overrides:
      raise CheckpointError(f"{path}: shardings and config overrides need a converted checkpoint "
                            f"(python -m mixtral_jax.convert)")
    return loading.load(path, dtype=dtype, execution=execution, quant=quant)
  cfg, state = restore_state(path, dtype, shardings, **config_overrides)
  if shardings is not None and (execution is None or execution.layout == "auto"):
    from mixtral_jax.execution import Execution
    execution = (execution or Execution()).replace(layout="stacked")
  model = with_state(abstract_model(cfg, resolve(execution, param_dtype=cfg.param_dtype)), state)
  if quant:
    from mixtral_jax.inference import quant as quant_lib
    model = quant_lib.quantize_model(model, quant, consume=True)
  return model


def restore_state(path, dtype: Optional[str] = "float32", shardings: Shardings = None, **config_overrides):
  """(ModelConfig, canonical state pure dict) of a converted checkpoint; see load_model."""
  meta_dtype = load_metadata(path)["model"]["param_dtype"]
  dtype = dtype or meta_dtype
  if dtype not in config_lib.DTYPES:
    raise CheckpointError(f"dtype={dtype!r} is not one of {', '.join(config_lib.DTYPES)}")
  cfg = load_config(path, **{"param_dtype": dtype, **config_overrides})
  from mixtral_jax.model import STACKED, abstract_model  # noqa: PLC0415 -- keeps import cost off the CLI
  state = nnx.state(abstract_model(cfg, STACKED))
  target = nnx.to_pure_dict(state)  # ShapeDtypeStruct leaves
  shardings = shardings(state) if callable(shardings) else shardings
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, target)
  elif isinstance(shardings, nnx.State):
    shardings = nnx.to_pure_dict(shardings)
  _check_stored(path, target)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(_check_dir(path) / PARAMS,
                                    args=ocp.args.PyTreeRestore(target, restore_args=restore_args))
  return cfg, restored


def _flat(tree) -> Dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[".".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def stored_arrays(path) -> Dict[str, Any]:
  """name ("layers.moe.w1") -> metadata (shape, dtype) of every stored parameter."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(_check_dir(path) / PARAMS)
  tree = getattr(meta, "item_metadata", meta)
  tree = tree.tree if hasattr(tree, "tree") else tree
  return _flat(tree)


def _check_stored(path, target) -> None:
  stored, wanted = stored_arrays(path), _flat(target)
  for name in sorted(set(wanted) | set(stored)):
    if name not in stored:
      raise CheckpointError(f"{path}: parameter {name} is missing from the checkpoint")
    if name not in wanted:
      raise CheckpointError(f"{path}: stored parameter {name} is not part of the model its config describes")
    if tuple(stored[name].shape) != tuple(wanted[name].shape):
      raise CheckpointError(f"{path}: parameter {name} is stored with shape {tuple(stored[name].shape)}, "
                            f"the config implies {tuple(wanted[name].shape)}")


def open_arrays(path) -> Dict[str, ts.TensorStore]:
  """name -> an open TensorStore of each stored parameter, for reading slices (one layer, one expert)
  without restoring whole arrays."""
  params_dir = _check_dir(path) / PARAMS
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
  use_zarr3 = bool(json.loads((params_dir / "_METADATA").read_text()).get("use_zarr3", False))
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
  out = {}
  for name in stored_arrays(path):
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=params_dir, is_ocdbt_checkpoint=use_ocdbt,
                                       use_zarr3=use_zarr3)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    out[name] = ts.open(ts.Spec(spec), open=True, read=True, context=context).result()
  return out


__all__ = ["save_model", "load_model", "load_config", "load_metadata", "write_tree", "open_arrays",
           "stored_arrays", "atomic_dir", "CheckpointError"]
