"""Training memory planner (`mode=plan_train`): per-device bytes on a mesh, before buying the hardware.

    python run.py --config=configs/plan_train.py                       # Mixtral 8x7B on 8x H100 80GB
    python run.py --config=configs/plan_train.py:hardware=h200,batch=16,seq=8192,remat=dots

Nothing is allocated: shapes come from nnx.eval_shape / jax.eval_shape, the per-device share of each tensor
from the sharding rules of `config.mesh` (NamedSharding.shard_shape on an AbstractMesh), and activations from
the residuals jax's autodiff actually saves for the backward pass under the config's remat policy, traced at
the per-device batch (`saved_residuals`, the function behind jax.ad_checkpoint.print_saved_residuals).

Regimes: `train` (float32 master weights, float32 gradients, AdamW mu/nu float32: 16 bytes per parameter) and
`lora` (frozen base in param_dtype, float32 adapters with their gradients and AdamW state, plus one merged
copy in param_dtype of the weights mixtral_jax merges each step: the attention ones, and the experts' only
under a dispatch that cannot run adapters on the routed rows (moe/adapted.py: expert-parallel shard_map)).

Estimates, not promises: activations assume tokens split over the data/fsdp/expert axes and (conservatively)
not over `tensor`; the working set adds one layer's gathered weights twice (FSDP prefetch), one layer's
recomputation under remat and the float32 logits gradient; XLA's own temporaries and fragmentation are
covered only by `headroom`. On GPUs JAX preallocates 75% of memory by default: run training with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to get what this plan counts as usable.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from mixtral_jax.parallel import placement, sharding
from mixtral_jax.config import ConfigError, ModelConfig, model_config_from
from mixtral_jax.modes import MODES
from mixtral_jax.moe.adapted import takes_adapters

GiB = 1024 ** 3

# name -> (devices in the slice, memory per device in GiB as the runtime reports it, description)
HARDWARE = {
    "h100_80gb": (8, 79.6, "8x NVIDIA H100 80GB (81559 MiB each)"),
    "h200": (8, 140.4, "8x NVIDIA H200 141GB (143771 MiB each)"),
    "a100_80gb": (8, 79.2, "8x NVIDIA A100 80GB (81251 MiB each)"),
    "tpu_v5p_8": (4, 95.0, "TPU v5p-8: 4 chips (8 TensorCores, one megacore device per chip), 95 GiB HBM each"),
}

# Weights LoRA may adapt (the targets of mixtral_jax's LoRA) and how many leading axes are per-matrix batch.
LORA_LEAVES = {("layers", "attn", n): (1, 2 if n == "wo" else 1) for n in ("wq", "wk", "wv", "wo")}
LORA_LEAVES.update({("layers", "moe", n): (2, 1) for n in ("w1", "w3", "w2")})


@dataclasses.dataclass
class Plan:
  hardware: str
  mesh: dict
  batch_per_device: int
  seq_len: int
  remat: str
  device_gib: float
  usable_gib: float
  rows: dict            # regime -> {component: bytes per device}
  notes: list
  dispatch: str = ""

  def total(self, regime: str) -> int:
    return sum(self.rows[regime].values())

  def fits(self, regime: str) -> bool:
    return self.total(regime) <= self.usable_gib * GiB


def abstract_mesh(shape: dict) -> AbstractMesh:
  return AbstractMesh(tuple(shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def shard_bytes(shape, dtype, spec_sharding: NamedSharding) -> int:
  return math.prod(spec_sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def per_device_param_bytes(abstract: dict, dtype=None) -> int:
  """Sum of each parameter's shard on one device (in `dtype`, default its own)."""
  return sum(shard_bytes(a.shape, dtype or a.dtype, a.sharding) for a in jax.tree.leaves(abstract))


