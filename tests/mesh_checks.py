"""Multi-device checks, run as a script in a subprocess with 8 simulated CPU devices.

The pytest process has already initialised jax with one device, and the device count can only be set before
jax starts; so tests/test_sharding.py runs `python tests/mesh_checks.py CHECK...` with XLA_FLAGS set and reads
the one JSON line each check prints. Also handy by hand: `python tests/mesh_checks.py equality`.
"""
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mixtral_jax import sharding  # noqa: E402
from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.model import build, from_params, params_of  # noqa: E402

# Sizes divide the mesh axes where they must (E by 8, D by 4, H/K/F by 2); V=131 is prime, so the vocab
# axis cannot be split over `tensor` and exercises the replicate-instead-of-fail rule.
CFG = ModelConfig(vocab_size=131, dim=44, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=10, ffn_dim=22,
                  num_experts=8, top_k=2, rope_theta=10000.0, max_positions=64).replace()
BATCH, SEQ = 8, 12
MESHES = {"expert8": dict(expert=8, fsdp=1), "data2_expert4": dict(data=2, expert=4, fsdp=1),
          "fsdp4_expert2": dict(fsdp=4, expert=2), "tensor2_expert4": dict(tensor=2, expert=4, fsdp=1)}
# capacity_factor = E/k makes C = n (the most one expert can receive), so ep_capacity drops nothing and must
# equal the dense reference; drops are checked separately at layer level.
NO_DROP = CFG.num_experts / CFG.top_k


def reference_params(seed=0):
  """Random params with the router scaled up 20x so top-k choices are far from ties (a 1e-7 reduction-order
  difference must not flip an expert: that would test tie-breaking, not sharding)."""
  params = jax.tree.map(np.asarray, params_of(build(CFG, seed)))
  params["layers"]["moe"]["router"]["kernel"] = params["layers"]["moe"]["router"]["kernel"] * 20.0
  return params


def tokens(seed=1):
  return np.asarray(jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 0, CFG.vocab_size), np.int32)


def loss_fn(graphdef, state, toks):
  out = nnx.merge(graphdef, state)(toks)
  logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)  # [B, T-1, V]
  nll = -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)[..., 0]
  return nll.mean(), out.logits


def value_and_grad(model, toks, mesh=None, rules=None):
  graphdef, state = nnx.split(model)
  step = jax.jit(jax.value_and_grad(lambda s, t: loss_fn(graphdef, s, t), has_aux=True))
  if mesh is None:
    (loss, logits), grads = step(state, toks)
  else:
    with sharding.use_mesh(mesh, rules):
      (loss, logits), grads = step(state, sharding.put_batch(toks, mesh, rules))
  return float(loss), np.asarray(logits), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_equality():
  """Logits and gradients on each mesh x EP dispatch vs one device with dense dispatch."""
  params, toks = reference_params(), tokens()
  ref_loss, ref_logits, ref_grads = value_and_grad(from_params(CFG, params), toks)
  cases = [(m, d) for m in MESHES for d in ("ep_capacity", "ep_dropless")] + [("fsdp4_expert2", "dense")]
  results = []
  for mesh_name, dispatch in cases:
    start = time.time()
    mesh_cfg = sharding.mesh_config_from(MESHES[mesh_name])
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
    cfg = CFG.replace(dispatch=dispatch, capacity_factor=NO_DROP)
    model = sharding.shard_model(from_params(cfg, params), mesh, rules)
    w1 = model.layers.moe.w1[...]
    loss, logits, grads = value_and_grad(model, toks, mesh, rules)
    grad_err = jax.tree.leaves(jax.tree.map(rel, grads, ref_grads))
    results.append(dict(mesh=mesh_name, dispatch=dispatch, loss_err=abs(loss - ref_loss) / abs(ref_loss),
                        logits_err=rel(logits, ref_logits), grad_err=max(grad_err),
                        w1_spec=str(w1.sharding.spec), w1_shard=list(w1.addressable_shards[0].data.shape),
                        seconds=round(time.time() - start, 1)))
  return results


def check_restore():
  """Orbax: save sharded on expert=8, restore onto fsdp=4 x tensor=2 (a different mesh) and onto 1 device."""
  import orbax.checkpoint as ocp
  params = reference_params()
  save_cfg = sharding.mesh_config_from(dict(expert=8, fsdp=1))
  save_mesh = sharding.make_mesh(save_cfg)
  model = sharding.shard_model(from_params(CFG, params), save_mesh, save_cfg.rules_dict)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "params")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, params_of(model))
    ckpt.wait_until_finished()
    load_cfg = sharding.mesh_config_from(dict(fsdp=4, tensor=2))
    load_mesh = sharding.make_mesh(load_cfg)
    target = sharding.abstract_state(CFG, load_mesh, load_cfg.rules_dict)
    restored = ckpt.restore(path, target)
    w1 = restored["layers"]["moe"]["w1"]
    out["spec_saved"] = str(model.layers.moe.w1[...].sharding.spec)
    out["spec_restored"] = str(w1.sharding.spec)
    out["shard_restored"] = list(w1.addressable_shards[0].data.shape)
    out["max_abs_diff"] = max(float(np.abs(np.asarray(a) - b).max())
                              for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
    one = sharding.make_mesh(dict(fsdp=1), devices=jax.devices()[:1])
    single = ckpt.restore(path, sharding.abstract_state(CFG, one, load_cfg.rules_dict))
    out["single_max_abs_diff"] = max(float(np.abs(np.asarray(a) - b).max())
                                     for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(params)))
    # The restored tree runs: the model on the new mesh gives the same loss as on one device.
    ref_loss = value_and_grad(from_params(CFG, params), tokens())[0]
    moved = from_params(CFG, restored)
    out["loss_err"] = abs(value_and_grad(moved, tokens(), load_mesh, load_cfg.rules_dict)[0] - ref_loss)
  return out


CHECKS = {"equality": check_equality, "restore": check_restore}


if __name__ == "__main__":
  for name in sys.argv[1:] or list(CHECKS):
    print(json.dumps({"check": name, "devices": jax.device_count(), "result": CHECKS[name]()}), flush=True)
