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

import json
import os
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mixtral_jax.config import ConfigError, ModelConfig, from_dict


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
    if isinstance(stored.get("model"), dict):  # older runs stored execution fields too: not part of the model
      from mixtral_jax.config import MOVED_TO_RUN
      stored = {**stored, "model": {k: v for k, v in stored["model"].items() if k not in MOVED_TO_RUN}}
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

def load_trainer_checkpoint(workdir: str):
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
                      f"merged export WORKDIR/export (config.train.export=True)")
  cfg = from_dict(meta["model"])
  from mixtral_jax.model import abstract_params
  abstract = abstract_params(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=device, dtype=s.dtype), abstract)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
  return cfg, restored["state"]["params"]


def load_pretrained(path: str, *, dtype: Optional[str] = "float32"):
  """(ModelConfig, params pure dict) of the weights to fine-tune, through the one loader
  (mixtral_jax.checkpoints.loading: a converted or quantized checkpoint, a workdir of this trainer, an HF directory
  or a Mistral release). `dtype` casts while reading (None keeps the stored dtype); quantized weights are
  dequantized (fine-tuning updates float weights)."""
  from mixtral_jax.checkpoints import loading
  from mixtral_jax.checkpoints.formats import CheckpointError
  from mixtral_jax.inference.quant import QTensor
  try:
    cfg, state, quant = loading.read(path, dtype)
  except CheckpointError as e:
    raise ConfigError(f"config.checkpoint: {e}") from None
  if quant:
    float_dtype = cfg.jnp_param_dtype if dtype is None else jnp.dtype(dtype)
    state = jax.tree.map(lambda a: a.astype(float_dtype) if isinstance(a, QTensor) else a, state,
                         is_leaf=lambda a: isinstance(a, QTensor))
  params = {k: v for k, v in state.items()}
  from mixtral_jax.model import abstract_params, subtree
  params = subtree(params, abstract_params(cfg))
  return cfg, params



def export(cfg: ModelConfig, params, directory: str, *, hf: bool = False) -> dict:
  """Saves `params` (LoRA: already merged) as a mixtral_jax checkpoint at DIRECTORY/export, which
  `load_model` and `--config.checkpoint` read; with hf, also converts it to an HF directory DIRECTORY/hf
  (`python -m mixtral_jax.convert --to-hf` does the same later)."""
  from mixtral_jax import convert
  from mixtral_jax.checkpoints import store as checkpoint
  out = {"export": str(checkpoint.save_model(os.path.join(directory, "export"), jax.device_get(params), cfg,
                                             overwrite=True))}
  if hf:
    hf_dir = os.path.join(directory, "hf")
    convert.to_hf(out["export"], hf_dir, overwrite=True)
    out["hf"] = hf_dir
  return out
