"""Meshes and logical-axis sharding: the same config runs on one device or on a mesh of many.

Every parameter carries logical axis names (`logical_axes=(...)`, see layers.normal_param); `config.mesh.rules`
maps each logical name to mesh axes. The mesh has four named axes, outermost first:

  data    pure data parallelism: parameters replicated, batch split
  fsdp    batch split, and every weight's `embed` axis (XLA gathers a layer's weights just in time)
  expert  expert weights split on `expert`, tokens travel to them (mixtral_jax.parallel.expert_parallel); also
          splits the batch and the other weights' `embed` (an expert weight's `expert` takes it first)
  tensor  attention heads, the expert FFN width and the vocabulary split (Megatron-style)

Sizes come from `config.mesh` (-1 = all remaining devices). `tensor` is innermost because it talks most.
Activations are constrained only inside `use_mesh(...)`; outside it `constrain` is the identity, so the
model code is the same with and without a mesh. The mesh config is converted here (not in config.py) so that
single-device users never need it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axes; the defaults of configs/base.py. Logical names not listed are replicated.
DEFAULT_RULES = {
    # parameters
    "layers": "",            # the scanned layer axis: never split (scan slices it)
    "vocab": "tensor",
    "embed": "fsdp,expert",  # non-expert weights also split over the expert axis (experts take it first)
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": "",
    "mlp": "tensor",
    "expert": "expert",
    # activations
    "batch": "data,fsdp,expert",  # every device but the tensor group holds different tokens
    "seq": "",
    "act_embed": "",
    "act_vocab": "tensor",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh` as a frozen value: axis sizes (-1 = the rest) and logical -> mesh-axes rules."""
  data: int = 1
  fsdp: int = -1
  expert: int = 1
  tensor: int = 1
  rules: tuple = tuple(sorted((k, tuple(filter(None, v.split(",")))) for k, v in DEFAULT_RULES.items()))

  @property
  def shape(self) -> dict:
    return {a: getattr(self, a) for a in MESH_AXES}

  @property
  def rules_dict(self) -> dict:
    return dict(self.rules)


def mesh_config_from(section: Mapping[str, Any] | ml_collections.ConfigDict | None) -> MeshConfig:
  """ConfigDict (the `mesh` section) -> validated MeshConfig; errors name the field."""
  if section is None:
    return MeshConfig()
  if isinstance(section, ml_collections.ConfigDict):
    section = section.to_dict()
  section = dict(section)
  unknown = sorted(set(section) - set(MESH_AXES) - {"rules"})
  if unknown:
    raise ConfigError(f"config.mesh has unknown field(s): {', '.join(unknown)}; known: "
                      f"{', '.join(MESH_AXES)}, rules")
  sizes = {}
  for axis in MESH_AXES:
    value = section.get(axis, getattr(MeshConfig, axis))
    if not isinstance(value, int) or isinstance(value, bool) or not (value >= 1 or value == -1):
      raise ConfigError(f"config.mesh.{axis} must be a positive integer or -1, got {value!r}")
    sizes[axis] = value
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ConfigError("config.mesh: at most one axis may be -1 (= the remaining devices)")
  rules = dict(DEFAULT_RULES)
  rules.update(section.get("rules") or {})
  parsed = {}
  for name, value in rules.items():
    axes = tuple(a.strip() for a in (value or "").split(",") if a.strip()) if isinstance(value, str) else tuple(
        value or ())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"config.mesh.rules.{name}={value!r} names unknown mesh axis {bad[0]!r}; "
                        f"known: {', '.join(MESH_AXES)}")
    if len(set(axes)) != len(axes):
      raise ConfigError(f"config.mesh.rules.{name}={value!r} repeats a mesh axis")
    parsed[name] = axes
  return MeshConfig(**sizes, rules=tuple(sorted(parsed.items())))


