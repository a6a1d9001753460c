"""LoRA: targets, shapes, merge arithmetic, per-expert adapters on the routed rows (AdaptedExperts through
every exact dispatch strategy, no dense per-expert delta in the compiled step), the router target, and a
LoRA fine-tune from a converted checkpoint that exports merged weights equal to the adapter model."""
import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from mixtral_jax.inference import quant
from mixtral_jax.moe.adapted import TAKES_ADAPTERS, AdaptedExperts
from mixtral_jax.moe.dispatch import all_dispatchers
from mixtral_jax.moe.routers import topk_gates
from mixtral_jax.training import lora
from mixtral_jax.training import train
from mixtral_jax.training import step as train_step
from mixtral_jax.model import STACKED, build, from_params, params_of
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.training.run_checkpoints import load_pretrained
from test_train import corpus, restore_state, tiny_train_config  # noqa: F401 -- corpus is a fixture


def _params(cfg, seed=0):
  return params_of(build(cfg, seed, STACKED))  # the canonical (stacked) parameter tree LoRA adapts


def test_targets_groups_and_errors():
  assert lora.parse_targets("attn") == ("wq", "wk", "wv", "wo")
  assert lora.parse_targets("wq, w2,wq") == ("wq", "w2")
  assert lora.parse_targets("all") == ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
  assert lora.parse_targets("experts,router") == ("w1", "w3", "w2", "router")
  with pytest.raises(train.ConfigError, match="unknown target 'routr'"):
    lora.parse_targets("attn,routr")
  with pytest.raises(train.ConfigError, match="lora.rank must be positive"):
    lora.init({}, rank=0, targets="attn", key=jax.random.PRNGKey(0))


def test_init_is_the_identity_and_merge_is_w_plus_scaled_a_b():
  cfg = tiny_config(num_layers=2)
  params = _params(cfg)
  adapters = jax.jit(lambda p: lora.init(p, rank=3, targets="all", key=jax.random.PRNGKey(0)))(params)
  merge = jax.jit(lambda p, a: lora.merge(p, a, alpha=6.0, rank=3))  # one program, not one per eager op
  assert sorted(lora.targets_of(adapters)) == sorted(lora.GROUPS["all"])
  a, b = adapters["layers"]["attn"]["wo"]["a"], adapters["layers"]["attn"]["wo"]["b"]
  assert a.shape == (2, 5, 12, 3) and b.shape == (2, 3, 40)  # wo [L, H, Dh, D]: in = (H, Dh)
  assert adapters["layers"]["moe"]["w2"]["a"].shape == (2, 7, 36, 3)  # per expert: [L, E, F, r]
  merged = merge(params, adapters)  # B = 0: exactly the base model
  jax.tree.map(np.testing.assert_array_equal, merged, params)

  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters)
  merged = merge(params, adapters)
  for name, (path, batch_axes, _) in lora.LEAVES.items():
    w = np.asarray(lora._get(params, path), np.float64)
    ad = lora._get(adapters, path)
    a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
    lead = w.shape[:batch_axes]
    expect = np.empty_like(w)
    for idx in np.ndindex(*lead):  # one explicit matrix product per layer (and expert)
      a2 = a[idx].reshape(-1, 3)
      expect[idx] = w[idx] + 2.0 * (a2 @ b[idx].reshape(3, -1)).reshape(w[idx].shape)
    # float32 merge vs float64 reference over a rank-3 sum
    np.testing.assert_allclose(lora._get(merged, path), expect, rtol=1e-5, atol=1e-5, err_msg=name)
  eager = lora.merge(params, {"layers": {"attn": {"wv": lora._get(adapters, lora.LEAVES["wv"][0])}}},
                     alpha=6.0, rank=3)
  assert eager["embed"] is params["embed"]  # untouched leaves are shared, not copied

  # apply: the same function, with the expert targets left unmerged (AdaptedExperts) and attention merged.
  applied = jax.jit(lambda p, a: lora.apply(p, a, alpha=6.0, rank=3))(params, adapters)
  for name, (path, _, _) in lora.LEAVES.items():
    got = lora._get(applied, path)
    assert isinstance(got, AdaptedExperts) == (name in lora.EXPERT_TARGETS), name
    assert got.shape == lora._get(params, path).shape
    np.testing.assert_allclose(got.astype(jnp.float32), lora._get(merged, path), rtol=1e-6, atol=1e-6,
                               err_msg=name)  # the wrapper's dense form is merge's arithmetic
  assert applied["layers"]["moe"]["w1"].scale == 2.0  # alpha / rank, static