def optimizer_bytes(abstract: dict, master_dtype) -> int:
  """AdamW state per device: jax.eval_shape of optax.adamw's init; mu/nu shard like their parameter."""
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, master_dtype), abstract)
  state = jax.eval_shape(optax.adamw(1e-4).init, params)
  specs = {tuple(k.key for k in path): a.sharding
           for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    total += (shard_bytes(leaf.shape, leaf.dtype, specs[keys]) if keys in specs
              else math.prod(leaf.shape) * leaf.dtype.itemsize)
  return total


def lora_bytes(abstract: dict, rank: int, shards: dict) -> int:
  """Float32 adapters A [..., in, r] and B [..., r, out] for every LoRA target (one per expert), split over the
  expert/tensor axes like their weight; x4 for adapter, gradient, AdamW mu and nu. (A `router` target,
  [L, D, E] float32 trained in full, is under 0.01% of these and not counted.)"""
  total = 0
  for path, (lead_axes, in_axes) in LORA_LEAVES.items():
    shape = abstract[path[0]][path[1]][path[2]].shape
    lead = math.prod(shape[:lead_axes])
    fan_in = math.prod(shape[lead_axes:lead_axes + in_axes])
    fan_out = math.prod(shape[lead_axes + in_axes:])
    split = shards["expert"] if path[1] == "moe" else 1
    total += lead * rank * (fan_in + fan_out) * 4 // split
  return 4 * total


def activation_bytes(cfg: ModelConfig, run, batch: int, seq_len: int) -> tuple[int, int]:
  """(residuals saved for the backward pass, one layer's residuals without remat) for `batch` sequences on
  one device, from jax's own bookkeeping (abstract tracing only)."""
  from jax._src.ad_checkpoint import saved_residuals  # public face: jax.ad_checkpoint.print_saved_residuals
  from mixtral_jax.model import abstract_model

  def residual_bytes(config, run):
    model = abstract_model(config, run)
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
      logits = nnx.merge(graphdef, state)(tokens, train=True).logits
      logp = jax.nn.log_softmax(logits, axis=-1)
      return -jnp.take_along_axis(logp, tokens[..., None], axis=-1).mean()

    res = saved_residuals(loss, state, jax.ShapeDtypeStruct((batch, seq_len), jnp.int32))
    return sum(math.prod(a.shape) * a.dtype.itemsize for a, why in res if "from the argument" not in why)

  saved = residual_bytes(cfg, run)
  one_layer = residual_bytes(cfg.replace(num_layers=1), run.replace(remat="none")) - residual_bytes(
      cfg.replace(num_layers=1), run.replace(remat="full"))
  return saved, max(one_layer, 0)


def compiled_temp_bytes(cfg: ModelConfig, run, batch: int, seq_len: int, *, backward: bool) -> int:
  """XLA's own temp allocation (compiled memory_analysis) of a forward, or a forward+backward of a
  next-token-style loss, over [batch, seq_len] tokens on this backend; nothing runs. A cross-check of the
  plan's activation estimate, and how tests bound attention memory."""
  from mixtral_jax.model import abstract_model
  graphdef, state = nnx.split(abstract_model(cfg, run))
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens, train=backward).logits

  fn = jax.grad(lambda s, x: jnp.mean(jax.nn.logsumexp(forward(s, x), -1))) if backward else forward
  return jax.jit(fn).lower(state, tokens).compile().memory_analysis().temp_size_in_bytes


