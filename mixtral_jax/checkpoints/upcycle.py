"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): a dense Mistral becomes a Mixtral whose E
experts all start as copies of its FFN; `python -m mixtral_jax.convert --upcycle` writes it.

Why it preserves the function. Mixtral's router ("mixtral_topk") keeps the top-k of softmax(x W_r) and
renormalises them, so the kept weights sum to 1. With identical experts a layer computes
sum_k w_k FFN(x) = FFN(x) whatever W_r is: without noise the upcycled model's logits equal the dense
model's (tests/test_upcycle.py: rel err <= 1e-5 against HF's MistralForCausalLM) for ANY router.

Why the router starts small and random, not zero. For the same reason the language-model loss has no
gradient to W_r while the experts are identical: every slot's dL/dw_k is the same number and the
renormalised weights always sum to 1, so dL/dW_r = 0 (tests/test_upcycle.py measures max |dL/dW_r| at 7e-8
of max |dL/dW_1|, float rounding, for the default random router and exactly 0 for a zero one; 0.15 with
--noise 0.1). What first tells experts apart is which tokens each one sees. A random W_r
sends tokens to different experts, their gradients differ from the first step, and the router's follows.
A zero W_r ties every logit: top-k then sends every token to experts 0..K-1 with weight 1/K each, so those
K experts receive identical gradients and stay identical, experts K..E-1 receive none, and W_r's gradient
stays 0 -- without noise the model trains as the dense one forever. (A load-balancing loss does reach a
zero router, but through the same probability vector for every token: its first update is the rank-one
(sum_n x_n) g^T, which can only split tokens by the sign of one projection.)

Default router std: sqrt(0.1 / D), Switch Transformer's reduced initialisation scale s = 0.1 for a fan-in
of D (Fedus et al. 2021, section 2.4). The logits then have a std of about sqrt(0.1) ~ 0.32 times the rms
of the normalised input, whatever D is: routing starts near uniform (no expert dominates, softmax weights
within tens of percent of 1/E) yet never tied. The project's generic 0.02 would give logits growing with
sqrt(D) (~1.3 rms at D = 4096: confident routes picked by random features).

`noise` > 0 adds N(0, (noise * std(W))^2) to every copy of every expert matrix W except expert 0's
(symmetry breaking): the model is then no longer function preserving. Every draw is seeded by
(seed, layer, expert, matrix), so the result does not depend on the order blocks are written.

Memory: the dense source is read as a one-expert tree of `Streamed` leaves (sources.py for HF / Mistral
files, TensorStore slices of an Orbax checkpoint), and each expert leaf re-yields that one dense matrix E
times: one dense FFN matrix is in memory at a time, never an [E, ...] stack. A trainer workdir is the
exception: its dense weights are restored whole (loading.read) first.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from mixtral_jax.checkpoints import sources
from mixtral_jax.checkpoints.formats import CheckpointError
from mixtral_jax.checkpoints.sources import Streamed
from mixtral_jax.config import ModelConfig

ROUTER_INITS = ("normal", "zero")
SWITCH_ROUTER_SCALE = 0.1  # Fedus et al. 2021: router weights ~ N(0, s / fan_in) with s = 0.1
_EXPERT_MATRICES = ("w1", "w3", "w2")  # index in the noise seed


def default_router_std(dim: int) -> float:
  return math.sqrt(SWITCH_ROUTER_SCALE / dim)