def test_router_target_trains_a_float32_copy_of_the_router():
  params = _params(tiny_config(num_layers=2))
  kernel = params["layers"]["moe"]["router"]["kernel"]  # [L, D, E]
  adapters = lora.init(params, rank=3, targets="w1,router", key=jax.random.PRNGKey(0))
  assert lora.targets_of(adapters) == ["w1", "router"]
  np.testing.assert_array_equal(adapters["layers"]["moe"]["router"]["kernel"]["w"], kernel)
  assert lora.count(adapters) == 2 * 7 * 3 * (40 + 36) + kernel.size
  adapters["layers"]["moe"]["router"]["kernel"]["w"] = kernel + 1.0  # "trained"
  for combine in (lora.merge, lora.apply):
    out = combine(params, adapters, alpha=6.0, rank=3)
    np.testing.assert_array_equal(out["layers"]["moe"]["router"]["kernel"], kernel + 1.0)
  np.testing.assert_array_equal(params["layers"]["moe"]["router"]["kernel"], kernel)  # base untouched


# --- AdaptedExperts through the dispatch strategies --------------------------------------------------------

N, D, F, E, R = 31, 12, 18, 5, 3
TOL = 1e-5  # float32; the grouped path sums in another order than the merged weight (observed ~7e-7)
# Every exact strategy and grouped matmul: capacity with C = N (nothing drops), dropless through each gmm and
# through padded blocks (the skewed load overflows the fast buffers), sorted_loop in whole blocks and tails.
STRATEGIES = [("dense", {}), ("capacity", {}), ("dropless", dict(grouped_matmul="loop")),
              ("dropless", dict(grouped_matmul="ragged_dot")), ("dropless", dict(grouped_matmul="blocks")),
              ("dropless", dict(grouped_matmul="blocks", block_size=4)), ("sorted_loop", {}),
              ("sorted_loop", dict(loop_block=4)), ("routed_cond", {})]


def _expert_case(seed=0):
  """x [N, D]; base weights w1/w3 [E, D, F], w2 [E, F, D]; distinct random adapters a [E, In, r] AND
  b [E, r, Out] per expert; a skewed top-2 routing (loads ~[31, 25, 5, 1, 0]: one empty expert)."""
  keys = jax.random.split(jax.random.key(seed), 11)
  shapes = [(D, F), (D, F), (F, D)]
  x = jax.random.normal(keys[0], (N, D))
  base = [0.3 * jax.random.normal(keys[1 + i], (E, *s)) for i, s in enumerate(shapes)]
  a = [0.3 * jax.random.normal(keys[4 + i], (E, s[0], R)) for i, s in enumerate(shapes)]
  b = [0.3 * jax.random.normal(keys[7 + i], (E, R, s[1])) for i, s in enumerate(shapes)]
  logits = jax.random.normal(keys[10], (N, E)) + jnp.asarray([3.0, 1.5, 0.0, -1.0, -8.0])  # [N, E]
  return x, base, a, b, topk_gates(logits, 2, renormalize=True)


def _expert_value_and_grads(name, options, adapted: bool, base_fn=lambda w: w):
  """sum(sin(y)) and its gradients wrt (x, a, b, base) for `name` on AdaptedExperts (adapted) or on the
  merged dense weights."""
  x, base, a, b, route = _expert_case()

  def f(x, a, b, base):
    ws = [AdaptedExperts(base_fn(w), ai, bi, 0.7) for w, ai, bi in zip(base, a, b)]
    if not adapted:
      ws = [w.astype(jnp.float32) for w in ws]  # W + 0.7 a @ b, dense
    kwargs = dict(dtype=jnp.float32, top_k=2, grouped_matmul="blocks", loop_block=128, capacity_factor=E / 2)
    y, _ = all_dispatchers().get(name)(x, route, *ws, **{**kwargs, **options})
    return jnp.sum(jnp.sin(y)), y
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, base)


