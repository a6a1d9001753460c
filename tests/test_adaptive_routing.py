"""Adaptive compute: top-p selection (Huang et al. 2024), the `top_p` router, and the inference-time
routing override config.run.top_k / top_p (execution.py), which re-selects from a trained router's
logits. The dispatcher contract with top-p routes is in test_dispatch.py (router "top_p")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err, tiny_config
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.execution import Execution, execution_from
from mixtral_jax.inference import sampling
from mixtral_jax.model import STACKED, KVCache, abstract_model, build, from_params, params_of, with_execution
from mixtral_jax.moe.metrics import experts_per_token, moe_metrics
from mixtral_jax.moe.routers import ROUTERS, routing_override_error, top_p_gates

TOL = 1e-5  # float32; the dispatch strategies differ only in summation order
forward = jax.jit(lambda model, tokens, **kwargs: model(tokens, **kwargs))


def gates(probs, threshold, max_k, renormalize=True):
  return top_p_gates(jnp.log(jnp.asarray(probs, jnp.float32)), threshold, max_k, renormalize=renormalize)


def used(route):
  return np.asarray(route.weights != 0).sum(-1)  # experts per token


@pytest.mark.parametrize("threshold,max_k,want", [
    (0.45, 4, [1]), (0.5 - 1e-3, 4, [1]), (0.79, 4, [1, 3]), (0.81, 4, [1, 3, 2]), (0.96, 4, [1, 3, 2, 0]),
    (0.96, 2, [1, 3]), (1e-6, 4, [1])])
def test_top_p_gates_keeps_the_smallest_prefix_reaching_the_threshold(threshold, max_k, want):
  """probs 0.05, 0.5, 0.15, 0.3 (unsorted): cumulative 0.5, 0.8, 0.95, 1 in descending order."""
  route = gates([[0.05, 0.5, 0.15, 0.3]], threshold, max_k, renormalize=False)
  kept = route.weights[0] != 0
  assert route.experts.shape == (1, max_k) and int(kept.sum()) == len(want)
  np.testing.assert_array_equal(route.experts[0, :len(want)], want)
  np.testing.assert_allclose(route.weights[0, :len(want)], np.asarray([0.05, 0.5, 0.15, 0.3])[want], rtol=1e-6)
  renormalized = gates([[0.05, 0.5, 0.15, 0.3]], threshold, max_k)
  np.testing.assert_allclose(renormalized.weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(renormalized.weights[0], route.weights[0] / route.weights[0].sum(), rtol=1e-6)


def test_top_p_gates_threshold_one_keeps_every_slot_despite_rounding():
  """The mass before a 1e-12 expert rounds to 1.0 in float32: only threshold >= 1 keeps it (documented)."""
  probs = [[0.6, 0.4 - 1e-12, 1e-12]]
  everything = gates(probs, 1.0, 3)
  assert used(everything).tolist() == [3]
  np.testing.assert_allclose(everything.weights.sum(-1), 1.0, rtol=1e-6)
  assert used(gates(probs, 1.0 - 1e-7, 3)).tolist() == [2]  # float32 rounding drops it below 1


def test_top_p_gates_properties_on_random_logits():
  """At least one expert, at most max_k; the kept prefix is minimal: without its last expert it is below
  the threshold, and it reaches the threshold unless max_k cut it short. Weights sum to 1."""
  logits = 2.0 * jax.random.normal(jax.random.key(0), (500, 7))
  for threshold, max_k in ((0.3, 7), (0.6, 3), (0.9, 5)):
    route = top_p_gates(logits, threshold, max_k, renormalize=True)
    probs = np.asarray(route.probs, np.float64)
    top = np.take_along_axis(probs, np.asarray(route.experts), -1)  # [N, k] descending
    assert np.all(np.diff(top, axis=-1) <= 0)
    count = used(route)
    assert count.min() >= 1 and count.max() <= max_k
    assert len(set(count.tolist())) > 1, "the counts must vary for this to test adaptivity"
    mass = np.cumsum(top, -1)
    rows = np.arange(len(count))
    before_last = np.where(count > 1, mass[rows, np.maximum(count - 2, 0)], 0.0)
    assert np.all(before_last < threshold + 1e-6)
    assert np.all((mass[rows, count - 1] >= threshold - 1e-6) | (count == max_k))
    np.testing.assert_allclose(route.weights.sum(-1), 1.0, rtol=1e-6)


def test_top_p_router_threshold_is_validated():
  tiny_config(router="top_p", router_options=(("threshold", 1.0),))
  for bad in (0.0, 1.5, -0.1, "half"):
    with pytest.raises(ConfigError, match=r"^config.model.router_options.threshold must be in \(0, 1\]"):
      tiny_config(router="top_p", router_options=(("threshold", bad),))


def test_select_keeps_each_routers_renormalisation():
  """The override re-selects from the router's own logits with its own rule."""
  x = jax.random.normal(jax.random.key(1), (13, 11))
  logits = None
  for name, renormalized in (("mixtral_topk", True), ("topk", False), ("switch", False), ("top_p", True)):
    router = ROUTERS.get(name)(11, 7, 1 if name == "switch" else 2, rngs=nnx.Rngs(0))
    logits = router.logits(x)
    for top_k, top_p in ((3, 0.0), (0, 0.5), (3, 0.5)):
      out = router.select(logits, top_k=top_k, top_p=top_p)
      slots = top_k or (router.top_k if name == "top_p" else 7)
      assert out.experts.shape == (13, slots), (name, top_k, top_p)
      chosen = jnp.take_along_axis(out.probs, out.experts, -1)
      if renormalized:
        np.testing.assert_allclose(out.weights.sum(-1), 1.0, rtol=1e-6)
      else:
        np.testing.assert_allclose(out.weights, jnp.where(out.weights != 0, chosen, 0.0), rtol=1e-6)
  prioritized = ROUTERS.get("topk")(11, 7, 2, rngs=nnx.Rngs(0), batch_prioritized=True)
  out = prioritized.select(prioritized.logits(x), top_k=3)
  np.testing.assert_allclose(out.priority, jnp.max(out.probs, -1), rtol=1e-7)
  top_p = ROUTERS.get("top_p")(11, 7, 2, rngs=nnx.Rngs(0), threshold=0.3)
  np.testing.assert_array_equal(top_p(x).weights, top_p_gates(top_p.logits(x), 0.3, 2, renormalize=True).weights)
  np.testing.assert_array_equal(top_p.select(logits, top_k=4, top_p=0.7).weights,
                                top_p_gates(logits, 0.7, 4, renormalize=True).weights)


