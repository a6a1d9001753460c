"""Mesh config, sharding rules and expert-parallel dispatch.

Single-device checks run here; multi-device ones run tests/mesh_checks.py in a subprocess with 8 simulated CPU
devices (the device count is fixed when jax starts, and this process already started it with one).
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import FAST_COMPILE, rel_err, tiny_config
from mixtral_jax.parallel import expert_parallel as ep
from mixtral_jax.parallel import sharding
from mixtral_jax.config import ConfigError
from mixtral_jax.moe.dispatch import DISPATCHERS
from mixtral_jax.model import STACKED, abstract_model
from mixtral_jax.moe.routers import topk_renormalized

_HERE = os.path.dirname(os.path.abspath(__file__))
MESH_ENV = dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")  # see conftest.py


def run_mesh_checks(*names, env=MESH_ENV, timeout=600):
  """Runs tests/mesh_checks.py CHECK... and returns {check: result}."""
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "mesh_checks.py"), *names], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"check"')]
  assert all(o["devices"] == 8 for o in out)
  return {o["check"]: o["result"] for o in out}


@pytest.fixture(scope="module")
def mesh_results():
  return run_mesh_checks("equality", "layer", "restore")


# --- config and rules (one device) ---------------------------------------------------------------------------

def test_base_config_rules_are_the_defaults():
  from configs import base, expert_sharded
  assert sharding.mesh_config_from(base.get_config().mesh) == sharding.MeshConfig()
  cfg = sharding.mesh_config_from(expert_sharded.get_config("fsdp=2").mesh)
  assert sharding.resolve_shape(cfg, 8) == dict(data=1, fsdp=2, expert=4, tensor=1)


@pytest.mark.parametrize("section,match", [
    (dict(experts=2), "config.mesh has unknown field.*experts"),
    (dict(expert=0), "config.mesh.expert must be a positive integer or -1"),
    (dict(expert=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(rules=dict(embed="fsdp,zz")), "config.mesh.rules.embed='fsdp,zz' names unknown mesh axis 'zz'"),
])
def test_mesh_config_errors_name_the_field(section, match):
  with pytest.raises(ConfigError, match=match):
    sharding.mesh_config_from(section)


def test_resolve_shape():
  cfg = sharding.mesh_config_from(dict(data=2, fsdp=-1, tensor=2))
  assert sharding.resolve_shape(cfg, 8) == dict(data=2, fsdp=2, expert=1, tensor=2)
  with pytest.raises(ConfigError, match="do not divide the 6 devices"):
    sharding.resolve_shape(sharding.mesh_config_from(dict(data=4, fsdp=-1)), 6)
  with pytest.raises(ConfigError, match="needs 4 devices, 8 are available"):
    sharding.resolve_shape(sharding.mesh_config_from(dict(data=4, fsdp=1)), 8)


class FakeMesh:
  shape = dict(data=2, fsdp=4, expert=2, tensor=2)


def test_logical_to_spec():
  rules = sharding.MeshConfig().rules_dict
  assert sharding.logical_to_spec(("layers", "expert", "embed", "mlp"), rules) == P(None, "expert", "fsdp", "tensor")
  # batch takes data, fsdp and expert; a later dimension may not reuse them.
  assert sharding.logical_to_spec(("batch", "seq", "act_vocab"), rules) == P(("data", "fsdp", "expert"), None,
                                                                              "tensor")
  assert sharding.logical_to_spec(("expert", "expert"), rules) == P("expert")
  # With sizes: a dimension the mesh axes do not divide gives up trailing axes (8 % (2*4*2) != 0 -> data,fsdp).
  assert sharding.logical_to_spec(("batch", "act_vocab"), rules, FakeMesh, (8, 131)) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(("vocab", "embed"), rules, FakeMesh, (257, 40)) == P(None, ("fsdp", "expert"))
  # Expert weights: `expert` goes to E first, so `embed` keeps only fsdp.
  assert sharding.logical_to_spec(("expert", "embed", "mlp"), rules, FakeMesh, (8, 40, 6)) == P("expert", "fsdp",
                                                                                               "tensor")


def test_every_parameter_has_logical_axes_with_layer_axis_prepended():
  model = abstract_model(tiny_config(num_shared_experts=1), STACKED)  # the layout meshes split
  flat = nnx.state(model).flat_state()
  for path, variable in flat:
    axes = sharding.variable_logical_axes(path, variable)
    assert len(axes) == len(variable.shape) and None not in axes, (path, axes)
    assert (axes[0] == "layers") == (path[0] == "layers"), path
  tree = sharding.logical_axes_tree(model)
  assert tree["layers"]["moe"]["w2"] == ("layers", "expert", "mlp", "embed")


def test_constrain_is_identity_without_a_mesh():
  x = jnp.arange(6.0).reshape(2, 3)
  assert sharding.current() is None and sharding.constrain(x, ("batch", "act_embed")) is x
  mesh = sharding.make_mesh(sharding.MeshConfig())  # one device: every axis has size 1
  assert dict(mesh.shape) == dict(data=1, fsdp=1, expert=1, tensor=1)
  with sharding.use_mesh(mesh, sharding.MeshConfig().rules_dict):
    assert sharding.current()[0] is mesh
  assert sharding.current() is None


# --- expert-parallel dispatch on one device ------------------------------------------------------------------

def _layer_inputs(n=37, d=11, f=13, e=7, k=2, scale=3.0):
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (n, d))
  w1, w3 = (jax.random.normal(kk, (e, d, f)) * 0.3 for kk in keys[1:3])
  w2 = jax.random.normal(keys[3], (e, f, d)) * 0.3
  return x, topk_renormalized(jax.random.normal(keys[4], (n, e)) * scale, k), w1, w3, w2


def test_ep_dispatch_without_mesh_equals_the_single_device_strategies():
  """Without a mesh, ep_capacity is `capacity` (drops included) and ep_dropless is `dropless`; with nothing
  dropped both equal `dense`. Outputs, gradients and statistics."""
  x, route, w1, w3, w2 = _layer_inputs()
  e, k = w1.shape[0], route.experts.shape[1]
  cases = (("capacity", 1.0), ("ep_capacity", 1.0), ("ep_capacity", e / k), ("dense", None), ("dropless", None),
           ("ep_dropless", None))

  def loss(name, capacity_factor, x, w1, w3, w2):
    y, stats = DISPATCHERS.get(name)(x, route, w1, w3, w2, dtype=jnp.float32, capacity_factor=capacity_factor,
                                     top_k=k)
    return jnp.sum(y * jnp.cos(y)), (y, stats)

  @jax.jit  # one compile for all the cases
  def outputs_and_grads(x, w1, w3, w2):
    return {case: jax.value_and_grad(functools.partial(loss, *case), argnums=(0, 1, 2, 3), has_aux=True)(
        x, w1, w3, w2) for case in cases}

  out = outputs_and_grads(x, w1, w3, w2)
  assert float(out["capacity", 1.0][0][1][1]["dropped_fraction"]) > 0.05  # capacity_factor 1.0 drops here
  for ours, theirs in ((("ep_capacity", 1.0), ("capacity", 1.0)), (("ep_dropless", None), ("dropless", None)),
                       (("ep_dropless", None), ("dense", None)), (("ep_capacity", e / k), ("dense", None))):
    ((_, (y, stats)), grads), ((_, (ref, ref_stats)), ref_grads) = out[ours], out[theirs]
    # float32; the same slots in a different order of operations: agreement to rounding.
    assert rel_err(y, ref) < 1e-6, (ours, theirs)
    for g, r in zip(grads, ref_grads):
      assert rel_err(g, r) < 1e-5, (ours, theirs)
    for name in ("dropped_fraction", "dropped_tokens"):
      assert float(stats[name]) == pytest.approx(float(ref_stats[name])), (ours, theirs, name)


def test_ep_dispatch_rejects_experts_not_divisible_by_expert_shards():
  class Mesh8:
    shape = dict(data=1, fsdp=1, expert=8, tensor=1)
  with pytest.raises(ConfigError, match="num_experts=7 is not divisible by the 8 expert shards"):
    ep.mesh_axes(Mesh8, sharding.MeshConfig().rules_dict, 7, 12)


# --- 8 simulated devices (subprocess) ------------------------------------------------------------------------
# Tolerances: float32 with different reduction orders (psums over shards, gathered weights); measured ~2e-7
# (logits) and ~5e-7 (gradients).

def _check_equality(results):
  for r in results:
    assert r["logits_err"] < 2e-6 and r["grad_err"] < 5e-6 and r["loss_err"] < 1e-6, r
    if r["dispatch"] != "dense":
      assert "'expert'" in r["w1_spec"], r  # the experts really are split


def test_mesh_forward_and_grads_equal_single_device(mesh_results):
  results = mesh_results["equality"]
  assert {r["mesh"] for r in results} == {"expert8", "data2_expert4", "fsdp4_expert2", "tensor2_expert4"}
  _check_equality(results)
  shards = {r["mesh"]: r["w1_shard"] for r in results}  # [L, E, D, F] per device
  assert shards["expert8"] == [2, 1, 44, 22] and shards["fsdp4_expert2"] == [2, 4, 11, 22]
  assert shards["tensor2_expert4"] == [2, 2, 44, 11]


def test_mesh_layer_all_meshes_capacity_drops_skewed_dropless_and_ragged_lowering(mesh_results):
  layer = mesh_results["layer"]
  for mesh in ("data2_expert4", "tensor2_expert4"):
    cap = layer[f"capacity_{mesh}"]
    assert cap["err"] < 1e-6 and cap["dropped"] > 0.1 and cap["dropped"] == pytest.approx(cap["dropped_ref"])
    assert layer[f"dropless_skewed_{mesh}"] < 1e-6
  for mesh in ("expert8", "data2_expert4", "fsdp4_expert2", "tensor2_expert4"):
    for dispatch in ("ep_capacity", "ep_dropless"):
      errs = layer[f"grad_{mesh}_{dispatch}"]
      assert errs["y"] < 1e-6 and errs["grads"] < 1e-5, (mesh, dispatch, errs)
  assert layer["ragged_ops_in_grad"] >= 3  # forward exchange + the two transposed ones
  assert layer["indivisible_tokens"] < 1e-6


def test_orbax_restore_and_load_model_onto_a_different_mesh(mesh_results):
  r = mesh_results["restore"]
  assert r["spec_saved"] == "P(None, 'expert')" and r["spec_restored"] == "P(None, None, 'fsdp', 'tensor')"
  assert r["shard_restored"] == [2, 8, 11, 11]
  assert r["max_abs_diff"] == 0.0 and r["single_max_abs_diff"] == 0.0 and r["loss_err"] < 1e-6
  # checkpoint.load_model onto a mesh: every device holds only its slices, values and loss unchanged.
  assert r["load_model_spec"] == "P(None, None, 'fsdp', 'tensor')" and r["load_model_devices"] == 8
  assert r["load_model_max_abs_diff"] == 0.0 and r["load_model_loss_err"] < 1e-6
  assert r["load_model_default_layout"] == "stacked"
  # init_model creates a model directly in its sharded (stacked) layout, with build()'s values (build is
  # unstacked on CPU; up to jit's fused rounding of the normal sampler, ~1e-8).
  assert r["init_layout"] == "stacked"
  assert r["init_spec"] == "P(None, 'expert')" and r["init_max_abs_diff"] < 1e-7


# --- memory planner --------------------------------------------------------------------------------------------

def test_plan_train_8x7b_on_h100_and_h200():
  from configs import plan_train
  from mixtral_jax.config import model_config_from
  from mixtral_jax.execution import execution_from
  from mixtral_jax.training.plan import GiB, plan
  config = plan_train.get_config()
  cfg, mesh_cfg = model_config_from(config.model), sharding.mesh_config_from(config.mesh)
  run = execution_from(config.run)  # remat=full, ep_capacity; computes in the parameters' bfloat16
  h100 = plan(cfg, mesh_cfg, hardware="h100_80gb", batch_size=8, seq_len=4096, run=run)
  assert h100.remat == "full" and h100.dispatch == "ep_capacity"
  assert h100.mesh == dict(data=1, fsdp=1, expert=8, tensor=1) and h100.batch_per_device == 1
  # Every 8x7B tensor divides by 8 on this mesh: float32 master weights are exactly 4 bytes x 46.7B / 8.
  assert h100.rows["train"]["params"] == 46_702_792_704 * 4 // 8
  assert h100.rows["train"]["optimizer"] == pytest.approx(2 * h100.rows["train"]["params"], rel=1e-6)
  assert not h100.fits("train") and h100.fits("lora")  # 16 bytes/param = 87 GiB before activations
  assert plan(cfg, mesh_cfg, hardware="h200", batch_size=8, seq_len=4096, run=run).fits("train")
  # Activations: remat=full keeps each layer's input; none keeps much more.
  full = h100.rows["train"]["activations"]
  assert full >= 32 * 4096 * 4096 * 2  # L x T x D in bfloat16
  none = plan(cfg, mesh_cfg, hardware="h100_80gb", batch_size=8, seq_len=4096, run=run.replace(remat="none"))
  assert none.rows["train"]["activations"] > 10 * full
  tpu = plan(cfg, mesh_cfg, hardware="tpu_v5p_8", batch_size=8, seq_len=4096, run=run)
  assert tpu.mesh["expert"] == 4 and tpu.batch_per_device == 2
  with pytest.raises(ConfigError, match="config.plan.hardware='h300' is unknown"):
    plan(cfg, mesh_cfg, hardware="h300", batch_size=8, seq_len=4096, run=run)


def test_plan_train_mode_prints_a_table(capsys):
  from configs import plan_train
  from mixtral_jax.modes import load_modes
  load_modes().get("plan_train")(plan_train.get_config("hardware=h200,seq=1024"), "/tmp")
  out = capsys.readouterr().out
  assert "8x NVIDIA H200" in out and "mesh expert=8" in out and "optimizer" in out and "fits" in out


@pytest.mark.slow
def test_trainer_with_expert_sharded_config_and_resume_on_another_mesh():
  r = run_mesh_checks("train")["train"]
  first, second = r["first"], r["second"]
  assert r["dispatch"] == "ep_dropless" and first["mesh"] == {"expert": 8} and first["step"] == 4
  assert first["eval_loss"] < first["eval_loss_start"] - 0.3  # it learns
  # The step-4 checkpoint saved on expert=8 resumes on fsdp=4 x tensor=2 and keeps learning.
  assert second["mesh"] == {"fsdp": 4, "tensor": 2} and second["start_step"] == 4 and second["step"] == 6
  assert second["eval_loss"] < first["eval_loss"]
  assert len(r["losses"]) == 6 and all(d == [0.0, 0.0] for d in r["dropped"])
