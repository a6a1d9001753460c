"""Dispatch strategies: the contract every registered strategy keeps (equal to dense, values and
gradients, when nothing drops), GShard capacity semantics, row-permutation identities (hypothesis), and
the model end to end with each strategy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err, tiny_config
from mixtral_jax.moe.dispatch import all_dispatchers, expert_capacity, run_rows, slot_ranks
from mixtral_jax.moe.dispatch_decode import ExpertList
from mixtral_jax.execution import Execution
from mixtral_jax.moe.grouped import block_layout, default_block_size, take_rows
from mixtral_jax.model import build, with_execution
from mixtral_jax.moe.routers import ROUTERS, RouterOutput, top_p_gates, topk_gates

N, D, F, E = 29, 12, 18, 5
TOL = 1e-5  # float32; strategies differ only in summation order (observed ~3e-7)
DISPATCHERS = all_dispatchers()  # every registered strategy: dispatch.py's, inference's, expert-parallel's


def weights(seed=0):
  k1, k3, k2, kx = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (N, D)), 0.3 * jax.random.normal(k1, (E, D, F)),
          0.3 * jax.random.normal(k3, (E, D, F)), 0.3 * jax.random.normal(k2, (E, F, D)))


def dispatch(name, x, route, w1, w3, w2, top_k=2, capacity_factor=None, dtype=jnp.float32, **options):
  """A strategy called as MoEBlock calls it (every tuning keyword; `options` override them)."""
  kwargs = dict(dtype=dtype, top_k=top_k, grouped_matmul="blocks", loop_block=128,
                capacity_factor=E / top_k if capacity_factor is None else capacity_factor)  # default: capacity N
  kwargs.update(options)
  return DISPATCHERS.get(name)(x, route, w1, w3, w2, **kwargs)


# Settings run through the contract besides each strategy's defaults: dropless' padded blocks,
# ragged_dot and the loop of row tiles (gmm.py), and sorted_loop's loop over whole 4-row blocks (its default block holds all 58 slots).
VARIANTS = {"dropless": [dict(block_size=8), dict(grouped_matmul="ragged_dot"), dict(grouped_matmul="loop")],
            "sorted_loop": [dict(loop_block=4)]}
CASES = [(name, {}) for name in DISPATCHERS.names()] + [(n, o) for n, opts in VARIANTS.items() for o in opts]


def test_every_strategy_module_is_registered():
  """all_dispatchers() holds the inference and expert-parallel strategies too (the contract below runs
  over whatever it lists, so a module it failed to import would silently leave the contract)."""
  assert {"dense", "capacity", "dropless", "routed_cond", "sorted_loop", "ep_capacity",
          "ep_dropless"} <= set(DISPATCHERS.names())
  assert set(VARIANTS) <= set(DISPATCHERS.names())


TOP_P = dict(threshold=0.8, max_k=3)  # on these logits tokens use 1, 2 or 3 experts (test_top_p_routes_vary)


def _route_fn(router, x):
  """logits [N, E] -> RouterOutput, differentiable in the logits."""
  if router == "expert_choice":  # E slots per token, most unused: exercises skipping weight-0 slots
    out = ROUTERS.get(router)(D, E, 2, rngs=nnx.Rngs(0))(x)
    return lambda logits: out.replace(weights=jnp.where(out.weights > 0, jax.nn.softmax(logits, -1), 0.0))
  if router == "top_p":  # adaptive: a variable number of used slots per token, the rest weight 0
    return lambda logits: top_p_gates(logits, TOP_P["threshold"], TOP_P["max_k"], renormalize=True)
  return lambda logits: topk_gates(logits, 2, renormalize=router == "mixtral_topk")


def _logits():
  return 2.0 * jax.random.normal(jax.random.key(5), (N, E))


def test_top_p_routes_vary():
  """The contract's top-p routes really are adaptive (else router="top_p" would test top-k again)."""
  counts = np.asarray(_route_fn("top_p", None)(_logits()).weights != 0).sum(-1)
  assert set(counts.tolist()) == {1, 2, 3}


def _value_and_grads(name, options, router):
  x, w1, w3, w2 = weights()
  logits = _logits()
  route_of = _route_fn(router, x)
  if router == "top_p":  # the slots per token the block passes (capacity N still: E / top_k below)
    options = {"top_k": TOP_P["max_k"], **options}

  def f(x, logits, w1, w3, w2):
    y, stats = dispatch(name, x, route_of(logits), w1, w3, w2, **options)
    return jnp.sum(jnp.sin(y)), (y, stats)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, logits, w1, w3, w2)


