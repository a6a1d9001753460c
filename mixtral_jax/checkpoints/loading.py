"""One way in: whatever a directory holds, the same Mixtral, running the way it is asked to.

    model = loading.load(path)                              # the backend's fastest exact inference
    model = loading.load(path, execution=Execution(layout="stacked"), purpose="train")
    cfg, params, quant = loading.read(path)                 # canonical weights, for the trainer

`path` may hold any of KINDS (detected in this order; `kind_of` names it):
  mixtral_jax  a converted checkpoint (`python -m mixtral_jax.convert`, checkpoint.save_model): config/ + params/
  quantized    quant.save_quantized: quantized.json + params.safetensors (QTensor weights)
  workdir      a training workdir of this trainer: checkpoints/N (its latest full weights)
  hf           an HF directory: config.json + *.safetensors (legacy or fused experts, sharded or not)
  mistral      the original Mistral release: params.json + consolidated.*
`checkpoint.load_model`, `--config.checkpoint` in every mode (generate, eval, train) and the notebooks
all come through here, so every kind loads everywhere. Bad input is a CheckpointError naming the file.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, NamedTuple, Optional

from mixtral_jax.config import ModelConfig
from mixtral_jax.execution import Execution, resolve
from mixtral_jax.checkpoints.formats import CheckpointError
from mixtral_jax.registry import Registry


class Kind(NamedTuple):
  detect: Callable[[str], bool]
  read: Callable[[str, Optional[str]], tuple]   # (path, dtype) -> (ModelConfig, canonical state, quant)


KINDS = Registry("checkpoint kind")


def _register(name, detect):
  def decorator(read):
    KINDS.register(name)(Kind(detect, read))
    return read
  return decorator


def _has(path, *names) -> bool:
  return all(os.path.exists(os.path.join(path, n)) for n in names)


@_register("mixtral_jax", lambda p: _has(p, "config", "params"))
def _read_converted(path, dtype):
  from mixtral_jax.checkpoints import store as checkpoint
  cfg, state = checkpoint.restore_state(path, dtype)
  return cfg, state, None


@_register("quantized", lambda p: _has(p, "quantized.json"))
def _read_quantized(path, dtype):
  from mixtral_jax.inference import quant
  from mixtral_jax.model import STACKED, state_of
  model = quant.load_quantized(path, execution=STACKED)  # stored stacked: no round trip through another layout
  return model.config, state_of(model), model.quant


@_register("workdir", lambda p: os.path.isdir(os.path.join(p, "checkpoints")))
def _read_workdir(path, dtype):
  from mixtral_jax.training.run_checkpoints import load_trainer_checkpoint
  cfg, params = load_trainer_checkpoint(path)
  return _cast(cfg, params, dtype)


def _read_release(fmt):
  def read(path, dtype):
    from mixtral_jax.checkpoints import sources
    source = sources.open_source(path, fmt)
    try:
      cfg = source.config if dtype is None else source.config.replace(param_dtype=dtype)
      params = sources.read_tree(source, cfg.jnp_param_dtype)
    finally:
      source.close()
    return cfg, params, None
  return read


_register("hf", lambda p: _has(p, "config.json") and bool(glob.glob(os.path.join(p, "*.safetensors"))))(
    _read_release("hf"))
_register("mistral", lambda p: _has(p, "params.json"))(_read_release("mistral"))


def _cast(cfg: ModelConfig, params, dtype: Optional[str]):
  import jax
  import jax.numpy as jnp
  if dtype is None or dtype == cfg.param_dtype:
    return cfg, params, None
  cfg = cfg.replace(param_dtype=dtype)
  return cfg, jax.tree.map(lambda a: jnp.asarray(a, cfg.jnp_param_dtype), params), None


def kind_of(path) -> str:
  """The kind of checkpoint `path` holds; CheckpointError (one sentence naming the path) if none."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  for name in ("mixtral_jax", "quantized", "workdir", "hf", "mistral"):
    if KINDS.get(name).detect(path):
      return name
  raise CheckpointError(f"{path} holds no checkpoint (expected config/ + params/, quantized.json, checkpoints/, "
                        f"an HF config.json + *.safetensors, or a Mistral params.json)")


def read(path, dtype: Optional[str] = "float32"):
  """(ModelConfig, canonical state pure dict, quant level or None) of whatever `path` holds. dtype: the
  float parameters' dtype (None keeps the stored one)."""
  return KINDS.get(kind_of(path)).read(os.fspath(path), dtype)


def load(path, *, dtype: Optional[str] = "float32", execution: Optional[Execution] = None,
         purpose: str = "inference", quant: Optional[str] = None):
  """A Mixtral of whatever `path` holds, with `execution` resolved for `purpose` (default: this
  backend's fastest exact inference); `quant` (q8..q2) quantizes the attention and expert weights."""
  from mixtral_jax.inference import quant as quant_lib
  from mixtral_jax.model import abstract_model, with_state
  cfg, state, stored_quant = read(path, dtype)
  if quant and stored_quant:
    raise CheckpointError(f"{path} is already quantized ({stored_quant}); load it without a quant level")
  run = resolve(execution, purpose=purpose, param_dtype=cfg.param_dtype)
  model = with_state(abstract_model(cfg, run), state)
  if stored_quant:
    model.quant = stored_quant
  if quant:
    model = quant_lib.quantize_model(model, quant, consume=True)  # the float model is ours to free
  return model