@functools.lru_cache(maxsize=None)
def _merged_reference():
  return _expert_value_and_grads("dense", {}, adapted=False)


@pytest.mark.parametrize("name,options", STRATEGIES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={o}" for k, o in v.items()) or "default")
def test_adapted_experts_equal_dense_on_the_merged_weights(name, options):
  assert name in TAKES_ADAPTERS
  (_, y), grads = _expert_value_and_grads(name, options, adapted=True)
  (_, y_ref), grads_ref = _merged_reference()
  assert rel_err(y, y_ref) <= TOL
  for what, g, g_ref in zip(("x", "a", "b", "base"), grads, grads_ref):
    for i, (gi, ri) in enumerate(zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))):
      assert np.abs(np.asarray(ri)).max() > 0, (what, i)  # every adapter gets a gradient: b != 0, a != 0
      assert rel_err(gi, ri) <= TOL, (name, options, what, i, rel_err(gi, ri))


@pytest.mark.parametrize("name", ["dropless", "routed_cond"])
def test_adapted_experts_over_a_quantized_base(name):
  """A QTensor base (q8) with float adapters: the same as its dequantized base with the same adapters."""
  q8 = lambda w: quant.quantize(w, "q8", 2, 1)  # noqa: E731
  (_, y), _ = _expert_value_and_grads(name, {}, adapted=True, base_fn=lambda w: q8(w))
  (_, y_ref), _ = _expert_value_and_grads("dense", {}, adapted=False, base_fn=lambda w: q8(w).astype(jnp.float32))
  assert rel_err(y, y_ref) <= TOL


# --- training: what moves, what the export holds -------------------------------------------------------------

@pytest.mark.slow  # end to end (20-45 s); `-m slow` runs it
def test_lora_finetune_trains_only_adapters_and_exports_the_same_model(corpus, tmp_path):
  """Attention (merged in training) and expert (on the routed rows) adapters plus the router in full: the
  export changes exactly those, equals the adapter model, and reloads in HF MixtralForCausalLM."""
  from configs import finetune
  from conftest import hf_logits
  model_cfg = train_step.model_config_from(tiny_train_config(corpus).model)
  source_params = _params(model_cfg, seed=3)
  kernel = source_params["layers"]["moe"]["router"]["kernel"]
  source_params["layers"]["moe"]["router"]["kernel"] = 20.0 * kernel  # top-2 far from ties (conftest.hf_model)
  source = str(checkpoint.save_model(tmp_path / "source", source_params, model_cfg))  # "converted"

  config = finetune.get_config("lora=True,rank=4,targets=wq,alpha=8.0")
  tiny = tiny_train_config(corpus, steps=6, learning_rate=3e-2, warmup_steps=1)
  config.model, config.data, config.logging = tiny.model, tiny.data, tiny.logging
  config.train.update({k: tiny.train[k] for k in ("steps", "batch_size", "seq_len", "learning_rate",
                                                  "warmup_steps", "log_every", "eval_every", "eval_batches",
                                                  "checkpoint_every")})
  config.train.lora.targets = "wq,w2,router"
  config.train.sample_tokens = 0
  config.checkpoint = source
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["eval_loss"] < summary["eval_loss_start"]
  assert summary["lora_params"] == 2 * 4 * (40 + 5 * 12) + 2 * 7 * 4 * (36 + 40) + 2 * 40 * 7

  # The checkpoint holds adapters (and the router) only; the base weights are the source's, untouched.
  state = restore_state(tmp_path / "run" / "checkpoints" / "6")
  assert sorted(lora.targets_of(state["params"])) == ["router", "w2", "wq"]
  assert jax.tree.leaves(state["params"]) and all(set(v) == {"a", "b"} for v in (
      state["params"]["layers"]["attn"]["wq"], state["params"]["layers"]["moe"]["w2"]))

  cfg, base = load_pretrained(source)
  cfg_exported, exported = load_pretrained(summary["export"])
  assert cfg_exported == cfg
  changed = {name for name, (path, _, _) in lora.LEAVES.items()
             if not np.array_equal(lora._get(exported, path), lora._get(base, path))}
  assert changed == {"wq", "w2"}
  assert not np.array_equal(exported["layers"]["moe"]["router"]["kernel"], base["layers"]["moe"]["router"]["kernel"])
  for path in (("embed",), ("lm_head",), ("layers", "attn", "wk"), ("layers", "moe", "w1")):
    np.testing.assert_array_equal(lora._get(exported, path), lora._get(base, path))

  # Merged model (exported, reloaded) == base + adapters as the trainer ran them (w2's on the routed rows).
  setup = train_step.build_setup(config)
  assert setup.lora_experts == "grouped"
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 16)), jnp.int32)
  batch = dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(16), (2, 16)),
               segment_ids=jnp.ones((2, 16), jnp.int32))
  adapters = jax.tree.map(jnp.asarray, state["params"])
  ours = train_step.forward(setup, adapters, setup.base, setup.rest, batch, train=False).logits
  merged = from_params(cfg_exported, exported, setup.run)(tokens).logits  # the trainer's execution
  assert rel_err(merged, ours) <= 1e-5  # float32; the adapter products sum in another order than W + s A B

  with pytest.raises(train.ConfigError, match="holds LoRA adapters"):
    load_pretrained(str(tmp_path / "run"))
  assert os.path.isfile(os.path.join(summary["hf"], "config.json"))  # finetune lora=True: also --to-hf
  transformers = pytest.importorskip("transformers")
  reloaded = transformers.MixtralForCausalLM.from_pretrained(summary["hf"], attn_implementation="eager",
                                                            experts_implementation="eager")
  assert rel_err(hf_logits(reloaded, np.array(tokens)), merged) <= 1e-5  # float32 end to end