@functools.lru_cache(maxsize=None)
def _dense_reference(router):
  return _value_and_grads("dense", {}, router)


@pytest.mark.parametrize("router", ["mixtral_topk", "expert_choice", "top_p"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
def test_dispatcher_contract(name, options, router):
  """Every registered strategy (the ep_* ones as one shard, without a mesh), jitted: y [N, D] in the
  compute dtype and the common stats; finite gradients wrt x, router logits and expert weights; and,
  with nothing dropped (capacity strategies get capacity N), outputs and all gradients equal dense.
  Routes: top-2, expert choice (E slots, most unused) and top-p (1 to 3 used slots per token)."""
  (_, (y, stats)), grads = _value_and_grads(name, options, router)
  (_, (ref, _)), ref_grads = _dense_reference(router)
  assert y.shape == (N, D) and y.dtype == jnp.float32
  assert set(stats) == {"dropped_fraction", "dropped_tokens"}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in stats.values())
  assert float(stats["dropped_fraction"]) == 0.0 and float(stats["dropped_tokens"]) == 0.0
  assert rel_err(y, ref) <= TOL
  for what, g, r in zip(("x", "logits", "w1", "w3", "w2"), grads, ref_grads):
    assert g.shape == r.shape and bool(jnp.all(jnp.isfinite(g))), what
    assert rel_err(g, r) <= TOL, what


def test_sorted_loop_gradient_equals_dense_on_expert_lists():
  """sorted_loop's backward (dropless' VJP: its loop has data-dependent trip counts) gives dense's
  gradients with per-expert buffers too (ExpertList, the unstacked layout's weights): one gradient
  buffer per expert, each equal to dense's slice. (Stacked weights: test_dispatcher_contract.)"""
  (_, _), ref = _dense_reference("mixtral_topk")
  x, w1, w3, w2 = weights()
  logits = 2.0 * jax.random.normal(jax.random.key(5), (N, E))  # as _value_and_grads

  def f(x, logits, w1, w3, w2):
    y, _ = dispatch("sorted_loop", x, topk_gates(logits, 2, renormalize=True), w1, w3, w2, loop_block=4)
    return jnp.sum(jnp.sin(y))
  lists = [ExpertList(tuple(w[j] for j in range(E))) for w in (w1, w3, w2)]
  got = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(x, logits, *lists)
  for what, g, r in zip(("x", "logits", "w1", "w3", "w2"), got, ref):
    if what.startswith("w"):
      assert isinstance(g, ExpertList) and len(g.parts) == E, what
      g = jnp.stack(g.parts)
    assert g.shape == r.shape and rel_err(g, r) <= 1e-5, what


def gshard_reference(experts, used, priority, num_experts, capacity):
  """The sequential rule GShard/Switch/flaxformer describe: first choices of all tokens claim buffer
  rows before any second choice; within a choice, tokens go in order (or by descending priority)."""
  n, k = experts.shape
  order = np.arange(n) if priority is None else np.argsort(-np.asarray(priority), kind="stable")
  fill = np.zeros(num_experts, int)
  kept = np.zeros((n, k), bool)
  for j in range(k):
    for t in order:
      e = experts[t, j]
      if used[t, j] and fill[e] < capacity:
        kept[t, j] = True
        fill[e] += 1
  return kept


ranks = jax.jit(slot_ranks, static_argnums=2)  # one compile per shape, not one per primitive


@given(n=st.sampled_from([1, 17]), num_experts=st.sampled_from([3, 5]), top_k=st.sampled_from([1, 2]),
       cf=st.sampled_from([0.3, 1.0, 1.5]), prioritized=st.booleans(), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_capacity_matches_gshard_and_is_never_exceeded(n, num_experts, top_k, cf, prioritized, seed):
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(n)]).astype(np.int32)
  if rng.random() < 0.5:  # skew towards expert 0 so that capacity binds
    experts[:, 0] = np.where(rng.random(n) < 0.7, 0, experts[:, 0])
    experts[:, 1:] = np.where(experts[:, 1:] == 0, (experts[:, :1] + 1) % num_experts, experts[:, 1:])
  used = rng.random((n, top_k)) < 0.9
  priority = rng.random(n).astype(np.float32) if prioritized else None
  cap = expert_capacity(n, num_experts, top_k, cf)
  rank, counts = ranks(jnp.asarray(experts), jnp.asarray(used), num_experts,
                       None if priority is None else jnp.asarray(priority))
  kept = np.asarray(used & (np.asarray(rank) < cap))
  np.testing.assert_array_equal(kept, gshard_reference(experts, used, priority, num_experts, cap))
  per_expert = np.bincount(experts[kept], minlength=num_experts)
  assert per_expert.max(initial=0) <= cap
  np.testing.assert_array_equal(counts, np.bincount(experts[used], minlength=num_experts))
  # Ranks are distinct within an expert: every kept slot has its own buffer row.
  rows = (experts * cap + np.asarray(rank))[kept]
  assert len(set(rows.tolist())) == len(rows)


