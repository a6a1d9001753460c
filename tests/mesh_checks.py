"""Multi-device checks, run as a script in a subprocess with 8 simulated CPU devices.

The pytest process has already initialised jax with one device, and the device count can only be set before
jax starts; so tests/test_sharding.py runs `python tests/mesh_checks.py CHECK...` with XLA_FLAGS set and reads
the one JSON line each check prints. Also handy by hand: `python tests/mesh_checks.py equality`.
"""
import functools
import json
import os
import sys
import tempfile
import time

if __name__ == "__main__":  # only as a script: importing this module must not change the importer's env
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _HERE = os.path.dirname(os.path.abspath(__file__))
  sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mixtral_jax.parallel import placement, sharding  # noqa: E402
from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.execution import Execution  # noqa: E402
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
# The single-device reference: every expert on every token, scanned layers (the layout meshes split, so
# gradients of either model are the same canonical tree).
DENSE = Execution.everywhere("dense", layout="stacked")


def on_mesh(dispatch, **fields):
  """One dispatch strategy for every phase (the checks' forwards are train=False: the prefill phase)."""
  return Execution.everywhere(dispatch, layout="stacked", **fields)


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


@functools.partial(jax.jit, static_argnums=0)
def _loss(graphdef, state, toks):
  return loss_fn(graphdef, state, toks)[0]


def loss_only(model, toks, mesh=None, rules=None):
  """Forward only, jitted once per (graphdef, mesh): the checks that need just the loss share a compile."""
  graphdef, state = nnx.split(model)
  with sharding.use_mesh(mesh, rules):
    return float(_loss(graphdef, state, toks if mesh is None else sharding.put_batch(toks, mesh, rules)))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Model level: the test suite runs every mesh once, each strategy twice (compiles dominate the test time);
# `python tests/mesh_checks.py equality_slow` runs the other pairs and dense. The `layer` check covers every
# mesh x strategy pair, outputs and gradients, at the MoE-layer level.
FAST_CASES = [("expert8", "ep_dropless"), ("data2_expert4", "ep_capacity"), ("fsdp4_expert2", "ep_dropless"),
              ("tensor2_expert4", "ep_capacity")]
SLOW_CASES = [(m, d) for m in MESHES for d in ("ep_capacity", "ep_dropless") if (m, d) not in FAST_CASES] + [
    ("fsdp4_expert2", "dense")]


