"""Checkpoints of training runs (Orbax), and the two ways weights enter and leave a fine-tuning run.

A step directory WORKDIR/checkpoints/N holds three items:
  state  the train state (params or LoRA adapters, optimizer state, step, RNG, non-parameter model state)
  data   the grain iterator position (grain.checkpoint handler)
  meta   JSON: the ModelConfig, the LoRA settings and the tokenizer, so a resume (or a fine-tune that starts
         from this workdir) rebuilds the same model and refuses a different one.
Saves are periodic and asynchronous (`config.train.checkpoint_every`, `keep_checkpoints`,
`async_checkpoints`); Orbax writes to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mixtral_jax.config import ConfigError, ModelConfig, model_config_from


def _handlers(**extra):
  return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(), **extra}


def _first_difference(stored: Any, current: Any, prefix: str = "") -> Optional[str]:
  if isinstance(stored, dict) and isinstance(current, dict):
    for key in sorted(set(stored) | set(current)):
      found = _first_difference(stored.get(key), current.get(key), f"{prefix}{key}.")
      if found:
        return found
    return None
  return None if stored == current else f"{prefix[:-1]} (checkpoint {stored!r}, config {current!r})"


class Checkpoints:
  """The run's CheckpointManager: periodic async saves, keep-N, and resume of state + data position."""

  def __init__(self, workdir: str, train):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every = train.checkpoint_every
    options = ocp.CheckpointManagerOptions(max_to_keep=train.keep_checkpoints,
                                           enable_async_checkpointing=train.async_checkpoints, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, state, iterator, meta: dict):
    """(state, iterator) at the latest checkpoint, or None for a fresh workdir. `state` and `iterator` give
    the structure; a checkpoint of a different model or LoRA setup is an error naming the field."""
    step = self.manager.latest_step()
    if step is None:
      return None
    stored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    current = json.loads(json.dumps(meta))
    for key in ("model", "lora"):
      diff = _first_difference({key: stored.get(key)}, {key: current.get(key)})
      if diff:
        raise ConfigError(f"{self.directory} holds a checkpoint of a different run: {diff}; "
                          f"use a fresh --workdir")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"], iterator

  def save(self, step: int, state, iterator, meta: dict, *, force: bool = False) -> bool:
    """Saves if the step is due (every `checkpoint_every`) or forced, and not saved yet."""
    if (step % self.every and not force) or self.manager.latest_step() == step:
      return False
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
        meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    self.manager.wait_until_finished()


# ------------------------------------------------------------------------------------ weights in and out

def _load_trainer_checkpoint(workdir: str):
  """(ModelConfig, params) from the latest checkpoint of a workdir this trainer wrote (full weights)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=_handlers(state=ocp.PyTreeCheckpointHandler()))
  step = manager.latest_step()
  if step is None:
    raise ConfigError(f"config.checkpoint: {directory} holds no checkpoint")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta.get("lora"):
    raise ConfigError(f"config.checkpoint: {workdir} holds LoRA adapters, not full weights; fine-tune from its "
                      f"merged export (config.train.export_hf=True writes WORKDIR/hf)")
  cfg = model_config_from(meta["model"])
  from mixtral_jax.model import Mixtral
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype), abstract)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
  return cfg, restored["state"]["params"]


def _load_hf_directory(path: str):
  """(ModelConfig, params) from an HF directory: config.json + *.safetensors (either expert layout)."""
  from safetensors import safe_open
  from mixtral_jax.params import config_from_hf, from_hf
  with open(os.path.join(path, "config.json")) as f:
    cfg = config_from_hf(json.load(f))
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise ConfigError(f"config.checkpoint: {path} has config.json but no *.safetensors files")
  handles = [safe_open(f, framework="numpy") for f in files]
  where = {name: h for h in handles for name in h.keys()}
  return cfg, from_hf(lambda name: where[name].get_tensor(name), list(where), cfg, dtype=np.float32)


def load_pretrained(path: str):
  """(ModelConfig, params pure dict) of the weights to fine-tune: the single place they are read.

  Uses mixtral_jax.checkpoint.load_model (issue 3's converter) when it exists and the path is its format;
  also reads a workdir of this trainer and an HF directory (config.json + *.safetensors).
  """
  if not os.path.exists(path):
    raise ConfigError(f"config.checkpoint: {path} does not exist")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return _load_trainer_checkpoint(path)
  if os.path.isfile(os.path.join(path, "config.json")) and glob.glob(os.path.join(path, "*.safetensors")):
    return _load_hf_directory(path)
  try:
    from mixtral_jax.checkpoint import load_model  # issue 3
  except ImportError:
    raise ConfigError(f"config.checkpoint: {path} is neither a training workdir nor an HF directory "
                      f"(config.json + *.safetensors)") from None
  from mixtral_jax.model import params_of
  model = load_model(path)
  return model.config, params_of(model)


def export_hf(cfg: ModelConfig, params, out_dir: str) -> str:
  """Writes params (merged, for LoRA) as an HF Mixtral directory: config.json + model.safetensors in the
  legacy per-expert layout that transformers loads."""
  from safetensors.numpy import save_file
  from mixtral_jax.params import config_to_hf, to_hf
  os.makedirs(out_dir, exist_ok=True)
  host = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  tensors = {name: np.ascontiguousarray(array) for name, array in to_hf(host, cfg)}
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump({**config_to_hf(cfg), "torch_dtype": "float32"}, f, indent=2)
  return out_dir
