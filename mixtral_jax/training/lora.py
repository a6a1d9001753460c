"""Functional LoRA (Hu et al. 2021, arXiv:2106.09685), kept outside the modules.

A weight W gets a low-rank update: W' = W + (alpha / rank) * A @ B, with A [in, r] random and B [r, out]
zero, so training starts from the base model exactly. The train step builds the parameters the model runs
with by `apply(base, adapters)` before `nnx.merge`, and differentiates only with respect to the adapters:
attention targets are merged there (small dense matrices, one per layer: cheap and exact), expert targets
become `AdaptedExperts` (moe/adapted.py), which dispatch computes as x W_e + s (x A_e) B_e on the routed
rows through the experts' own grouped matmul -- never a dense per-expert delta [L, E, in, out]. `merge`
is the dense merge of every target: export and sampling, done once (and the path for dispatch strategies
that cannot take AdaptedExperts: adapted.TAKES_ADAPTERS).

Targets are weight names (`wq wk wv wo` in attention, `w1 w2 w3` in the experts), the groups `attn`,
`experts`, `all` (attention and experts), and `router`: the router's parameters trained in full (its
kernel is [L, D, E], tiny), alongside the adapters; without it the router stays frozen. Expert weights get
one adapter per expert: A [L, E, in, r], B [L, E, r, out]. Adapters mirror the parameter tree:
adapters["layers"]["attn"]["wq"] = {"a": ..., "b": ...}; a fully trained parameter stores {"w": ...}
(adapters["layers"]["moe"]["router"]["kernel"] = {"w": [L, D, E]}), float32 like the adapters.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.moe.adapted import AdaptedExperts

# name -> (path in the parameter tree, leading batch axes, input axes). Shapes:
#   wq/wk/wv [L | D | H, Dh]   wo [L | H, Dh | D]   w1/w3 [L, E | D | F]   w2 [L, E | F | D]
LEAVES = {
    "wq": (("layers", "attn", "wq"), 1, 1),
    "wk": (("layers", "attn", "wk"), 1, 1),
    "wv": (("layers", "attn", "wv"), 1, 1),
    "wo": (("layers", "attn", "wo"), 1, 2),
    "w1": (("layers", "moe", "w1"), 2, 1),
    "w3": (("layers", "moe", "w3"), 2, 1),
    "w2": (("layers", "moe", "w2"), 2, 1),
}
GROUPS = {"attn": ("wq", "wk", "wv", "wo"), "experts": ("w1", "w3", "w2")}
GROUPS["all"] = GROUPS["attn"] + GROUPS["experts"]
EXPERT_TARGETS = GROUPS["experts"]  # applied on the routed rows (AdaptedExperts), never merged in training
# name -> subtree of the parameter tree whose every parameter is trained in full (float32 copy {"w": ...}).
FULL = {"router": ("layers", "moe", "router")}


def parse_targets(targets) -> tuple[str, ...]:
  """'attn' / 'wq,wv' / 'experts,router' / a tuple -> target names (weights, and `router`), validated."""
  items = targets.split(",") if isinstance(targets, str) else list(targets)
  names = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    if item not in GROUPS and item not in LEAVES and item not in FULL:
      raise ConfigError(f"config.train.lora.targets has unknown target {item!r}; known: "
                        f"{', '.join(list(GROUPS) + list(LEAVES) + list(FULL))}")
    names += [n for n in GROUPS.get(item, (item,)) if n not in names]
  if not names:
    raise ConfigError("config.train.lora.targets is empty")
  return tuple(names)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _find(tree, path):
  """The subtree at `path`, or None when it is absent."""
  try:
    return _get(tree, path)
  except (KeyError, TypeError):
    return None


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def init(params, *, rank: int, targets, key) -> dict:
  """Adapters for `targets` of the parameter tree: A ~ N(0, 1/in_features), B = 0 (float32); a `router`
  target starts as a float32 copy of the router's parameters. Either way training starts at the base."""
  if rank <= 0:
    raise ConfigError(f"config.train.lora.rank must be positive, got {rank}")
  adapters: dict = {}
  for i, name in enumerate(parse_targets(targets)):
    if name in FULL:
      _set(adapters, FULL[name], jax.tree.map(lambda w: {"w": w.astype(jnp.float32)}, _get(params, FULL[name])))
      continue
    path, batch_axes, in_axes = LEAVES[name]
    shape = _get(params, path).shape
    lead, fan_in, fan_out = shape[:batch_axes], shape[batch_axes:batch_axes + in_axes], shape[batch_axes + in_axes:]
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, *fan_in, rank), jnp.float32)
    a = a / math.sqrt(math.prod(fan_in))
    b = jnp.zeros((*lead, rank, *fan_out), jnp.float32)
    _set(adapters, path, {"a": a, "b": b})
  return adapters