def check_equality(cases=FAST_CASES):
  """Logits and gradients on each mesh x dispatch vs one device with dense dispatch."""
  params, toks = reference_params(), tokens()
  ref_loss, ref_logits, ref_grads = value_and_grad(from_params(CFG, params, DENSE), toks)
  results = []
  for mesh_name, dispatch in cases:
    start = time.time()
    mesh_cfg = sharding.mesh_config_from(MESHES[mesh_name])
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
    model = sharding.shard_model(from_params(CFG, params, on_mesh(dispatch, capacity_factor=NO_DROP)), mesh, rules)
    assert model.execution.prefill_dispatch == dispatch
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
  model = sharding.shard_model(from_params(CFG, params, DENSE), save_mesh, save_cfg.rules_dict)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "params")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, params_of(model))
    ckpt.wait_until_finished()
    load_cfg = sharding.mesh_config_from(dict(fsdp=4, tensor=2))
    load_mesh = sharding.make_mesh(load_cfg)
    target = placement.abstract_state(CFG, load_mesh, load_cfg.rules_dict)
    restored = ckpt.restore(path, target)
    w1 = restored["layers"]["moe"]["w1"]
    out["spec_saved"] = str(model.layers.moe.w1[...].sharding.spec)
    out["spec_restored"] = str(w1.sharding.spec)
    out["shard_restored"] = list(w1.addressable_shards[0].data.shape)
    out["max_abs_diff"] = max(float(np.abs(np.asarray(a) - b).max())
                              for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
    one = sharding.make_mesh(dict(fsdp=1), devices=jax.devices()[:1])
    single = ckpt.restore(path, placement.abstract_state(CFG, one, load_cfg.rules_dict))
    out["single_max_abs_diff"] = max(float(np.abs(np.asarray(a) - b).max())
                                     for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(params)))
    # The restored tree runs: the model on the new mesh gives the same loss as on one device.
    ref_loss = loss_only(from_params(CFG, params, DENSE), tokens())
    moved = from_params(CFG, restored, DENSE)
    out["loss_err"] = abs(loss_only(moved, tokens(), load_mesh, load_cfg.rules_dict) - ref_loss)
    # checkpoint.save_model of the sharded model (Orbax writes shard by shard), then load_model straight onto
    # the other mesh: each device reads only its slices, nothing is assembled on one device first.
    from mixtral_jax.checkpoints import store as checkpoint
    checkpoint.save_model(os.path.join(tmp, "model"), model)
    on_load_mesh = lambda s: sharding.state_shardings(s, load_mesh, load_cfg.rules_dict)  # noqa: E731
    loaded = checkpoint.load_model(os.path.join(tmp, "model"), shardings=on_load_mesh, execution=DENSE)
    # Without an execution, shardings still give the stacked layout (what the rules split).
    out["load_model_default_layout"] = checkpoint.load_model(os.path.join(tmp, "model"),
                                                             shardings=on_load_mesh).execution.layout
    w1 = loaded.layers.moe.w1[...]
    out["load_model_spec"] = str(w1.sharding.spec)
    out["load_model_devices"] = len(w1.sharding.device_set)
    out["load_model_max_abs_diff"] = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
        jax.tree.leaves(params_of(loaded)), jax.tree.leaves(params)))
    out["load_model_loss_err"] = abs(loss_only(loaded, tokens(), load_mesh, load_cfg.rules_dict) - ref_loss)
  init = placement.init_model(CFG, 0, save_mesh, save_cfg.rules_dict)
  out["init_layout"] = init.execution.layout
  out["init_spec"] = str(init.layers.moe.w1[...].sharding.spec)
  out["init_max_abs_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(params_of(init)), jax.tree.leaves(params_of(build(CFG, 0)))))
  return out


def train_steps(mesh=None, rules=None, steps=3, lr=1e-3):
  """AdamW steps on fixed batches with ep_dropless; returns (losses, final params as numpy)."""
  import optax
  from jax.experimental import multihost_utils
  model = from_params(CFG, reference_params(), on_mesh("ep_dropless"))
  if mesh is not None:
    model = sharding.shard_model(model, mesh, rules)
  graphdef, state = nnx.split(model)
  opt = optax.adamw(lr)

  @jax.jit
  def step(state, opt_state, toks):
    (loss, _), grads = jax.value_and_grad(lambda s: loss_fn(graphdef, s, toks), has_aux=True)(state)
    updates, opt_state = opt.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  losses = []
  with sharding.use_mesh(mesh, rules) if mesh is not None else _nullcontext():
    opt_state = jax.jit(opt.init)(state)
    for i in range(steps):
      toks = tokens(seed=10 + i)
      state, opt_state, loss = step(state, opt_state, toks if mesh is None else
                                    sharding.put_batch(toks, mesh, rules))
      losses.append(float(loss))
  pure = nnx.to_pure_dict(state)
  if jax.process_count() > 1:
    pure = multihost_utils.process_allgather(pure, tiled=True)
  return losses, jax.tree.map(np.asarray, pure)


def _nullcontext():
  import contextlib
  return contextlib.nullcontext()


def check_train3():
  """3 training steps on a data=2 x expert=2 mesh over every process's devices (jax.distributed when the
  MIXTRAL_* variables are set); process 0 writes the final params to $MESH_CHECKS_OUT (npz)."""
  distributed = sharding.initialize_distributed()
  mesh_cfg = sharding.mesh_config_from(dict(data=2, expert=2, fsdp=1))
  losses, params = train_steps(sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict)
  out = os.environ.get("MESH_CHECKS_OUT")
  if out and jax.process_index() == 0:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, **{jax.tree_util.keystr(p): v for p, v in flat})
  return dict(losses=losses, processes=jax.process_count(), process=jax.process_index(),
              local_devices=jax.local_device_count(), distributed=distributed)


