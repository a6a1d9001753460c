"""How a Mixtral runs, decided in one place: the execution spec and the per-backend tuning behind it.

The config stored with the weights (`ModelConfig`) says what the network *is*. `Execution` says how it
*runs*: the dispatch strategy for each phase, the grouped-matmul implementation, the layer layout, remat,
the compute dtype and block sizes. It is never saved with the weights. Fields left at "auto" (or 0) are
filled by `resolve` from BACKENDS[jax.default_backend()], the only place where backend-specific tuning
lives; the model then passes the resolved values down explicitly (no module globals to patch).

    run = execution_from(config.run)                      # ConfigDict -> validated Execution
    run = resolve(run, purpose="inference")               # "auto" -> this backend's defaults
    model = build(cfg, seed, execution=run)               # or checkpoint.load_model(path, execution=run)

`top_k` / `top_p` change routing, not speed alone: the same trained router with another number of
experts per token, or top-p (adaptive) selection (moe/routers.py `select`); 0 = as trained.

Phases: a forward with `train=True` is `train`; one new token per row against a KV cache is `decode`;
any other forward (no cache, or a prompt into one) is `prefill`. Every default is *exact* (no token is
dropped: equal to `dense`); `capacity` stays available by name, never a silent default.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import ml_collections

from mixtral_jax.config import DTYPES, REMAT_POLICIES, ConfigError

LAYOUTS = ("stacked", "unstacked")
PURPOSES = ("train", "inference")
PHASES = ("train", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class Execution:
  """How the model runs. "auto" / 0 = the backend's default (BACKENDS); `resolve` fills them."""
  train_dispatch: str = "auto"     # name in DISPATCHERS for forwards with train=True
  prefill_dispatch: str = "auto"   # ... for forwards without a cache, or a prompt into one
  decode_dispatch: str = "auto"    # ... for one new token per row against a cache
  capacity_factor: float = 1.25    # capacity-based dispatch only: buffer rows = factor x balanced load
  grouped_matmul: str = "auto"     # dropless' grouped matmul: loop | ragged_dot | tokamax | megablox | blocks
  layout: str = "auto"             # stacked ([L, ...] params, lax.scan) | unstacked (per layer, per expert)
  remat: str = "none"              # one of config.REMAT_POLICIES (training memory vs recompute)
  dtype: str = "auto"              # compute dtype; auto = the parameters' dtype. Router math is float32.
  loop_block: int = 0              # rows per expert matmul in sorted_loop (prefill)
  causal_block: int = 0            # query rows per block of block-causal self-attention ("xla" attention)
  attention: str = "auto"          # mixtral_jax.attention name for long sequences: flash | xla | kernels
  attention_min_len: int = 0       # keys shorter than this (and decode steps) use "xla" attention
  flash_block: int = 0             # query / key rows per block of flash (and kernel) attention
  rope_identity: str = "auto"      # on | off: rotary tables leave through an identity matmul (XLA:CPU)
  # Routing override (adaptive compute at inference; applies to every phase, train=True forwards too):
  # the trained router's logits re-selected (routers.routing_override_error says for which routers).
  # 0 = as the model's config, a resolved value ("as trained"), never filled by `resolve`.
  top_k: int = 0                   # > 0: experts per token instead of config.model.top_k
  top_p: float = 0.0               # > 0: top-p routing with this threshold, <= top_k (else all E) experts

  def replace(self, **changes) -> "Execution":
    return validate(dataclasses.replace(self, **changes))

  @classmethod
  def everywhere(cls, dispatch: str, **fields) -> "Execution":
    """One dispatch strategy for every phase (research: e.g. `Execution.everywhere("capacity")`)."""
    return validate(cls(train_dispatch=dispatch, prefill_dispatch=dispatch, decode_dispatch=dispatch, **fields))

  def dispatch_for(self, phase: str) -> str:
    return getattr(self, f"{phase}_dispatch")

  @property
  def resolved(self) -> bool:
    """Every backend-dependent field filled (top_k / top_p are not: their 0 means "as trained")."""
    return all(v not in ("auto", 0, None) for v in (self.train_dispatch, self.prefill_dispatch,
               self.decode_dispatch, self.grouped_matmul, self.layout, self.dtype, self.loop_block,
               self.causal_block, self.rope_identity, self.attention, self.attention_min_len,
               self.flash_block))


