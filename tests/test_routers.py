"""Routers: every registered router's contract, then each router's own rule (paper semantics)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from mixtral_jax.config import ConfigError
from mixtral_jax.execution import Execution
from mixtral_jax.model import STACKED, KVCache, build, from_params, params_of, state_of
from mixtral_jax.moe.routers import ROUTERS, RouterOutput, sinkhorn_log, topk_gates
from mixtral_jax.moe.routers_extra import RouterBias, aux_free_bias_update, hash_experts, update_aux_free_bias

D, E, N = 11, 7, 13  # distinct odd sizes
SUM_TO_ONE = {"mixtral_topk", "noisy_topk", "hash", "aux_free_bias", "top_p"}  # routers that promise it
AT_MOST_ONE = {"topk", "switch", "sinkhorn", "expert_choice"}


def make(name, top_k=2, param_dtype=jnp.float32, **options):
  top_k = 1 if name == "switch" else top_k
  return ROUTERS.get(name)(D, E, top_k, param_dtype=param_dtype, rngs=nnx.Rngs(0), **options)


def inputs(dtype=jnp.float32, n=N, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, D)).astype(dtype)
  ids = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 1000)
  return x, ids


def test_registry_lists_all_routers():
  assert set(SUM_TO_ONE | AT_MOST_ONE) == set(ROUTERS.names())


@pytest.mark.parametrize("name", ROUTERS.names())
@pytest.mark.parametrize("train", [False, True])
def test_router_contract(name, train):
  """Shapes, dtypes, valid experts, weights >= 0 (summing to 1 where promised), jit-able."""
  router = make(name)
  x, ids = inputs()
  out = nnx.jit(lambda r, x, ids, key: r(x, token_ids=ids, train=train, key=key))(router, x, ids, jax.random.key(3))
  slots = E if name == "expert_choice" else router.top_k
  assert out.logits.shape == out.probs.shape == (N, E)
  assert out.experts.shape == out.weights.shape == (N, slots)
  assert out.experts.dtype == jnp.int32 and out.weights.dtype == jnp.float32
  assert out.logits.dtype == out.probs.dtype == jnp.float32
  assert bool(jnp.all((out.experts >= 0) & (out.experts < E)))
  assert bool(jnp.all(out.weights >= 0))
  np.testing.assert_allclose(jnp.sum(out.probs, -1), 1.0, atol=1e-6)
  total = jnp.sum(out.weights, -1)
  if name in SUM_TO_ONE:
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
  else:
    assert bool(jnp.all(total <= 1.0 + 1e-6))
  if name != "expert_choice":  # token-choice routers pick distinct experts per token
    assert all(len(set(row)) == slots for row in np.asarray(out.experts).tolist())


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_grad_and_float32_under_bf16(name):
  """Router math is float32 with bfloat16 parameters and inputs; gradients reach the gate parameters."""
  router = make(name, param_dtype=jnp.bfloat16)
  x, ids = inputs(jnp.bfloat16)
  target = jax.random.normal(jax.random.key(9), (N, E))

  def loss(r):
    out = r(x, token_ids=ids, train=True, key=jax.random.key(4))
    combine = jnp.einsum("nke,nk->ne", jax.nn.one_hot(out.experts, E), out.weights)
    assert out.logits.dtype == out.probs.dtype == out.weights.dtype == jnp.float32
    return jnp.sum(combine * target) + jnp.mean(out.logits ** 2)

  grads = nnx.grad(loss)(router)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  if name == "hash":
    assert leaves == []  # nothing to learn
  else:
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0 for g in leaves)


def test_mixtral_topk_is_softmax_over_topk_logits():
  router = make("mixtral_topk")
  x, _ = inputs()
  out = router(x)
  top_logits, experts = jax.lax.top_k(out.logits, 2)
  np.testing.assert_array_equal(out.experts, experts)
  np.testing.assert_allclose(out.weights, jax.nn.softmax(top_logits, -1), rtol=1e-6)


def test_topk_is_not_renormalised_and_batch_priority():
  x, _ = inputs()
  out = make("topk")(x)
  np.testing.assert_allclose(out.weights, jnp.take_along_axis(out.probs, out.experts, -1), rtol=1e-7)
  assert out.priority is None
  bpr = make("topk", batch_prioritized=True)(x)
  np.testing.assert_allclose(bpr.priority, jnp.max(bpr.probs, -1), rtol=1e-7)


def test_switch_requires_top1():
  with pytest.raises(ConfigError, match="router='switch'.*top_k=1"):
    tiny_config(router="switch", top_k=2)
  out = make("switch")(inputs()[0])
  np.testing.assert_allclose(out.weights[:, 0], jnp.max(out.probs, -1), rtol=1e-7)


def test_top_p_router_is_adaptive():
  """Fewer experts for confident tokens: each token's kept prefix is the shortest reaching the threshold
  (details: tests/test_adaptive_routing.py)."""
  router = make("top_p", top_k=E, threshold=0.5)
  router.kernel[...] = 10.0 * router.kernel[...]  # peaked probabilities: counts vary
  out = router(inputs(n=40)[0])
  counts = np.asarray(out.weights != 0).sum(-1)
  assert counts.min() == 1 and counts.max() > 1
  top = np.take_along_axis(np.asarray(out.probs), np.asarray(out.experts), -1)
  np.testing.assert_array_less(np.cumsum(top, -1)[np.arange(40), counts - 2][counts > 1], 0.5)


def test_unknown_router_option_names_the_field():
  with pytest.raises(ConfigError, match="router_options has unknown option.*bogus.*'topk'"):
    tiny_config(router="topk", router_options=(("bogus", 1),))
  with pytest.raises(ConfigError, match="router_options.score='relu'"):
    tiny_config(router="aux_free_bias", router_options=(("score", "relu"),))


def test_noisy_topk_noise_only_in_training():
  router = make("noisy_topk")
  x, _ = inputs()
  clean = router(x)
  np.testing.assert_allclose(clean.logits, router.logits(x))  # eval: no noise, key ignored
  np.testing.assert_array_equal(router(x, key=jax.random.key(1)).experts, clean.experts)
  a = router(x, train=True, key=jax.random.key(1))
  b = router(x, train=True, key=jax.random.key(1))
  c = router(x, train=True, key=jax.random.key(2))
  np.testing.assert_array_equal(a.logits, b.logits)
  assert not np.allclose(a.logits, c.logits)
  # The initial noise scale is softplus(0) + 0.01 (W_noise starts at zero).
  np.testing.assert_allclose(jnp.std(a.logits - clean.logits), np.log(2) + 0.01, rtol=0.2)
  assert bool(jnp.all((a.load_probs >= 0) & (a.load_probs <= 1)))
  with pytest.raises(ValueError, match="noisy_topk.*needs a PRNG key"):
    router(x, train=True)


def test_noisy_topk_load_estimator_matches_monte_carlo():
  """Shazeer's P(x, e): probability that e stays in the top-k when only its own noise is resampled."""
  router = make("noisy_topk")
  x, _ = inputs(n=3)
  out = router(x, train=True, key=jax.random.key(0))
  clean = router.logits(x)
  std = jax.nn.softplus(x @ router.noise_kernel[...]) + 0.01
  draws = jax.random.normal(jax.random.key(1), (20000, 3, E))
  for e in range(E):
    resampled = out.logits.at[:, e].set(0.0)[None] + 0.0 * draws
    resampled = resampled.at[:, :, e].set(clean[:, e] + draws[:, :, e] * std[:, e])
    in_top = jnp.mean(jnp.any(jax.lax.top_k(resampled, 2)[1] == e, axis=-1), axis=0)
    np.testing.assert_allclose(out.load_probs[:, e], in_top, atol=0.015)  # 3 sigma of 20000 draws


