"""Putting a Mixtral's variables on a mesh: the abstract sharded state (Orbax restore target, memory
planner input), build's weights created sharded, and any pytree of train state placed by the rules.
(sharding.py, the leaf below this, knows meshes and rules but no model.)"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.parallel.sharding import flat_variables, logical_to_spec, put, state_shardings, variable_logical_axes


def abstract_state(config, mesh: Mesh, rules: Mapping[str, tuple]) -> dict:
  """Pure dict of jax.ShapeDtypeStruct(shape, dtype, sharding) for a Mixtral with `config`: the restore
  target for Orbax onto `mesh`, and the input of the memory planner. Allocates nothing."""
  from mixtral_jax.model import STACKED, abstract_model
  abstract = abstract_model(config, STACKED)
  shardings = state_shardings(abstract, mesh, rules)
  shapes = nnx.to_pure_dict(nnx.state(abstract))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_model(config, seed: int, mesh: Mesh, rules: Mapping[str, tuple], execution=None):
  """`model.build(config, seed)`'s weights created directly in their sharded layout (the same program
  with sharded outputs: each device computes only its shards), so an 8x7B never exists whole on one
  device. The layout is the stacked one (what the rules split)."""
  from mixtral_jax.execution import Execution
  from mixtral_jax.model import abstract_model, init_state, with_state
  run = (execution or Execution()).replace(layout="stacked")
  skeleton = abstract_model(config, run)
  values = init_state(config, seed, out_shardings=state_shardings(skeleton, mesh, rules))
  return with_state(skeleton, values)


def place_tree(tree: Any, config, mesh: Mesh, rules: Mapping[str, tuple]):
  """Puts any pytree built from a Mixtral's variables on `mesh`: parameters, optimizer state, a trainer's
  state dict. A leaf takes the sharding of the model variable whose path its own dict-key path ends with
  and whose shape it has (so AdamW's mu/nu follow their parameter); anything else (step counters, RNG
  keys, LoRA adapters) is replicated."""
  from mixtral_jax.model import STACKED, abstract_model
  abstract = abstract_model(config, STACKED)
  known = {path: (tuple(v.shape), NamedSharding(mesh, logical_to_spec(variable_logical_axes(path, v), rules,
                                                                       mesh, v.shape)))
           for path, v in flat_variables(abstract)}
  replicated = NamedSharding(mesh, P())

  def target(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      shape, named = known.get(keys[start:], (None, None))
      if named is not None and shape == tuple(np.shape(leaf)):
        return named
    return replicated

  return jax.tree_util.tree_map_with_path(lambda path, leaf: put(leaf, target(path, leaf)), tree)