# Per-backend defaults: every number here was measured (the comment says where), and every choice is exact.
BACKENDS = {
    "cpu": dict(
        # Training: rows sorted by expert (gathers both ways, grouped.py) through the grouped matmul below.
        train_dispatch="dropless",
        # Prefill: slots sorted by expert, a loop of [128, D] @ [D, F] blocks per expert (active FLOPs
        # only, ~165 GFLOP/s per block on 2 cores); 1.02-1.16x HF at B4xT512 (experiments/results).
        prefill_dispatch="sorted_loop",
        # Decode: a lax.cond per expert, so only chosen experts' weights are read: 2.8-3.2x HF at batch 1.
        decode_dispatch="routed_cond",
        # gmm.py's loop of row tiles with its megablox-pattern VJP: MoE layer fwd+bwd at 4096 tokens with
        # a skewed router (max/mean load 1.81) 804 ms vs 958 ms for padded blocks, 1319 ms for blocks'
        # buffers-else-blocks, 1127 ms for HF's block (experiments/results/bench_moe_skewed.md).
        # XLA:CPU's ragged_dot is ~10x slower than a batched matmul.
        grouped_matmul="loop",
        # Inference: XLA:CPU copies a scanned layer's (and an expert's) slice out of the stack before every
        # matmul, tripling the bytes a decode step moves; per-layer, per-expert buffers are read in place.
        inference_layout="unstacked",
        loop_block=128,    # 128 beat 64 and 256 for [N, 512] @ [512, 1792] blocks on 2 cores
        causal_block=128,  # 4x faster attention than the full [T, T] scores at T=512
        # Flash attention from 2048 keys: faster than block-causal there (fwd and fwd+bwd) and memory
        # linear in the sequence; below, the materialised scores are faster on 2 cores
        # (experiments/results/bench_attention.md).
        attention="flash", attention_min_len=2048, flash_block=256,
        # XLA:CPU fuses cos/sin into every head's rotation (once per head, not per position); an identity
        # matmul at HIGHEST precision (exact) stops it: ~2% of a prefill.
        rope_identity="on",
    ),
    # Accelerators: grouped-matmul kernels from maintained libraries (gmm.py): tokamax's ragged_dot on GPU
    # (Mosaic / Triton kernels; XLA's default ragged_dot expands into zero-padded dense dots there), the
    # Pallas megablox GMM on TPU. Not yet timed on a device (experiments/gpu_bench.py). Attention: plain-JAX
    # flash (partitions under a sharded jit like any jnp code); the kernels (cudnn, pallas_gpu, splash in
    # mixtral_jax/attention/kernels.py) are chosen by name until a device run shows them faster, and the
    # Pallas ones see one device's arrays (no GSPMD rule for a pallas_call: single device or shard_map). The same exact
    # dispatch for every phase until one is measured faster there. Scanned layers keep compile time
    # independent of depth.
    "gpu": dict(train_dispatch="dropless", prefill_dispatch="dropless", decode_dispatch="routed_cond",
                grouped_matmul="tokamax", inference_layout="stacked", loop_block=512, causal_block=512,
                rope_identity="off", attention="flash", attention_min_len=1024, flash_block=512),
    "tpu": dict(train_dispatch="dropless", prefill_dispatch="dropless", decode_dispatch="routed_cond",
                grouped_matmul="megablox", inference_layout="stacked", loop_block=512, causal_block=512,
                rope_identity="off", attention="flash", attention_min_len=1024, flash_block=512),
}


def backend_defaults(backend: Optional[str] = None) -> dict:
  backend = backend or jax.default_backend()
  return BACKENDS.get(backend, BACKENDS["gpu"])