def resolve_shape(cfg: MeshConfig, num_devices: int) -> dict:
  """Axis sizes with -1 filled in; their product must be the device count."""
  shape = cfg.shape
  fixed = math.prod(v for v in shape.values() if v != -1)
  if -1 in shape.values():
    if num_devices % fixed:
      raise ConfigError(f"config.mesh: fixed axes {shape} (product {fixed}) do not divide the "
                        f"{num_devices} devices")
    shape = {a: (num_devices // fixed if v == -1 else v) for a, v in shape.items()}
  if math.prod(shape.values()) != num_devices:
    raise ConfigError(f"config.mesh {shape} needs {math.prod(shape.values())} devices, "
                      f"{num_devices} are available")
  return shape


def make_mesh(cfg: MeshConfig | Mapping | None = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A Mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all, on all processes).

  Axes are `Auto` (GSPMD propagates shardings from the constraints we place), not jax's newer default of
  `Explicit`.
  """
  if not isinstance(cfg, MeshConfig):
    cfg = mesh_config_from(cfg)
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(cfg, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# --- logical axes -> PartitionSpec -------------------------------------------------------------------------

def logical_to_spec(logical_axes: Sequence[Optional[str]], rules: Mapping[str, tuple], mesh: Mesh = None,
                    shape: Optional[Sequence[int]] = None) -> P:
  """PartitionSpec for one array. A mesh axis is used at most once per array (first dimension wins); with
  `mesh` and `shape`, mesh axes of size 1 are dropped and a dimension that the product of its mesh axes does
  not divide gives up its trailing axes until it does (so odd test sizes and small vocabularies replicate
  instead of failing)."""
  used, spec = set(), []
  for i, name in enumerate(logical_axes):
    axes = [a for a in rules.get(name, ()) if a not in used] if name else []
    if mesh is not None:
      axes = [a for a in axes if mesh.shape[a] > 1]
      if shape is not None:
        while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
          axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def flat_variables(model_or_state):
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  return state.flat_state()


def variable_logical_axes(path: tuple, variable) -> tuple:
  """Logical axes of one model variable. Under `layers` the stacked leading axis is not in the metadata
  (nnx.vmap does not rewrite custom metadata), so 'layers' is prepended there."""
  axes = tuple(variable.get_metadata().get("logical_axes") or ())
  ndim = len(variable.shape) if hasattr(variable, "shape") else np.ndim(variable.get_value())
  if path and path[0] == "layers" and ndim == len(axes) + 1:
    axes = ("layers",) + axes
  if len(axes) != ndim:  # no (or stale) annotation: replicate rather than guess
    axes = (None,) * ndim
  return axes


def _unflatten(items: dict) -> dict:
  out: dict = {}
  for path, value in items.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def logical_axes_tree(model_or_state) -> dict:
  """Pure dict (shaped like nnx.to_pure_dict(nnx.state(model))) of logical-axes tuples."""
  return _unflatten({path: variable_logical_axes(path, v) for path, v in flat_variables(model_or_state)})


def state_shardings(model_or_state, mesh: Mesh, rules: Mapping[str, tuple]) -> dict:
  """Pure dict of NamedShardings for every variable of a model (concrete or from nnx.eval_shape)."""
  out = {}
  for path, v in flat_variables(model_or_state):
    spec = logical_to_spec(variable_logical_axes(path, v), rules, mesh, v.shape)
    out[path] = NamedSharding(mesh, spec)
  return _unflatten(out)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, tuple]) -> nnx.Module:
  """Moves an existing model's variables onto `mesh` per the rules (in place; returns the model)."""
  state = nnx.state(model)
  values = jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh, rules))
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
  return model


def mesh_from_config(config) -> tuple:
  """(mesh, rules) for `config.mesh` over every device of every process; (None, None) on a single device,
  where there is nothing to split and runs stay exactly as they were."""
  mesh_cfg = mesh_config_from(config.get("mesh"))
  if jax.device_count() == 1:
    return None, None
  return make_mesh(mesh_cfg), mesh_cfg.rules_dict


def put(x, target: NamedSharding):
  """device_put that also works across processes (each process fills the shards its devices hold from
  its own identical copy)."""
  if jax.process_count() == 1:
    return jax.device_put(x, target)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


# --- activations --------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mixtral_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh], rules: Optional[Mapping[str, tuple]]):
  """Within this context, traced model code constrains activations and expert-parallel dispatch uses
  `mesh`. Trace (first call of a jitted function) inside it. mesh=None: nothing changes."""
  if mesh is None:
    yield None
    return
  token = _ACTIVE.set((mesh, dict(rules)))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.reset(token)


def current():
  """(mesh, rules) of the innermost use_mesh, or None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """with_sharding_constraint by logical names inside use_mesh; the identity outside."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh,
                                                                                   x.shape)))


def data_sharding(mesh: Mesh, rules: Mapping[str, tuple], shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [B, T, ...] input batch: B over the `batch` rule's axes."""
  return NamedSharding(mesh, logical_to_spec(("batch", "seq") + (None,) * (len(shape) - 2), rules, mesh, shape))


def put_batch(batch, mesh: Mesh, rules: Mapping[str, tuple]):
  """A global host batch (an array or a dict of [B, T, ...] arrays, identical on every process) -> sharded
  jax.Arrays; each process fills only the shards its own devices hold, so this is also how multi-process
  runs feed data."""
  if isinstance(batch, Mapping):
    return {k: put_batch(v, mesh, rules) for k, v in batch.items()}
  batch = np.asarray(batch)
  sharding = data_sharding(mesh, rules, batch.shape)
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


# --- multi-process ------------------------------------------------------------------------------------------

def initialize_distributed(section: Mapping[str, Any] | ml_collections.ConfigDict | None = None) -> bool:
  """jax.distributed.initialize from `config.distributed` or the environment; returns whether it ran.

  Fields (all optional): coordinator_address ("host:port"), num_processes, process_id. Environment
  variables MIXTRAL_COORDINATOR / MIXTRAL_NUM_PROCESSES / MIXTRAL_PROCESS_ID fill the gaps. With none of
  them set and `auto=True`, jax's own cluster detection (SLURM, TPU pods, Open MPI) is used. Single process
  (nothing set): does nothing.
  """
  section = dict(section.to_dict() if isinstance(section, ml_collections.ConfigDict) else (section or {}))
  address = section.get("coordinator_address") or os.environ.get("MIXTRAL_COORDINATOR") or None
  num = section.get("num_processes") or int(os.environ.get("MIXTRAL_NUM_PROCESSES", 0)) or None
  pid = section.get("process_id")
  if pid is None or pid < 0:
    pid = int(os.environ["MIXTRAL_PROCESS_ID"]) if "MIXTRAL_PROCESS_ID" in os.environ else None
  if address is None and not section.get("auto", False):
    return False
  if address is not None and (num is None or pid is None):
    raise ConfigError("config.distributed.coordinator_address is set but num_processes / process_id are not")
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  return True