def delta(a: jax.Array, b: jax.Array, batch_axes: int) -> jax.Array:
  """A [*lead, *in, r] @ B [*lead, r, *out] -> [*lead, *in, *out] (float32)."""
  lead = a.shape[:batch_axes]
  fan_in, fan_out = a.shape[batch_axes:-1], b.shape[batch_axes + 1:]
  g, r = math.prod(lead), a.shape[-1]
  a2 = a.reshape(g, math.prod(fan_in), r).astype(jnp.float32)  # [G, In, r]
  b2 = b.reshape(g, r, math.prod(fan_out)).astype(jnp.float32)  # [G, r, Out]
  return jnp.einsum("gir,gro->gio", a2, b2).reshape(*lead, *fan_in, *fan_out)


def _merged(weight, adapter, batch_axes: int, scale: float):
  """W + scale * A @ B in W's dtype (float32 arithmetic)."""
  update = scale * delta(adapter["a"], adapter["b"], batch_axes)
  return (weight.astype(jnp.float32) + update).astype(weight.dtype)


def _with_full(out: dict, params, adapters) -> None:
  """The fully trained parameters (FULL targets) into `out`, each in its base parameter's dtype."""
  for path in FULL.values():
    trained = _find(adapters, path)
    if trained is not None:
      _set(out, path, jax.tree.map(lambda w, t: t["w"].astype(w.dtype), _get(params, path), trained))


def merge(params, adapters, *, alpha: float, rank: int):
  """Effective parameters W + (alpha / rank) * A @ B for every adapted weight (and the trained router), in W's
  dtype: dense, for export and sampling. Pure: returns a new tree sharing the untouched leaves."""
  return _combine(params, adapters, alpha / rank, grouped_experts=False)


def apply(params, adapters, *, alpha: float, rank: int):
  """The parameters the model trains and evaluates with: expert targets become AdaptedExperts(W, A, B,
  alpha / rank), computed on the routed rows by the dispatch's grouped matmul (no [L, E, in, out] delta);
  attention targets are merged (one small dense matrix per layer); a trained router replaces the base one.
  Equals `merge` as a function of the inputs. Pure: returns a new tree sharing the untouched leaves."""
  return _combine(params, adapters, alpha / rank, grouped_experts=True)


def _combine(params, adapters, scale: float, *, grouped_experts: bool):
  """merge (every adapted weight merged densely) or apply (expert weights wrapped as AdaptedExperts)."""
  out = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for name, (path, batch_axes, _) in LEAVES.items():
    adapter = _find(adapters, path)
    if adapter is None:
      continue
    weight = _get(params, path)
    if grouped_experts and name in EXPERT_TARGETS:  # [L, E, In, Out] with a [L, E, In, r], b [L, E, r, Out]
      _set(out, path, AdaptedExperts(weight, adapter["a"], adapter["b"], scale))
    else:
      _set(out, path, _merged(weight, adapter, batch_axes, scale))
  _with_full(out, params, adapters)
  return out


def count(adapters) -> int:
  """Trained parameters: adapter entries plus fully trained ones."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def targets_of(adapters) -> list[str]:
  """Names of the adapted weights and fully trained targets (for logs)."""
  paths = {name: path for name, (path, _, _) in LEAVES.items()}
  paths.update(FULL)
  return [name for name, path in paths.items() if _find(adapters, path) is not None]


def as_numpy(tree) -> Any:
  return jax.tree.map(np.asarray, tree)