def test_expert_lora_steps_move_only_the_adapters(corpus):
  """A few jitted train steps with expert adapters (capacity dispatch: quick to compile; the fine-tune above
  runs the CPU default, dropless): the base stays bit-identical (the router too: not a target), every
  adapter A and B moves, and the grouped forward equals the dense merge's."""
  from test_train import _batch, _copy, _step_fn
  config = tiny_train_config(corpus, learning_rate=3e-2, warmup_steps=0, schedule="constant")
  config.train.lora.update(dict(rank=3, alpha=6.0, targets="experts"))
  config.run.train_dispatch = "capacity"
  setup, state, step = _step_fn(config)
  assert setup.lora_experts == "grouped"
  base, start = _copy(setup.base), _copy(state["params"])
  for seed in range(2):
    state, metrics = step(state, setup.base, _batch(4, seed=seed))
    assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, setup.base, base)
  assert lora.targets_of(state["params"]) == ["w1", "w3", "w2"]
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(start)[0], jax.tree.leaves(state["params"])):
    assert not np.array_equal(before, after), path  # per expert: every expert of this batch got rows
  batch = {k: jnp.asarray(v) for k, v in _batch(2, seed=9).items()}
  grouped = train_step.forward(setup, state["params"], setup.base, setup.rest, batch, train=False).logits
  merged = train_step.forward(setup._replace(lora_experts="merged"), state["params"], setup.base, setup.rest,
                              batch, train=False).logits
  assert rel_err(grouped, merged) <= 1e-5
  effective = train_step.effective_params(setup, state["params"], setup.base)
  np.testing.assert_array_equal(effective["layers"]["moe"]["router"]["kernel"],
                                base["layers"]["moe"]["router"]["kernel"])


def test_router_target_and_freeze_router_contradict(corpus):
  config = tiny_train_config(corpus, freeze_router=True)
  config.train.lora.update(dict(rank=3, targets="experts,router"))
  with pytest.raises(train.ConfigError, match="freeze_router=True contradicts the LoRA target 'router'"):
    train_step.build_setup(config)
  config.run.train_dispatch = "ep_dropless"  # shard_map takes plain weights: experts merged densely
  config.train.freeze_router = False
  assert train_step.build_setup(config).lora_experts == "merged"


# --- no dense per-expert delta in the compiled training forward+backward -----------------------------------

# Sizes where one dense delta (E D F r) outweighs the routed rows' adapter products (rows r (D + F)).
FL, FE, FD, FF, FR, FB, FT = 1, 8, 64, 128, 8, 2, 8  # layers, experts, dim, ffn, rank, batch, seq