@given(n=st.sampled_from([3, 8, 21, 40]), capacity=st.sampled_from([None, 0.5, 1.0, 3.0]),
       seed=st.integers(0, 99))
@settings(max_examples=10, deadline=None)  # few distinct shapes: each new one compiles
def test_expert_choice_per_expert_counts(n, capacity, seed):
  """Every expert picks exactly C = ceil(c N / E) distinct tokens, the ones it rates highest."""
  router = make("expert_choice", capacity_factor=capacity)
  x, _ = inputs(n=n, seed=seed)
  out = router(x)
  c = max(1, min(n, int(np.ceil((capacity or 2) * n / E))))
  assert router.expert_capacity(n) == c
  chosen = np.asarray(out.weights > 0)  # [N, E]
  np.testing.assert_array_equal(chosen.sum(0), c)
  probs = np.asarray(out.probs)
  for e in range(E):  # the chosen tokens are the top-C by probability
    assert probs[chosen[:, e], e].min() >= probs[~chosen[:, e], e].max(initial=-1)
  np.testing.assert_allclose(np.asarray(out.weights)[chosen], probs[chosen])


def test_expert_choice_refuses_kv_cache_decoding():
  cfg = tiny_config(router="expert_choice")
  model = build(cfg)
  tokens = jnp.ones((1, 4), jnp.int32)  # whole sequences are fine: see test_model_trains_with_router
  with pytest.raises(ValueError, match="config.model.router='expert_choice' is not causal.*KV cache"):
    model(tokens, cache=KVCache.init(cfg, batch=1, size=8))