def test_capacity_drops_pass_through_as_zero():
  """Dropped slots contribute nothing: capacity output = dense output with dropped weights zeroed."""
  x, w1, w3, w2 = weights(1)
  logits = jax.random.normal(jax.random.key(2), (N, E)).at[:, 0].add(3.0)  # overload expert 0
  route = topk_gates(logits, 2, renormalize=True)
  y, stats = dispatch("capacity", x, route, w1, w3, w2, capacity_factor=1.0)
  cap = expert_capacity(N, E, 2, 1.0)
  rank, _ = slot_ranks(route.experts, route.weights != 0, E)
  kept = rank < cap
  ref, _ = dispatch("dense", x, route.replace(weights=jnp.where(kept, route.weights, 0.0)), w1, w3, w2)
  assert rel_err(y, ref) <= TOL
  dropped = ~np.asarray(kept)
  assert dropped.any()
  np.testing.assert_allclose(stats["dropped_fraction"], dropped.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats["dropped_tokens"], dropped.all(-1).sum())
  lost = dropped.all(-1)
  np.testing.assert_allclose(np.asarray(y)[lost], 0.0)  # only the residual remains for these tokens


@jax.jit
def _identity_round_trip(experts, w, x):
  """Dropless block layout of 5 experts in blocks of 4; identity experts."""
  rank, counts = slot_ranks(experts, w != 0, 5)
  starts, block_expert, nb = block_layout(counts, experts.size, 4)
  slot_row = jnp.where(w != 0, starts[experts] + rank, nb * 4)
  return run_rows(x, w, slot_row, nb * 4, lambda rows: rows, jnp.float32), slot_row, block_expert


@given(top_k=st.sampled_from([1, 2]), skew=st.booleans(), seed=st.integers(0, 10 ** 6))
@settings(max_examples=20, deadline=None)
def test_dispatch_then_combine_is_identity_when_nothing_drops(top_k, skew, seed):
  """Rows out and back with identity experts give y = sum_k w_k x; every row lands in a block of its
  expert, inside the static layout, whatever the loads (here up to all 13 tokens on one expert)."""
  rng = np.random.default_rng(seed)
  n = 13
  experts = np.stack([rng.permutation(5)[:top_k] for _ in range(n)])
  if skew:  # expert 0 among every token's choices: one expert takes all 13 tokens
    for row in experts:
      if 0 not in row:
        row[0] = 0
  w = rng.random((n, top_k)) * (rng.random((n, top_k)) < 0.8)  # some unused (weight 0) slots
  x = rng.standard_normal((n, 3))
  y, slot_row, block_expert = _identity_round_trip(jnp.asarray(experts, jnp.int32), jnp.asarray(w, jnp.float32),
                                                   jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, np.sum(w, -1, keepdims=True) * x, rtol=1e-5, atol=1e-6)
  used = w != 0
  rows = np.asarray(slot_row)[used]
  assert len(set(rows.tolist())) == len(rows) and rows.max(initial=0) < len(block_expert) * 4
  np.testing.assert_array_equal(np.asarray(block_expert)[rows // 4], experts[used])


def test_take_rows_backward_is_the_inverse_gather():
  src = jax.random.normal(jax.random.key(0), (4, 3))
  index = jnp.asarray([2, 4, 0, 2, 3], jnp.int32)  # row 1 reads nothing (4 = empty); src row 2 read twice
  readers = jnp.asarray([[2, 5], [5, 5], [0, 3], [4, 5]], jnp.int32)  # 5 = no reader
  out, vjp = jax.vjp(lambda s: take_rows(s, index, readers), src)
  ref_out, ref_vjp = jax.vjp(lambda s: jnp.take(s, index, axis=0, mode="fill", fill_value=0), src)
  cot = jax.random.normal(jax.random.key(1), out.shape)
  np.testing.assert_allclose(out, ref_out)
  np.testing.assert_allclose(vjp(cot)[0], ref_vjp(cot)[0], rtol=1e-6)


def test_default_block_size():
  assert default_block_size(8192, 8) == 256  # the benchmark size
  assert default_block_size(4, 8) == 1 and default_block_size(10 ** 7, 8) == 256


@pytest.mark.parametrize("skew", [0.0, 4.0])
def test_dropless_buffers_and_blocks_branches_are_exact(skew):
  """With 8-row blocks the CPU path chooses at run time between per-expert buffers (balanced load) and
  padded blocks (an expert overflows the buffer); both equal dense, values and gradients."""
  x, w1, w3, w2 = weights(6)
  logits = 0.1 * jax.random.normal(jax.random.key(7), (N, E)) + jnp.zeros(E).at[0].set(skew)
  if skew == 0:  # round robin: token n prefers experts n and n + 1 (mod E)
    logits = logits + jnp.asarray(2 * np.eye(E)[np.arange(N) % E] + np.eye(E)[(np.arange(N) + 1) % E])
  counts = np.bincount(np.asarray(topk_gates(logits, 2, renormalize=True).experts).ravel(), minlength=E)
  cap = int(np.ceil(1.125 * N * 2 / E))
  assert (counts.max() <= cap) == (skew == 0)  # which branch runs

  def f(name, options):
    def loss(x, logits, w1, w3, w2):
      y = dispatch(name, x, topk_gates(logits, 2, renormalize=True), w1, w3, w2, **options)[0]  # [N, D]
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, logits, w1, w3, w2)

  # Compare the [N, D] outputs, not the summed loss: a sum of sines cancels, so its relative error
  # measures the cancellation more than the strategies.
  ((_, ref), ref_grads), ((_, got), grads) = f("dense", {}), f("dropless", dict(block_size=8))
  assert rel_err(got, ref) <= TOL
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) <= TOL