def plan(cfg: ModelConfig, mesh_cfg: sharding.MeshConfig, *, hardware: str, batch_size: int, seq_len: int,
         lora_rank: int = 16, headroom: float = 0.9, run=None) -> Plan:
  """run: the execution to plan for (remat, train dispatch, compute dtype, attention); "auto" fields take
  the hardware's backend defaults (execution.BACKENDS: gpu / tpu), not this machine's."""
  from mixtral_jax.execution import resolve
  backend = "tpu" if hardware.startswith("tpu") else "gpu"
  run = resolve(run, purpose="train", param_dtype=cfg.param_dtype, backend=backend)
  compute = jnp.dtype(run.dtype)
  if hardware not in HARDWARE:
    raise ConfigError(f"config.plan.hardware={hardware!r} is unknown; known: {', '.join(HARDWARE)}")
  devices, gib, _ = HARDWARE[hardware]
  shape = sharding.resolve_shape(mesh_cfg, devices)
  rules = mesh_cfg.rules_dict
  abstract = placement.abstract_state(cfg, abstract_mesh(shape), rules)
  token_shards = math.prod(shape[a] for a in rules.get("batch", ()))
  if batch_size % token_shards:
    raise ConfigError(f"config.batch_size={batch_size} is not divisible by the {token_shards} token shards "
                      f"of config.mesh {shape}")
  per_device = batch_size // token_shards
  saved, layer = activation_bytes(cfg, run, per_device, seq_len)
  notes = []
  if seq_len >= run.attention_min_len:
    notes.append(f"attention: {run.attention} (from {run.attention_min_len} keys; blocks of {run.flash_block}): "
                 f"saves q, k, v, the output and one float per query row, never the [T, T] scores")
  if run.train_dispatch == "ep_dropless" and shape["expert"] > 1:
    # Static shapes: each device's receive buffer holds the worst case (all peers' rows).
    rows = per_device * seq_len * cfg.top_k * (shape["expert"] - 1)
    extra = rows * (cfg.dim + 3 * cfg.ffn_dim // shape["tensor"]) * compute.itemsize
    saved += extra * (0 if run.remat == "full" else cfg.num_layers)  # the dot policies keep these rows
    layer += extra
    notes.append(f"ep_dropless: worst-case receive buffers add {extra / GiB:.2f} GiB per layer")

  # One layer's weights as the matmuls see them: `embed` gathered (FSDP), still split over expert/tensor.
  gathered_rules = dict(rules, embed=())
  layer_abstract = placement.abstract_state(cfg.replace(num_layers=1), abstract_mesh(shape), gathered_rules)
  gathered = per_device_param_bytes(layer_abstract["layers"], compute)
  logits_grad = per_device * seq_len * cfg.vocab_size * 4
  recompute = 0 if run.remat == "none" else layer  # without remat every layer is already in `saved`
  working = 2 * gathered + recompute + logits_grad

  master = jnp.float32
  rows = {
      "train": {"params": per_device_param_bytes(abstract, master),
                "gradients": per_device_param_bytes(abstract, master),
                "optimizer": optimizer_bytes(abstract, master),
                "activations": saved, "working set": working},
  }
  base = per_device_param_bytes(abstract, cfg.jnp_param_dtype)
  # Expert adapters run on the routed rows (AdaptedExperts) unless the dispatch needs plain weights.
  merged_leaves = [p for p in LORA_LEAVES if p[1] != "moe" or not takes_adapters(run.train_dispatch)]
  merged = sum(shard_bytes(abstract[p[0]][p[1]][p[2]].shape, cfg.jnp_param_dtype, abstract[p[0]][p[1]][p[2]].sharding)
               for p in merged_leaves)
  rows["lora"] = {"params": base + merged, "gradients": 0,
                  "optimizer": lora_bytes(abstract, lora_rank, shape),
                  "activations": saved, "working set": working}
  return Plan(hardware=hardware, mesh=shape, batch_per_device=per_device, seq_len=seq_len, remat=run.remat,
              device_gib=gib, usable_gib=gib * headroom, rows=rows, notes=notes, dispatch=run.train_dispatch)


def render(p: Plan, cfg: ModelConfig) -> str:
  from mixtral_jax.model import abstract_params, param_count
  total = param_count(abstract_params(cfg))
  mesh = " x ".join(f"{a}={n}" for a, n in p.mesh.items() if n > 1) or "1 device"
  lines = [f"{HARDWARE[p.hardware][2]}; mesh {mesh}; {total / 1e9:.1f}B parameters, dispatch {p.dispatch}",
           f"per device: batch {p.batch_per_device} x seq {p.seq_len}, remat={p.remat}, "
           f"usable {p.usable_gib:.1f} of {p.device_gib:.1f} GiB",
           f"{'GiB per device':<16}" + "".join(f"{r:>10}" for r in p.rows)]
  for component in next(iter(p.rows.values())):
    lines.append(f"{component:<16}" + "".join(f"{p.rows[r][component] / GiB:>10.2f}" for r in p.rows))
  lines.append(f"{'total':<16}" + "".join(f"{p.total(r) / GiB:>10.2f}" for r in p.rows))
  lines.append(f"{'fits':<16}" + "".join(f"{('yes' if p.fits(r) else 'NO'):>10}" for r in p.rows))
  lines += [f"note: {n}" for n in p.notes]
  return "\n".join(lines)


@MODES.register("plan_train")
def plan_train(config, workdir):
  """Prints per-device memory for training and LoRA fine-tuning of config.model on config.plan.hardware."""
  del workdir
  cfg = model_config_from(config.model)
  mesh_cfg = sharding.mesh_config_from(config.get("mesh"))
  from mixtral_jax.execution import execution_from
  p = plan(cfg, mesh_cfg, hardware=config.plan.hardware, batch_size=config.batch_size,
           seq_len=config.seq_len, lora_rank=config.plan.lora_rank, headroom=config.plan.headroom,
           run=execution_from(config.get("run")))
  print(render(p, cfg))
  return p