@dataclasses.dataclass(frozen=True)
class Upcycling:
  """How to upcycle: E experts, top-K routing, symmetry-breaking noise, router initialisation."""
  num_experts: int
  top_k: Optional[int] = None           # None: min(2, num_experts), Mixtral's top-2
  noise: float = 0.0                    # relative std of the noise on experts 1..E-1; 0 = exact copies
  router_init: str = "normal"           # normal | zero
  router_std: Optional[float] = None    # normal init only; None: default_router_std(dim)
  seed: int = 0

  @property
  def k(self) -> int:
    return min(2, self.num_experts) if self.top_k is None else self.top_k

  def check(self) -> "Upcycling":
    """Raises CheckpointError (naming the CLI flag) for settings that cannot make a Mixtral."""
    e, k = self.num_experts, self.k
    if not _is_int(e) or e < 1:
      raise CheckpointError(f"--num-experts must be a positive integer, got {e!r}")
    if not _is_int(k) or k < 1:
      raise CheckpointError(f"--top-k must be a positive integer, got {k!r}")
    if k > e:
      raise CheckpointError(f"--top-k {k} exceeds --num-experts {e} (a token cannot use more experts than exist)")
    if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0):
      raise CheckpointError(f"--noise must be a finite relative std >= 0, got {self.noise!r}")
    if self.router_init not in ROUTER_INITS:
      raise CheckpointError(f"--router-init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
    if self.router_std is not None:
      if self.router_init != "normal":
        raise CheckpointError("--router-std applies to --router-init normal only")
      if not (math.isfinite(self.router_std) and self.router_std > 0):
        raise CheckpointError(f"--router-std must be a finite positive number, got {self.router_std!r}")
    if not _is_int(self.seed) or self.seed < 0:
      raise CheckpointError(f"--seed must be an integer >= 0, got {self.seed!r}")
    return self

  def resolved(self, dim: int) -> Dict[str, Any]:
    """The settings with defaults filled (stored in the checkpoint's source metadata)."""
    std = (self.router_std or default_router_std(dim)) if self.router_init == "normal" else 0.0
    return dict(num_experts=self.num_experts, top_k=self.k, noise=float(self.noise), router_init=self.router_init,
                router_std=std, seed=self.seed)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# --- the dense source, as a one-expert tree ----------------------------------------------------------

@dataclasses.dataclass
class Dense:
  """A dense model read lazily: its config (num_experts = top_k = 1) and `tree(dtype)`, the one-expert
  parameter tree (the structure of model.params_of) with Streamed leaves."""
  path: Path
  layout: str                                   # hf_dense | mistral_dense | mixtral_jax | workdir
  config: ModelConfig
  dtype: np.dtype                               # the stored weights' dtype
  tree: Callable[[np.dtype], Dict[str, Any]]
  close: Callable[[], None] = lambda: None


def open_dense(src, fmt: str = "auto") -> Dense:
  """Opens and validates a dense checkpoint: an HF MistralForCausalLM directory or a Mistral release
  (fmt auto | hf | mistral), or (fmt auto) a mixtral_jax checkpoint / trainer workdir whose model has
  num_experts == 1. A mixture of experts is refused in one sentence."""
  path = Path(src)
  if fmt == "auto" and path.is_dir():
    for detect, opener in _STORED.values():
      if detect(path):
        return opener(path)
  source = sources.open_source(path, fmt, dense=True)
  return Dense(path, source.layout, source.config, source.dtype, lambda dt: sources.stream_tree(source, dt),
               source.close)


# Routers whose single expert always gets weight 1 (the softmax of one logit): with them a one-expert model
# is exactly a dense FFN. Others (aux_free_bias' sigmoid scores, sinkhorn, expert_choice's dropping) are not.
_DENSE_ROUTERS = ("mixtral_topk", "topk", "switch", "top_p")


def _must_be_dense(path: Path, cfg: ModelConfig) -> ModelConfig:
  if cfg.num_experts != 1:
    raise CheckpointError(f"{path}: already a mixture of experts (num_experts={cfg.num_experts}); --upcycle needs "
                          f"a dense model (num_experts=1)")
  if cfg.router not in _DENSE_ROUTERS:
    raise CheckpointError(f"{path}: router {cfg.router!r} does not give its one expert weight 1, so the model is "
                          f"not a plain dense FFN; --upcycle reads one-expert models with router "
                          f"{', '.join(_DENSE_ROUTERS)}")
  return cfg


def _open_converted(path: Path) -> Dense:
  from mixtral_jax.checkpoints import store
  from mixtral_jax.model import STACKED, abstract_model
  from flax import nnx
  cfg = _must_be_dense(path, store.load_config(path))
  store._check_stored(path, nnx.to_pure_dict(nnx.state(abstract_model(cfg, STACKED))))
  arrays = store.open_arrays(path)
  shapes = {name: tuple(a.shape) for name, a in arrays.items()}
  read = lambda name, index: arrays[name][index].read().result()  # noqa: E731 -- one TensorStore slice
  return Dense(path, "mixtral_jax", cfg, np.dtype(arrays["layers.moe.w1"].dtype.numpy_dtype),  # as Source.dtype
               lambda dt: _stored_tree(shapes, read, cfg, dt))


def _open_workdir(path: Path) -> Dense:
  import jax
  from mixtral_jax.checkpoints import loading
  cfg, state, _ = loading.read(path, dtype=None)  # restored whole: a workdir has no sliceable export
  _must_be_dense(path, cfg)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  arrays = {".".join(str(getattr(k, "key", k)) for k in keys): np.asarray(a) for keys, a in flat}
  shapes = {name: a.shape for name, a in arrays.items()}
  return Dense(path, "workdir", cfg, arrays["layers.moe.w1"].dtype,
               lambda dt: _stored_tree(shapes, lambda name, index: arrays[name][index], cfg, dt))


def _refuse_quantized(path: Path) -> Dense:
  raise CheckpointError(f"{path} holds quantized weights; --upcycle needs float weights (the dense checkpoint "
                        f"it was quantized from)")


_STORED = {  # what loading.KINDS detects beyond HF / Mistral files, in its order
    "mixtral_jax": (lambda p: (p / "config").is_dir() and (p / "params").is_dir(), _open_converted),
    "quantized": (lambda p: (p / "quantized.json").exists(), _refuse_quantized),
    "workdir": (lambda p: (p / "checkpoints").is_dir(), _open_workdir),
}


def _stored_tree(shapes: Dict[str, Tuple[int, ...]], read: Callable[[str, tuple], np.ndarray], cfg: ModelConfig,
                 dtype) -> Dict[str, Any]:
  """Streamed leaves over stored canonical arrays (name "layers.moe.w1" -> shape; read(name, index)):
  per-layer blocks under layers (per (layer, expert) for the experts), row / column blocks of the
  embedding / LM head. The router is left out: upcycled_tree makes a new one."""
  dt = np.dtype(dtype)
  get = lambda name, index: np.asarray(read(name, index), dt)  # noqa: E731
  step = max(1, sources._BLOCK_BYTES // (4 * cfg.dim))  # vocabulary rows per block
  tree: Dict[str, Any] = {}
  for name, shape in shapes.items():
    if name.startswith("layers.moe.router."):
      continue
    if name in ("layers.moe.w1", "layers.moe.w2", "layers.moe.w3"):  # [L, 1, ...]
      leaf = Streamed(shape, dt, (1, 1, *shape[2:]), lambda n=name, s=shape: (
          ((i, 0), get(n, (i, 0))) for i in range(s[0])))
    elif name.startswith("layers."):
      leaf = Streamed(shape, dt, (1, *shape[1:]), lambda n=name, s=shape: (
          ((i,), get(n, (i,))) for i in range(s[0])))
    elif name == "embed":  # [V, D]
      leaf = Streamed(shape, dt, (min(step, shape[0]), shape[1]), lambda n=name, s=shape: (
          ((slice(a, min(a + step, s[0])),), get(n, (slice(a, min(a + step, s[0])),))) for a in range(0, s[0], step)))
    elif name == "lm_head":  # [D, V]
      leaf = Streamed(shape, dt, (shape[0], min(step, shape[1])), lambda n=name, s=shape: (
          ((slice(None), slice(a, min(a + step, s[1]))), get(n, (slice(None), slice(a, min(a + step, s[1])))))
          for a in range(0, s[1], step)))
    else:
      leaf = Streamed(shape, dt, shape, lambda n=name: iter([((), get(n, ()))]))
    node = tree
    *parents, last = name.split(".")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


# --- the upcycled model ------------------------------------------------------------------------------

def upcycled_config(dense: ModelConfig, plan: Upcycling) -> ModelConfig:
  """The Mixtral: the dense model's architecture with E experts, top-K, the renormalised top-k router
  (what makes identical experts function preserving). Shared experts, if any, are kept."""
  return dense.replace(num_experts=plan.num_experts, top_k=plan.k, router="mixtral_topk", router_options=())


def upcycled_tree(tree: Dict[str, Any], dense: ModelConfig, plan: Upcycling) -> Dict[str, Any]:
  """The one-expert `tree` (Streamed leaves) with each expert matrix copied num_experts times (plus
  noise on experts >= 1 if asked) and a new router kernel [L, D, E]; every other leaf unchanged."""
  settings = plan.resolved(dense.dim)
  moe = tree["layers"]["moe"]
  dtype = moe["w1"].dtype
  out_moe = {k: v for k, v in moe.items() if k not in ("router", *_EXPERT_MATRICES)}  # shared experts stay
  out_moe["router"] = {"kernel": _router(dense.num_layers, dense.dim, plan.num_experts, dtype, settings)}
  for which, name in enumerate(_EXPERT_MATRICES):
    out_moe[name] = _copies(moe[name], plan.num_experts, float(plan.noise), plan.seed, which)
  return {**tree, "layers": {**tree["layers"], "moe": out_moe}}


def _router(num_layers: int, dim: int, num_experts: int, dtype, settings) -> Streamed:
  std, seed = settings["router_std"], settings["seed"]

  def kernel(i):  # [D, E]
    if settings["router_init"] == "zero":
      return np.zeros((dim, num_experts), dtype)
    rng = np.random.default_rng((seed, 0, i))
    return (std * rng.standard_normal((dim, num_experts), np.float32)).astype(dtype)
  return Streamed((num_layers, dim, num_experts), np.dtype(dtype), (1, dim, num_experts),
                  lambda: (((i,), kernel(i)) for i in range(num_layers)))


def _copies(dense: Streamed, num_experts: int, noise: float, seed: int, which: int) -> Streamed:
  """[L, 1, *M] -> [L, E, *M]: each layer's dense matrix (one block) re-yielded for every expert."""
  num_layers, one, *matrix = dense.shape
  assert one == 1 and dense.chunks == (1, 1, *matrix), (dense.shape, dense.chunks)
  dt = dense.dtype

  def blocks():
    for (i, j0), w in dense.blocks():  # one layer's dense matrix [*M]
      assert j0 == 0 and w.shape == tuple(matrix), (j0, w.shape)
      scale = noise * float(np.std(w, dtype=np.float64)) if noise else 0.0
      yield (i, 0), w  # expert 0: always the exact copy
      for j in range(1, num_experts):
        if scale == 0.0:
          yield (i, j), w  # the same array: TensorStore only reads it
        else:
          rng = np.random.default_rng((seed, 1, i, j, which))
          yield (i, j), (w.astype(np.float32) + scale * rng.standard_normal(w.shape, np.float32)).astype(dt)
  return Streamed((num_layers, num_experts, *matrix), dt, (1, 1, *matrix), blocks)
