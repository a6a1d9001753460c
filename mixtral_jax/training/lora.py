"""Functional LoRA (Hu et al. 2021, arXiv:2106.09685), kept outside the modules.

A weight W gets a low-rank update: W' = W + (alpha / rank) * A @ B, with A [in, r] random and B [r, out]
zero, so training starts from the base model exactly. The train step builds the effective parameters with
`merge(base, adapters)` before `nnx.merge`, and differentiates only with respect to the adapters; the
model code never knows. Exporting is the same merge, done once.

Targets are weight names (`wq wk wv wo` in attention, `w1 w2 w3` in the experts) or the groups `attn`,
`experts`, `all`. Expert weights get one adapter per expert: A [L, E, in, r], B [L, E, r, out].
Adapters mirror the parameter tree: adapters["layers"]["attn"]["wq"] = {"a": ..., "b": ...}.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import ConfigError

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


def parse_targets(targets) -> tuple[str, ...]:
  """'attn' / 'wq,wv' / 'attn,experts' / a tuple -> weight names, validated."""
  items = targets.split(",") if isinstance(targets, str) else list(targets)
  names = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    if item not in GROUPS and item not in LEAVES:
      raise ConfigError(f"config.train.lora.targets has unknown target {item!r}; known: "
                        f"{', '.join(list(GROUPS) + list(LEAVES))}")
    names += [n for n in GROUPS.get(item, (item,)) if n not in names]
  if not names:
    raise ConfigError("config.train.lora.targets is empty")
  return tuple(names)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def init(params, *, rank: int, targets, key) -> dict:
  """Adapters for `targets` of the parameter tree: A ~ N(0, 1/in_features), B = 0 (float32)."""
  if rank <= 0:
    raise ConfigError(f"config.train.lora.rank must be positive, got {rank}")
  adapters: dict = {}
  for i, name in enumerate(parse_targets(targets)):
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


def merge(params, adapters, *, alpha: float, rank: int):
  """Effective parameters W + (alpha / rank) * A @ B for every adapted weight, in W's dtype. Pure: returns a
  new tree sharing the untouched leaves."""
  scale = alpha / rank
  merged = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for name, (path, batch_axes, _) in LEAVES.items():
    try:
      adapter = _get(adapters, path)
    except KeyError:
      continue
    weight = _get(params, path)
    update = scale * delta(adapter["a"], adapter["b"], batch_axes)
    _set(merged, path, (weight.astype(jnp.float32) + update).astype(weight.dtype))
  return merged


def count(adapters) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def targets_of(adapters) -> list[str]:
  """Names of the adapted weights (for logs)."""
  out = []
  for name, (path, _, _) in LEAVES.items():
    try:
      _get(adapters, path)
      out.append(name)
    except KeyError:
      pass
  return out


def as_numpy(tree) -> Any:
  return jax.tree.map(np.asarray, tree)
