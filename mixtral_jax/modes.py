"""What `run.py` can do, chosen by `config.mode` through the MODES registry.

Each mode is `fn(config: ConfigDict, workdir: str) -> None`. Later modes (train, generate, eval, plan)
register themselves in their own modules; `load_modes()` imports them.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.registry import Registry

MODES = Registry("mode")

# Modules that register modes; imported lazily so `import mixtral_jax` stays light.
_MODE_MODULES = ("mixtral_jax.training.train", "mixtral_jax.inference.generate", "mixtral_jax.training.plan",
                 "mixtral_jax.inference.evaluate")


def load_modes() -> Registry:
  for name in _MODE_MODULES:
    importlib.import_module(name)
  return MODES


def expert_load(experts: jax.Array, num_experts: int) -> np.ndarray:
  """[L, ..., k] chosen experts -> [L, E] fraction of routing slots each expert received."""
  flat = experts.reshape(experts.shape[0], -1)  # [L, N*k]
  counts = jax.vmap(lambda e: jnp.bincount(e, length=num_experts))(flat)  # [L, E]
  return np.asarray(counts / flat.shape[1])


@MODES.register("summary")
def summary(config, workdir):
  """Builds the model, runs one forward pass, prints parameter counts and per-layer expert load."""
  from mixtral_jax.config import model_config_from
  from mixtral_jax.model import active_param_count, build, param_count
  cfg = model_config_from(config.model)
  model = build(cfg, seed=config.seed)
  tokens = jax.random.randint(jax.random.key(config.seed), (config.batch_size, config.seq_len), 0,
                              cfg.vocab_size)
  out = jax.jit(lambda m, t: m(t))(model, tokens)
  total, active = param_count(model), active_param_count(cfg)
  print(f"parameters: {total:,} total, {active:,} active per token ({active / total:.1%})")
  print(f"logits: {tuple(out.logits.shape)} finite={bool(jnp.isfinite(out.logits).all())}")
  load = expert_load(out.router.experts, cfg.num_experts)
  print(f"expert load per layer (fraction of {config.batch_size * config.seq_len * cfg.top_k} slots):")
  for layer, row in enumerate(load):
    print(f"  layer {layer:2d}: " + " ".join(f"{x:.3f}" for x in row))