def test_sinkhorn_balances_in_training_only():
  router = make("sinkhorn")
  x, _ = inputs(n=140)
  skew = jnp.zeros((D, E)).at[:, 0].set(0.4)  # pushes every token towards expert 0
  router.kernel[...] = router.kernel[...] + skew
  plain = router(x)
  balanced = router(x, train=True)
  ref = topk_gates(router.logits(x), 2, renormalize=False)
  np.testing.assert_array_equal(plain.experts, ref.experts)
  load = lambda out: np.bincount(np.asarray(out.experts).ravel(), minlength=E)  # noqa: E731
  assert load(balanced).max() < load(plain).max()
  assert load(balanced).max() <= 1.3 * 140 * 2 / E
  np.testing.assert_allclose(balanced.weights, jnp.take_along_axis(balanced.probs, balanced.experts, -1))


def test_sinkhorn_log_marginals():
  logits = 3.0 * jax.random.normal(jax.random.key(0), (30, 5))
  p = jnp.exp(sinkhorn_log(logits, 50))
  np.testing.assert_allclose(p.sum(0), 30 / 5, rtol=1e-4)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-2)


def test_hash_is_deterministic_and_fixed():
  """Same id -> same experts, whatever the batch, position, input vector, call or jit; seed picks the map."""
  ids = jnp.asarray([5, 17, 5, 999, 17, 0, 31999], jnp.int32)
  router = make("hash")
  x1, _ = inputs(n=7, seed=1)
  x2, _ = inputs(n=7, seed=2)
  a = router(x1, token_ids=ids)
  b = jax.jit(lambda x, i: router(x, token_ids=i))(x2, ids[::-1])
  np.testing.assert_array_equal(a.experts, b.experts[::-1])
  np.testing.assert_array_equal(a.experts[0], a.experts[2])
  np.testing.assert_array_equal(hash_experts(ids, E, 2), a.experts)
  np.testing.assert_array_equal(hash_experts(jnp.asarray([5, 17]), E, 2), [[5, 4], [3, 2]])  # frozen map
  assert not np.array_equal(hash_experts(ids, E, 2, seed=1), a.experts)
  np.testing.assert_allclose(a.probs[jnp.arange(7)[:, None], a.experts], 0.5)
  load = np.bincount(np.asarray(hash_experts(jnp.arange(7000), E, 1)).ravel(), minlength=E)
  assert load.min() > 0.9 * 1000 and load.max() < 1.1 * 1000  # a random hash is balanced over ids
  with pytest.raises(ValueError, match="token_ids"):
    router(x1)