def validate(run: Execution) -> Execution:
  """Checks an Execution; raises ConfigError naming the config.run field. Returns run for chaining."""
  from mixtral_jax.moe.dispatch import all_dispatchers
  from mixtral_jax.moe.grouped import GROUPED_MATMULS
  known = all_dispatchers()
  for phase in PHASES:
    name = run.dispatch_for(phase)
    if name != "auto" and name not in known:
      raise ConfigError(f"config.run.{phase}_dispatch={name!r} is unknown; known: auto, {', '.join(known.names())}")
  if run.grouped_matmul not in GROUPED_MATMULS:
    raise ConfigError(f"config.run.grouped_matmul={run.grouped_matmul!r} is not one of {', '.join(GROUPED_MATMULS)}")
  if run.layout not in ("auto",) + LAYOUTS:
    raise ConfigError(f"config.run.layout={run.layout!r} is not one of auto, {', '.join(LAYOUTS)}")
  if run.remat not in REMAT_POLICIES:
    raise ConfigError(f"config.run.remat={run.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
  if run.dtype != "auto" and run.dtype not in DTYPES:
    raise ConfigError(f"config.run.dtype={run.dtype!r} is not one of auto, {', '.join(DTYPES)}")
  if not run.capacity_factor > 0:
    raise ConfigError(f"config.run.capacity_factor must be positive, got {run.capacity_factor!r}")
  if run.rope_identity not in ("auto", "on", "off"):
    raise ConfigError(f"config.run.rope_identity={run.rope_identity!r} is not one of auto, on, off")
  from mixtral_jax.attention import ATTENTIONS
  if run.attention != "auto" and run.attention not in ATTENTIONS:
    raise ConfigError(f"config.run.attention={run.attention!r} is unknown; known: auto, {', '.join(ATTENTIONS.names())}")
  for name in ("loop_block", "causal_block", "attention_min_len", "flash_block"):
    value = getattr(run, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"config.run.{name} must be a non-negative integer (0 = auto), got {value!r}")
  # top_k <= num_experts and the router's support need the model config: Mixtral.__init__ checks them.
  if not isinstance(run.top_k, int) or isinstance(run.top_k, bool) or run.top_k < 0:
    raise ConfigError(f"config.run.top_k must be a non-negative integer (0 = as trained), got {run.top_k!r}")
  if isinstance(run.top_p, bool) or not isinstance(run.top_p, (int, float)) or not 0 <= run.top_p <= 1:
    raise ConfigError(f"config.run.top_p must be in [0, 1] (0 = off), got {run.top_p!r}")
  return run


def resolve(run: Optional[Execution] = None, *, purpose: str = "inference", param_dtype: str = "float32",
            backend: Optional[str] = None) -> Execution:
  """Fills every "auto" field from the backend's defaults. purpose: "train" (the scanned stack: compile
  time independent of depth) or "inference" (the backend's inference layout)."""
  assert purpose in PURPOSES, purpose
  run = validate(run or Execution())
  d = backend_defaults(backend)
  pick = lambda value, default: default if value in ("auto", 0, None) else value  # noqa: E731
  layout = "stacked" if purpose == "train" else d["inference_layout"]
  return dataclasses.replace(
      run,
      train_dispatch=pick(run.train_dispatch, d["train_dispatch"]),
      prefill_dispatch=pick(run.prefill_dispatch, d["prefill_dispatch"]),
      decode_dispatch=pick(run.decode_dispatch, d["decode_dispatch"]),
      grouped_matmul=pick(run.grouped_matmul, d["grouped_matmul"]),
      layout=pick(run.layout, layout),
      dtype=pick(run.dtype, param_dtype),
      loop_block=pick(run.loop_block, d["loop_block"]),
      causal_block=pick(run.causal_block, d["causal_block"]),
      rope_identity=pick(run.rope_identity, d["rope_identity"]),
      attention=pick(run.attention, d["attention"]),
      attention_min_len=pick(run.attention_min_len, d["attention_min_len"]),
      flash_block=pick(run.flash_block, d["flash_block"]))


def execution_from(run: Optional[Mapping[str, Any] | ml_collections.ConfigDict]) -> Execution:
  """The `run` section of a config -> validated (unresolved) Execution. Unknown fields are errors."""
  if run is None:
    return Execution()
  if isinstance(run, ml_collections.ConfigDict):
    run = run.to_dict()
  run = dict(run)
  known = {f.name for f in dataclasses.fields(Execution)}
  unknown = sorted(set(run) - known)
  if unknown:
    raise ConfigError(f"config.run has unknown field(s): {', '.join(unknown)}")
  return validate(Execution(**run))


def to_dict(run: Execution) -> dict:
  return dataclasses.asdict(run)