def check_layer():
  """The MoE layer alone: capacity drops per token shard, a skewed (all-to-one-device) dropless routing, and
  the ragged_all_to_all variant lowered (XLA:CPU cannot compile it; the CPU path emulates it)."""
  from mixtral_jax.parallel import expert_parallel as ep
  from mixtral_jax.moe.dispatch import DISPATCHERS
  from mixtral_jax.moe.routers import topk_renormalized
  n, d, f, e, k = 96, 16, 10, 8, 2
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (n, d))
  w1, w3 = (jax.random.normal(kk, (e, d, f)) * 0.3 for kk in keys[1:3])
  w2 = jax.random.normal(keys[3], (e, f, d)) * 0.3
  route = topk_renormalized(jax.random.normal(keys[4], (n, e)) * 3.0, k)
  dense = lambda r: DISPATCHERS.get("dense")(x, r, w1, w3, w2, dtype=jnp.float32)[0]  # noqa: E731
  out = {}

  def loss(name, x, w1, w3, w2):
    y, _ = DISPATCHERS.get(name)(x, route, w1, w3, w2, dtype=jnp.float32, capacity_factor=e / k)
    return jnp.sum(y * jnp.cos(y)), y

  grad = lambda name: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda *a: loss(name, *a), argnums=(0, 1, 2, 3), has_aux=True))
  (_, y_ref), g_ref = grad("dense")(x, w1, w3, w2)
  for mesh_name, shape in MESHES.items():  # every mesh x both strategies, output and gradients
    mesh_cfg = sharding.mesh_config_from(shape)
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
    for name in ("ep_capacity", "ep_dropless"):
      with sharding.use_mesh(mesh, rules):
        (_, y), g = grad(name)(x, w1, w3, w2)
      out[f"grad_{mesh_name}_{name}"] = dict(y=rel(y, y_ref), grads=max(map(rel, g, g_ref)))
  for mesh_name in ("data2_expert4", "tensor2_expert4"):
    mesh_cfg = sharding.mesh_config_from(MESHES[mesh_name])
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
    shards = np.prod([mesh.shape[a] for a in ep.mesh_axes(mesh, rules, e, f).tokens])
    with sharding.use_mesh(mesh, rules):
      y, stats = jax.jit(lambda x: ep.ep_capacity(x, route, w1, w3, w2, dtype=jnp.float32,
                                                  capacity_factor=1.0, top_k=k))(x)
    # Reference: single-device `capacity` applied to each token shard on its own.
    ref, dropped = [], []
    for rows in np.split(np.arange(n), shards):
      r = jax.tree.map(lambda a: a[rows], route)
      yy, ss = DISPATCHERS.get("capacity")(x[rows], r, w1, w3, w2, dtype=jnp.float32, capacity_factor=1.0,
                                           top_k=k)
      ref.append(yy)
      dropped.append(float(ss["dropped_fraction"]))
    out[f"capacity_{mesh_name}"] = dict(err=rel(y, np.concatenate(ref)), dropped=float(stats["dropped_fraction"]),
                                        dropped_ref=float(np.mean(dropped)))
    skewed = route.replace(experts=jnp.stack([jnp.zeros(n, jnp.int32), jnp.full(n, 5, jnp.int32)], 1))
    with sharding.use_mesh(mesh, rules):
      y = jax.jit(lambda x: ep.ep_dropless(x, skewed, w1, w3, w2, dtype=jnp.float32)[0])(x)
    out[f"dropless_skewed_{mesh_name}"] = rel(y, dense(skewed))
  mesh_cfg = sharding.mesh_config_from(MESHES["expert8"])
  mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
  with sharding.use_mesh(mesh, rules):
    lowered = jax.jit(jax.grad(lambda x: ep.run_sharded(
        ep.dropless_shard, x, route, w1, w3, w2, dtype=jnp.float32, capacity_factor=None, ragged=True,
        grouped_matmul="ragged_dot")[0].sum())).lower(x)
  out["ragged_ops_in_grad"] = lowered.as_text().count("ragged_all_to_all")
  # 9 tokens cannot be split over 8 shards (one-token decoding is the real case): runs as one shard.
  few = jax.tree.map(lambda a: a[:9], route)
  with sharding.use_mesh(mesh, rules):
    y = jax.jit(lambda x: ep.ep_dropless(x, few, w1, w3, w2, dtype=jnp.float32)[0])(x[:9])
  out["indivisible_tokens"] = rel(y, DISPATCHERS.get("dense")(x[:9], few, w1, w3, w2, dtype=jnp.float32)[0])
  return out


def check_train():
  """The trainer with configs/expert_sharded.py (expert=8, ep_dropless) for 4 steps, then resumed from its
  step-4 checkpoint on a different mesh (fsdp=4 x tensor=2) for 2 more."""
  from configs import expert_sharded
  from mixtral_jax.training import train
  words = "the quick brown fox jumps over the lazy dog while experts route every token".split()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    for i in range(6):
      with open(os.path.join(corpus, f"doc{i}.txt"), "w") as f:
        f.write("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(6)))
    config = expert_sharded.get_config()
    config.model.update(dict(vocab_size=259, dim=40, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=12,
                             ffn_dim=36, max_positions=64, rope_theta=10000.0))
    config.train.update(dict(steps=4, batch_size=8, seq_len=32, warmup_steps=1, learning_rate=1e-2, log_every=1,
                             eval_every=4, eval_batches=1, checkpoint_every=2, sample_tokens=0))
    config.data.update(dict(paths=corpus, tokenizer="bytes", eval_fraction=0.2))
    config.logging.update(dict(wandb="disabled", progress=False, plot=False))
    workdir = os.path.join(tmp, "work")
    first = train.train_and_evaluate(config, workdir)
    config.mesh.update(dict(expert=1, fsdp=4, tensor=2))
    config.train.steps = 6
    second = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
  keep = ("mesh", "start_step", "step", "eval_loss_start", "eval_loss")
  return dict(first={k: first.get(k) for k in keep}, second={k: second.get(k) for k in keep},
              dispatch=config.run.train_dispatch,
              dropped=[r["dropped_fraction"] for r in records if "dropped_fraction" in r],
              losses=[r["loss"] for r in records if "loss" in r])


def check_equality_slow():
  return check_equality(SLOW_CASES)


CHECKS = {"equality": check_equality, "equality_slow": check_equality_slow, "layer": check_layer,
          "restore": check_restore, "train": check_train, "train3": check_train3}


if __name__ == "__main__":
  for name in sys.argv[1:] or list(CHECKS):
    start = time.process_time()
    result = CHECKS[name]()  # first: train3 must initialise jax.distributed before any device query
    print(json.dumps({"check": name, "devices": jax.device_count(), "cpu_seconds": time.process_time() - start,
                      "result": result}), flush=True)
