"""mixtral_jax.checkpoints.store: save_model / load_model round trips (either layout, always the canonical stacked
tree on disk, no execution fields in the stored config, older configs that still carry them), dtype casts
while reading, restore onto given shardings (including a 4-device mesh, in a subprocess), and errors naming
the file or parameter."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FAST_COMPILE, tiny_config
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax import config as config_lib
from mixtral_jax.execution import Execution, resolve
from mixtral_jax.checkpoints.formats import CheckpointError
from mixtral_jax.model import abstract_params, from_params, params_of, with_execution

UNSTACKED = Execution(layout="unstacked")

CFG = tiny_config(num_layers=2, num_shared_experts=1)  # shared experts: the tree is more than HF's
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 7)), jnp.int32)
_forward = jax.jit(lambda model, tokens: model(tokens).logits)


def random_model(cfg, seed, execution=None):
  """Random canonical params (no jitted init: one numpy draw per leaf) in `execution`'s layout."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), abstract_params(cfg))
  return from_params(cfg, params, execution)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint saved from an unstacked model (the CPU inference layout, per-layer/per-expert buffers)."""
  model = random_model(CFG, seed=3, execution=UNSTACKED)
  assert model.execution.layout == "unstacked"
  path = tmp_path_factory.mktemp("ckpt") / "model"
  checkpoint.save_model(path, model)
  return path, model


def _equal_trees(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_save_load_round_trip_is_exact(saved):
  path, model = saved
  loaded = checkpoint.load_model(path)
  assert loaded.config == CFG
  assert jax.tree.structure(params_of(loaded)) == jax.tree.structure(params_of(model))
  assert _equal_trees(params_of(loaded), params_of(model))
  np.testing.assert_array_equal(_forward(loaded, TOKENS), _forward(model, TOKENS))


def test_save_unstacked_or_stacked_stores_the_same_canonical_tree(saved, tmp_path):
  """save_model of an unstacked model writes the canonical stacked tree ([L, E, ...] leaves), the same as
  the same weights saved from a stacked model; either loads back into either layout exactly."""
  path, model = saved
  stored = checkpoint.stored_arrays(path)
  canonical = {".".join(str(getattr(k, "key", k)) for k in p): v
               for p, v in jax.tree_util.tree_flatten_with_path(abstract_params(CFG))[0]}
  assert {n: tuple(m.shape) for n, m in stored.items()} == {n: tuple(v.shape) for n, v in canonical.items()}
  assert tuple(stored["layers.moe.w1"].shape) == (2, 7, 40, 36)
  stacked = with_execution(model, layout="stacked")
  assert stacked.execution.layout == "stacked"
  checkpoint.save_model(tmp_path / "stacked", stacked)
  for layout in ("stacked", "unstacked"):
    for p in (path, tmp_path / "stacked"):
      loaded = checkpoint.load_model(p, execution=Execution(layout=layout))
      assert loaded.execution.layout == layout
      assert jax.tree.structure(params_of(loaded)) == jax.tree.structure(params_of(model))
      assert _equal_trees(params_of(loaded), params_of(model)), (layout, p)


def test_stored_config_holds_no_execution_field(saved):
  path, _ = saved
  stored = checkpoint.load_metadata(path)["model"]
  assert not set(stored) & set(config_lib.MOVED_TO_RUN), stored
  assert config_lib.from_dict(stored) == CFG


def test_old_checkpoint_with_execution_fields_in_its_config_loads(saved, tmp_path):
  """Checkpoints written before execution moved out of ModelConfig store dispatch, capacity_factor,
  grouped_matmul, dtype, remat and scan_layers in their config: they load, the stored values are ignored
  (how a model runs is the caller's execution), and the logits are those of the saved model."""
  import shutil
  import orbax.checkpoint as ocp
  from etils import epath
  path, model = saved
  old = tmp_path / "old"
  shutil.copytree(path, old)
  meta = checkpoint.load_metadata(old)
  # A capacity of 1.0 with these few tokens would drop some: honouring it would change the logits.
  meta["model"].update(dict(dispatch="capacity", capacity_factor=1.0, grouped_matmul="blocks", dtype="bfloat16",
                            remat="full", scan_layers=True))
  config_dir = old / checkpoint.CONFIG
  (config_dir / "metadata").unlink()
  ocp.JsonCheckpointHandler().save(epath.Path(config_dir), args=ocp.args.JsonSave(meta))
  assert set(config_lib.MOVED_TO_RUN) <= set(checkpoint.load_metadata(old)["model"])  # really the old format
  loaded = checkpoint.load_model(old)
  assert loaded.config == CFG
  assert loaded.execution == resolve(param_dtype="float32")
  assert _equal_trees(params_of(loaded), params_of(model))
  np.testing.assert_array_equal(_forward(loaded, TOKENS), _forward(model, TOKENS))


def test_dtype_cast_while_reading_execution_and_config_overrides(saved):
  path, model = saved
  loaded = checkpoint.load_model(path, dtype="bfloat16", execution=Execution(remat="full"), router_jitter=0.25)
  assert loaded.config.param_dtype == "bfloat16" and loaded.config.router_jitter == 0.25
  # The compute dtype follows the parameters' unless the execution says otherwise.
  assert loaded.execution.dtype == "bfloat16" and loaded.dtype == jnp.bfloat16 and loaded.execution.remat == "full"
  w1 = params_of(loaded)["layers"]["moe"]["w1"]
  assert w1.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(w1), np.asarray(params_of(model)["layers"]["moe"]["w1"]).astype(w1.dtype))
  assert checkpoint.load_model(path, dtype=None).config.param_dtype == "float32"  # None keeps the stored one
  mixed = checkpoint.load_model(path, dtype="bfloat16", execution=Execution(dtype="float32"))
  assert mixed.config.param_dtype == "bfloat16" and mixed.execution.dtype == "float32"