@pytest.fixture(scope="module")
def weights():
  """A top-2 model's canonical params with the router kernels scaled 20x, so that probabilities are
  peaked and far from ties (top-p counts then vary per token)."""
  cfg = tiny_config()
  params = params_of(build(cfg, seed=3, execution=STACKED))
  router = params["layers"]["moe"]["router"]
  router["kernel"] = 20.0 * router["kernel"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  return cfg, params, tokens


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_override_equals_a_model_built_with_that_top_k(weights, k):
  """run.top_k=k on a top-2 model == the same weights with ModelConfig top_k=k, unstacked against
  stacked (both dense: the dispatch strategies have their own contract, and compile 2x faster)."""
  cfg, params, tokens = weights
  overridden = from_params(cfg, params, Execution.everywhere("dense", top_k=k))
  reference = from_params(cfg.replace(top_k=k), params, Execution.everywhere("dense", layout="stacked"))
  out, ref = forward(overridden, tokens), forward(reference, tokens)
  assert overridden.config.top_k == 2 and overridden.execution.top_k == k
  assert out.router.experts.shape == (cfg.num_layers, 2, 9, k)
  assert rel_err(out.logits, ref.logits) <= TOL
  np.testing.assert_array_equal(out.router.experts, ref.router.experts)
  np.testing.assert_allclose(experts_per_token(out.router), k)
  if k == 3:  # forwards with train=True use the override too
    trained = jax.jit(lambda m, t: m(t, train=True))(with_execution(overridden, layout="stacked"), tokens)
    assert trained.router.experts.shape[-1] == k and rel_err(trained.logits, ref.logits) <= TOL


def test_override_through_load_model_and_with_execution(weights, tmp_path):
  """The two ways a user sets it: load_model(path, execution=Execution(top_p=...)), with_execution."""
  cfg, params, tokens = weights
  model = from_params(cfg, params, Execution.everywhere("dense", layout="stacked"))
  checkpoint.save_model(tmp_path / "ckpt", model)
  loaded = checkpoint.load_model(tmp_path / "ckpt", execution=Execution.everywhere("dense", top_p=0.5))
  converted = with_execution(model, top_p=0.5)
  assert loaded.execution.top_p == converted.execution.top_p == 0.5 and loaded.execution.resolved
  assert loaded.execution.layout == "unstacked" and converted.execution.layout == "stacked"
  a, b = forward(loaded, tokens), forward(converted, tokens)
  assert rel_err(a.logits, b.logits) <= TOL
  assert a.router.experts.shape[-1] == cfg.num_experts  # top-p without top_k: up to all E experts
  assert with_execution(converted, top_p=0.0).execution.top_p == 0.0  # back to as trained
  with pytest.raises(ConfigError, match=r"^config.run.top_k=8 exceeds config.model.num_experts=7$"):
    checkpoint.load_model(tmp_path / "ckpt", execution=Execution(top_k=8))


@pytest.mark.slow  # end to end (20-45 s); `-m slow` runs it
def test_top_p_prefill_decode_and_generate_equal_dense(weights):
  """run.top_p=0.7, run.top_k=3 (variable experts per token): the CPU default execution (unstacked;
  sorted_loop prefill, routed_cond decode) equals dense dispatch with the same override (stacked):
  prefill and decode logits, and greedy generated tokens. The per-layer metric shows adaptive compute.
  Two of the fixture's layers: compile time grows with the unstacked layers."""
  cfg, params, tokens = weights
  cfg = cfg.replace(num_layers=2)
  params = {**params, "layers": jax.tree.map(lambda a: a[:2], params["layers"])}
  run = dict(top_p=0.7, top_k=3)
  fast = from_params(cfg, params, Execution(**run))
  dense = from_params(cfg, params, Execution.everywhere("dense", layout="stacked", **run))
  assert fast.execution.decode_dispatch == "routed_cond" and fast.execution.layout == "unstacked"
  step = jax.jit(lambda m, t, c: m(t, cache=c))
  logits = []
  for model in (fast, dense):
    cache = KVCache.for_model(model, 2, 16)
    out = step(model, tokens[:, :6], cache)  # prefill
    steps, routes = [out.logits], [out.router]
    for i in range(6, 9):  # decode
      out = step(model, tokens[:, i:i + 1], out.cache)
      steps.append(out.logits)
      routes.append(out.router)
    logits.append(jnp.concatenate(steps, axis=1))
  assert rel_err(logits[0], logits[1]) <= TOL
  count = moe_metrics(routes[0])["experts_per_token"]  # [L] of the prefill
  assert count.shape == (cfg.num_layers,) and bool(jnp.all((count > 1.1) & (count < 2.9))), count
  assert set(used(jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), routes[0])).tolist()) == {1, 2, 3}
  prompts = np.asarray(tokens[:, :5]).tolist()
  np.testing.assert_array_equal(sampling.generate(fast, prompts, 4), sampling.generate(dense, prompts, 4))