def _compiled_grad(targets, lora_experts, dispatch, grouped_matmul="auto"):
  """(flops, optimized HLO) of the jitted gradient of the training loss wrt the LoRA tree: the train step's
  forward + backward (lora.apply or lora.merge, nnx.merge, the model with train=True), without AdamW."""
  from configs import base as base_config
  config = base_config.get_config()
  config.model.update(dict(vocab_size=67, dim=FD, num_layers=FL, num_heads=2, num_kv_heads=1, head_dim=16,
                           ffn_dim=FF, num_experts=FE, top_k=2, max_positions=32))
  config.run.update(dict(train_dispatch=dispatch, grouped_matmul=grouped_matmul, remat="none"))
  config.train.lora.update(dict(rank=FR, alpha=16.0, targets=targets))
  setup = train_step.build_setup(config)._replace(lora_experts=lora_experts)
  trainable = lora.init(setup.base, rank=FR, targets=setup.lora["targets"], key=jax.random.PRNGKey(1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 67, (FB, FT)), jnp.int32)
  batch = dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(FT), (FB, FT)),
               segment_ids=jnp.ones((FB, FT), jnp.int32))

  def loss(adapters):
    logits = train_step.forward(setup, adapters, setup.base, setup.rest, batch, train=True).logits
    return train_step.next_token_loss(logits, tokens, jnp.ones((FB, FT)))[0]
  compiled = jax.jit(jax.grad(loss)).lower(trainable).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"], compiled.as_text()


def _expert_shaped_dots(hlo: str) -> list:
  """Dots in optimized HLO whose output is [.., E, D, F] or [.., E, F, D]: a dense per-expert weight (delta)."""
  shapes = [tuple(int(d) for d in m.group(1).split(",") if d)
            for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(", hlo)]
  return [s for s in shapes if s[-3:] in ((FE, FD, FF), (FE, FF, FD))]


def test_expert_lora_step_computes_no_dense_per_expert_delta():
  """Capacity dispatch (pure einsums, so XLA's cost analysis counts every FLOP): expert adapters on the
  routed rows add ~ rows r (D + F) FLOPs over the frozen base; the dense merge adds E D F r per weight."""
  base_flops, _ = _compiled_grad("wq", "grouped", "capacity")  # the frozen experts (a small attention LoRA)
  grouped_flops, grouped_hlo = _compiled_grad("wq,experts", "grouped", "capacity")
  merged_flops, merged_hlo = _compiled_grad("wq,experts", "merged", "capacity")
  assert not _expert_shaped_dots(grouped_hlo) and _expert_shaped_dots(merged_hlo)  # the check can fail
  rows = FE * math.ceil(2 * FB * FT * 1.25 / FE)  # capacity's buffer rows [E, C]: C = ceil(k N 1.25 / E)
  # Per layer and weight: x a then (x a) b, 2 rows r (In + Out) FLOPs; the backward pass costs twice the
  # forward (d input, d adapter). 5x (not 3x) leaves room for the elementwise adds and scales.
  budget = 5 * 3 * FL * 2 * rows * FR * (FD + FF)
  dense_delta = 3 * FL * 2 * FE * FD * FF * FR  # the merge's forward alone, one [E, D, F] product per weight
  assert grouped_flops - base_flops <= budget < dense_delta + budget <= merged_flops - base_flops, (
      base_flops, grouped_flops, merged_flops, budget, dense_delta)


@pytest.mark.slow  # the loop grouped matmul's backward compiles for ~30 s on 2 busy cores
def test_expert_lora_on_the_cpu_default_dispatch_has_no_dense_delta():
  """dropless through the `loop` grouped matmul (the CPU default), where while loops hide FLOPs from the
  cost analysis: no dot builds an [E, D, F] weight in the grouped step; the merged step has them."""
  _, grouped_hlo = _compiled_grad("experts", "grouped", "dropless", "loop")
  _, merged_hlo = _compiled_grad("experts", "merged", "dropless", "loop")
  assert not _expert_shaped_dots(grouped_hlo) and _expert_shaped_dots(merged_hlo)