def test_aux_free_bias_selects_with_bias_combines_without():
  router = make("aux_free_bias")
  x, _ = inputs()
  before = router(x)
  router.bias[...] = jnp.zeros(E).at[3].set(10.0)  # expert 3 wins every selection
  after = router(x)
  assert bool(jnp.all(jnp.any(after.experts == 3, -1)))
  scores = jax.nn.sigmoid(after.logits)
  chosen = jnp.take_along_axis(scores, after.experts, -1)
  np.testing.assert_allclose(after.weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(after.probs, before.probs)  # the bias never reaches the affinities


def test_aux_free_bias_update_rule():
  experts = jnp.asarray([[[[0, 1], [0, 2], [0, 1]]]])  # [L=1, B=1, T=3, k=2]: loads 3, 2, 1, 0
  route = RouterOutput(logits=jnp.zeros((1, 1, 3, 4)), probs=jnp.full((1, 1, 3, 4), 0.25), experts=experts,
                       weights=jnp.full((1, 1, 3, 2), 0.5))
  new = aux_free_bias_update(jnp.zeros((1, 4)), route, rate=0.1)  # mean load 1.5
  np.testing.assert_allclose(new, [[-0.1, -0.1, 0.1, 0.1]])
  masked = aux_free_bias_update(jnp.zeros((1, 4)), route, rate=0.1, mask=jnp.asarray([[1, 0, 0]]))
  np.testing.assert_allclose(masked, [[-0.1, -0.1, 0.1, 0.1]])  # loads 1, 1, 0, 0 (mean 0.5)


def test_aux_free_bias_is_state_updated_outside_the_gradient():
  cfg = tiny_config(router="aux_free_bias", router_options=(("bias_rate", 0.25),))
  model = build(cfg, execution=STACKED)  # as the trainer holds it: one [L, E] bias
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)

  @nnx.jit
  def step(m, t):
    def loss(m):
      out = m(t)
      return jnp.sum(out.logits ** 2), out
    grads, out = nnx.grad(loss, has_aux=True)(m)
    update_aux_free_bias(m, out.router)
    return out.router, grads

  route, grads = step(model, tokens)
  assert not jax.tree.leaves(nnx.state(grads, RouterBias))  # not a parameter
  bias = model.layers.moe.router.bias[...]
  assert bias.shape == (cfg.num_layers, cfg.num_experts)
  np.testing.assert_allclose(bias, aux_free_bias_update(jnp.zeros_like(bias), route, rate=0.25))
  assert set(np.unique(np.asarray(bias))) <= {-0.25, 0.0, 0.25}
  # Loading parameters (e.g. converted Mixtral weights) starts the bias at zero, in either layout.
  for run in (None, STACKED):
    loaded = from_params(cfg, params_of(model), run)
    bias = state_of(loaded, RouterBias)["layers"]["moe"]["router"]["bias"]
    assert bias.shape == (cfg.num_layers, cfg.num_experts)
    np.testing.assert_array_equal(bias, 0.0)


@pytest.mark.parametrize("name,dispatch", [
    ("topk", "capacity"), ("switch", "dropless"), ("noisy_topk", "dense"), ("expert_choice", "capacity"),
    ("sinkhorn", "dropless"), ("hash", "capacity"), ("aux_free_bias", "dropless"), ("top_p", "dropless")])
def test_model_trains_with_router(name, dispatch):
  """End to end: a tiny model with each router (and some dispatch) runs forward and backward in training."""
  # Default tiny sizes: parameter init compiles per shape, so shared shapes keep the suite fast.
  cfg = tiny_config(router=name, top_k=1 if name == "switch" else 2, router_jitter=0.1, router_logits_cap=5.0)
  model = build(cfg, seed=1, execution=Execution.everywhere(dispatch, layout="stacked"))  # the trainer's layout
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, cfg.vocab_size)

  def loss(m):
    out = m(tokens, train=True, key=jax.random.key(1))
    return jnp.mean(out.logits ** 2), out

  (value, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert np.isfinite(float(value))
  assert out.router.logits.shape == (cfg.num_layers, 2, 7, cfg.num_experts)
  if name != "hash":  # hash logits are a fixed 0 / -1e4 pattern, not learned
    assert float(jnp.max(jnp.abs(out.router.logits))) < 5.0  # soft-capped
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


@pytest.mark.slow
def test_update_aux_free_bias_is_per_layer_in_every_layout():
  """The in-place helper gives each layer its own routing, stacked ([L, E] bias) or unstacked ([E] each)."""
  from mixtral_jax.model import STACKED, build, state_of
  from mixtral_jax.moe.routers_extra import update_aux_free_bias
  cfg = tiny_config(router="aux_free_bias", router_options=(("bias_rate", 0.25),))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  biases = []
  for run in (None, STACKED):
    m = build(cfg, execution=run)
    update_aux_free_bias(m, m(tokens).router)
    biases.append(np.asarray(jax.tree.leaves(state_of(m, nnx.Not(nnx.Param)))[0]))  # [L, E]
  assert biases[0].shape == (cfg.num_layers, cfg.num_experts)
  np.testing.assert_array_equal(biases[0], biases[1])
  assert len({tuple(row) for row in biases[0]}) > 1, "layers routed differently get different updates"