def test_shardings_single_pytree_state_or_callable(saved):
  path, model = saved
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  seen = {}

  def from_state(state):
    seen["state"] = state
    return jax.tree.map(lambda _: device, nnx.to_pure_dict(state))

  for shardings in (device, jax.tree.map(lambda _: device, params_of(model)), from_state):
    loaded = checkpoint.load_model(path, shardings=shardings)
    assert loaded.execution.layout == "stacked"  # what shardings split
    assert loaded.layers.moe.w2[...].sharding == device
    assert _equal_trees(params_of(loaded), params_of(model))
  # The callable sees the abstract state with each Param's logical axis names (what a mesh rule needs).
  assert isinstance(seen["state"], nnx.State)
  assert seen["state"]["embed"].get_metadata()["logical_axes"] == ("vocab", "embed")


@pytest.mark.slow  # a subprocess with 4 host devices (~10 s)
def test_restore_onto_a_mesh_reads_each_shard(tmp_path):
  """Four host devices, experts split over a mesh axis, the rest replicated: the same logits."""
  # (7 experts do not divide over 4 devices, hence a 4-expert model here)
  cfg = tiny_config(num_layers=2, num_experts=4)
  model4 = random_model(cfg, seed=5)
  path4 = tmp_path / "e4"
  checkpoint.save_model(path4, model4)
  np.save(tmp_path / "expected.npy", np.asarray(_forward(model4, TOKENS)))
  script = _MESH_SCRIPT.format(path=str(path4), expected=str(tmp_path / "expected.npy"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
  root = Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ok [(2, 1, 40, 36)]" in out.stdout  # each device holds one expert of each layer


_MESH_SCRIPT = """
import jax, numpy as np, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx
from mixtral_jax.checkpoints import store as checkpoint
mesh = Mesh(np.array(jax.devices()), ("expert",))

def shardings(state):
  def pick(path, _):
    name = ".".join(str(getattr(k, "key", k)) for k in path)
    return NamedSharding(mesh, P(None, "expert") if name.startswith("layers.moe.w") else P())
  return jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(state))

model = checkpoint.load_model({path!r}, shardings=shardings)
w1 = model.layers.moe.w1[...]
assert len(jax.devices()) == 4 and w1.sharding.spec == P(None, "expert"), w1.sharding
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 7)), jnp.int32)
got = np.asarray(jax.jit(lambda m, t: m(t).logits)(model, tokens))
np.testing.assert_allclose(got, np.load({expected!r}), rtol=1e-5, atol=1e-5)
print("ok", [s.data.shape for s in w1.addressable_shards][:1])
"""


def test_save_model_from_param_dict_and_overwrite(saved, tmp_path):
  path, model = saved
  target = tmp_path / "dict"
  checkpoint.save_model(target, params_of(model), CFG)
  with pytest.raises(CheckpointError, match="already exists"):
    checkpoint.save_model(target, model)
  checkpoint.save_model(target, model, overwrite=True)
  assert _equal_trees(params_of(checkpoint.load_model(target)), params_of(model))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dict"]
  with pytest.raises(ValueError, match="needs the ModelConfig"):
    checkpoint.save_model(tmp_path / "x", params_of(model))


def test_load_errors_name_the_problem(saved, tmp_path):
  path, _ = saved
  with pytest.raises(CheckpointError, match="does not exist"):
    checkpoint.load_model(tmp_path / "missing")
  (tmp_path / "plain").mkdir()
  with pytest.raises(CheckpointError, match="plain holds no checkpoint"):
    checkpoint.load_model(tmp_path / "plain")  # load_model reads every kind (mixtral_jax.checkpoints.loading)
  with pytest.raises(CheckpointError, match="not a mixtral_jax checkpoint"):
    checkpoint.load_metadata(tmp_path / "plain")
  shape_error = r"parameter layers\.moe\.\S+ is stored with shape \(2, \S+ 36\), the config implies \(2, \S+ 38\)"
  with pytest.raises(CheckpointError, match=shape_error):
    checkpoint.load_model(path, ffn_dim=38)
  with pytest.raises(CheckpointError, match="layers.moe.shared.w1 is not part of the model"):
    checkpoint.load_model(path, num_shared_experts=0)
  with pytest.raises(CheckpointError, match="dtype='int4'"):
    checkpoint.load_model(path, dtype="int4")