def test_bad_overrides_are_one_line_config_errors():
  for fields, match in (({"top_k": -1}, r"config.run.top_k must be a non-negative integer"),
                        ({"top_k": 1.5}, r"config.run.top_k must be a non-negative integer"),
                        ({"top_p": 1.5}, r"config.run.top_p must be in \[0, 1\]"),
                        ({"top_p": -0.1}, r"config.run.top_p must be in \[0, 1\]")):
    with pytest.raises(ConfigError, match=match):
      execution_from(fields)
  for name in ("expert_choice", "hash", "sinkhorn", "aux_free_bias", "noisy_topk"):
    for run, field in ((Execution(top_k=1), "config.run.top_k=1"), (Execution(top_p=0.5), "config.run.top_p=0.5")):
      with pytest.raises(ConfigError, match=rf"^{field} re-selects .*router={name!r} is not; .*mixtral_topk") as e:
        abstract_model(tiny_config(router=name), run)  # raised when the model is built, before tracing
      assert "\n" not in str(e.value)
  assert routing_override_error("top_p", 0, 0.0, 7) is None and routing_override_error("hash", 0, 0.0, 7) is None
  abstract_model(tiny_config(router="topk"), Execution(top_k=7, top_p=1.0))  # the limits themselves are fine


def test_eval_and_generate_configs_carry_the_override():
  """--config.run.top_k=1 / --config.run.top_p=0.5 reach the model the eval and generate modes load."""
  from configs import eval as eval_config, generate as generate_config
  from mixtral_jax.inference.generate import load_for_inference
  for module, field, value in ((eval_config, "top_k", 1), (generate_config, "top_p", 0.5)):
    config = module.get_config()
    config.model.update(dict(vocab_size=257, dim=40, num_layers=1, num_heads=5, num_kv_heads=1, head_dim=12,
                             ffn_dim=36, num_experts=7))
    config.run[field] = value
    model = load_for_inference(config)  # no checkpoint: random weights for config.model
    assert getattr(model.execution, field) == value