def test_unknown_grouped_matmul_names_the_field():
  from mixtral_jax.config import ConfigError
  with pytest.raises(ConfigError, match="config.run.grouped_matmul='cuda'"):
    Execution().replace(grouped_matmul="cuda")
  with pytest.raises(ConfigError, match="config.run.prefill_dispatch='bogus' is unknown"):
    Execution().replace(prefill_dispatch="bogus")


@pytest.mark.parametrize("name", DISPATCHERS.names())
def test_bfloat16_dispatch_close_to_float32(name):
  """Every strategy computes in the dtype it is given: bfloat16 outputs within 2e-2 of float32 dense."""
  x, w1, w3, w2 = weights(3)
  route = topk_gates(jax.random.normal(jax.random.key(4), (N, E)), 2, renormalize=True)
  ref, _ = dispatch("dense", x, route, w1, w3, w2)
  y, _ = jax.jit(lambda *a: dispatch(name, *a, dtype=jnp.bfloat16))(x, route, w1, w3, w2)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y.astype(jnp.float32), ref) <= 2e-2  # 8 mantissa bits


@pytest.mark.parametrize("name", ["capacity", "dropless"])
def test_model_with_dispatch_equals_dense_model(name):
  """A whole model: logits with capacity (large enough not to drop) / dropless equal dense dispatch on
  the same weights; the per-layer stats say nothing was dropped."""
  cfg = tiny_config()
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  reference = build(cfg, seed=4, execution=Execution.everywhere("dense", layout="stacked"))
  dense = jax.jit(lambda m, t: m(t).logits)(reference, tokens)
  run = Execution.everywhere(name, layout="stacked", capacity_factor=cfg.num_experts / cfg.top_k)
  other = with_execution(reference, run)
  assert other.execution.prefill_dispatch == name and reference.execution.prefill_dispatch == "dense"
  out = jax.jit(lambda m, t: m(t))(other, tokens)
  assert rel_err(out.logits, dense) <= TOL
  assert out.moe_stats["dropped_fraction"].shape == (cfg.num_layers,)
  np.testing.assert_array_equal(out.moe_stats["dropped_fraction"], 0.0)


def test_route_without_priority_field_is_token_order():
  route = RouterOutput(logits=jnp.zeros((3, 2)), probs=jnp.full((3, 2), 0.5),
                       experts=jnp.zeros((3, 1), jnp.int32), weights=jnp.ones((3, 1)))
  rank, _ = slot_ranks(route.experts, route.weights != 0, 2, route.priority)
  np.testing.assert_array_equal(rank[:, 0], [0, 1, 2])
  rank, _ = slot_ranks(route.experts, route.weights != 0, 2, jnp.asarray([0.1, 0.9, 0.5]))
  np.testing.assert_array_equal(rank[:, 0], [2, 0, 1])
