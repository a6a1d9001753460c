"""The one place where a ConfigDict becomes frozen dataclasses, and where configs are validated.

Modules never see a ConfigDict: `Mixtral` takes a `ModelConfig`, and its submodules take plain scalars.
Validation runs before anything is traced, so a bad config fails in one sentence naming the field.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


class ConfigError(ValueError):
  """A user-caused configuration error; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a Mixtral-style decoder. Defaults are the released Mixtral 8x7B."""
  vocab_size: int = 32000
  dim: int = 4096                 # residual stream width D
  num_layers: int = 32
  num_heads: int = 32             # query heads H
  num_kv_heads: int = 8           # key/value heads K (grouped-query attention: H % K == 0)
  head_dim: int = 128             # explicit: may differ from dim // num_heads
  ffn_dim: int = 14336            # expert hidden width F
  num_experts: int = 8            # routed experts E
  top_k: int = 2                  # experts per token
  rope_theta: float = 1e6
  norm_eps: float = 1e-5
  sliding_window: Optional[int] = None   # None (or 0 in a ConfigDict) = full causal attention
  max_positions: int = 32768
  router: str = "mixtral_topk"    # name in mixtral_jax.moe.routers.ROUTERS
  router_options: tuple = ()      # extra router keyword arguments, as sorted (name, value) pairs
  num_shared_experts: int = 0     # DeepSeekMoE-style always-on experts of width ffn_dim
  router_jitter: float = 0.0      # multiplicative noise on the router input, training only
  router_logits_cap: float = 0.0  # > 0: router logits soft-capped to cap * tanh(logits / cap); 0 = off
  param_dtype: str = "float32"    # the stored weights' dtype (how it computes: execution.Execution)

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def router_kwargs(self) -> dict:
    return dict(self.router_options)

  def replace(self, **changes) -> "ModelConfig":
    return validate(dataclasses.replace(self, **changes))


_POSITIVE = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
             "num_experts", "top_k", "max_positions")


def validate(cfg: ModelConfig) -> ModelConfig:
  """Checks a ModelConfig; raises ConfigError naming the field. Returns cfg for chaining."""
  # Imported here: the registries import this module.
  from mixtral_jax.moe import routers

  for name in _POSITIVE:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.model.{name} must be a positive integer, got {value!r}")
  if cfg.num_heads % cfg.num_kv_heads:
    raise ConfigError(f"config.model.num_heads={cfg.num_heads} is not divisible by "
                      f"config.model.num_kv_heads={cfg.num_kv_heads}")
  if cfg.head_dim % 2:
    raise ConfigError(f"config.model.head_dim={cfg.head_dim} must be even for rotary embeddings")
  if cfg.top_k > cfg.num_experts:
    raise ConfigError(f"config.model.top_k={cfg.top_k} exceeds config.model.num_experts={cfg.num_experts}")
  if cfg.sliding_window is not None and cfg.sliding_window <= 0:
    raise ConfigError(f"config.model.sliding_window must be positive or None, got {cfg.sliding_window!r}")
  if cfg.rope_theta <= 0 or cfg.norm_eps <= 0:
    raise ConfigError("config.model.rope_theta and config.model.norm_eps must be positive")
  if cfg.router not in routers.ROUTERS:
    raise ConfigError(f"config.model.router={cfg.router!r} is unknown; known: {', '.join(routers.ROUTERS.names())}")
  if cfg.num_shared_experts < 0 or cfg.router_jitter < 0:
    raise ConfigError("config.model.num_shared_experts and config.model.router_jitter must be >= 0")
  if not cfg.router_logits_cap >= 0:
    raise ConfigError(f"config.model.router_logits_cap must be >= 0 (0 = off), got {cfg.router_logits_cap!r}")
  problem = routers.check_router_config(cfg.router, cfg.top_k, cfg.num_experts, cfg.router_kwargs)
  if problem:
    raise ConfigError(problem)
  if cfg.param_dtype not in DTYPES:
    raise ConfigError(f"config.model.param_dtype={cfg.param_dtype!r} is not one of {', '.join(DTYPES)}")
  return cfg


# Fields ModelConfig held before execution moved to `config.run` (mixtral_jax/execution.py), and where
# they went. Stored configs of older checkpoints still carry them: `from_dict` drops them silently.
MOVED_TO_RUN = {"dispatch": "train_dispatch / prefill_dispatch / decode_dispatch",
                "capacity_factor": "capacity_factor", "grouped_matmul": "grouped_matmul", "dtype": "dtype",
                "remat": "remat", "scan_layers": "layout"}


def model_config_from(model: Mapping[str, Any] | ml_collections.ConfigDict) -> ModelConfig:
  """ConfigDict (the `model` section) -> validated ModelConfig. Unknown fields are errors, not ignored."""
  if isinstance(model, ml_collections.ConfigDict):
    model = model.to_dict()
  model = dict(model)
  moved = sorted(set(model) & set(MOVED_TO_RUN))
  if moved:
    raise ConfigError(f"config.model.{moved[0]} is how the model runs, not what it is: set "
                      f"config.run.{MOVED_TO_RUN[moved[0]]} instead")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(model) - known)
  if unknown:
    raise ConfigError(f"config.model has unknown field(s): {', '.join(unknown)}")
  if model.get("sliding_window") in (0, -1):
    model["sliding_window"] = None
  options = model.get("router_options", ())
  if isinstance(options, Mapping):
    model["router_options"] = tuple(sorted(dict(options).items()))
  return validate(ModelConfig(**model))


def to_dict(cfg: ModelConfig) -> dict:
  """ModelConfig -> JSON-friendly dict (stored beside every checkpoint so a resume rebuilds the model)."""
  out = dataclasses.asdict(cfg)
  out["router_options"] = dict(cfg.router_options)
  return out


def from_dict(d: Mapping[str, Any]) -> ModelConfig:
  """A stored config -> ModelConfig; execution fields written by older versions are ignored."""
  return model_config_from({k: v for k, v in d.items() if k not in MOVED_TO_RUN})
