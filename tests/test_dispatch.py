"""Dispatch strategies: equal outputs and gradients when nothing drops, GShard capacity semantics,
row-permutation identities (hypothesis), and the model end to end with each strategy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err, tiny_config
from mixtral_jax.dispatch import DISPATCHERS, expert_capacity, run_rows, slot_ranks
from mixtral_jax.grouped import block_layout, default_block_size, take_rows
from mixtral_jax.model import build
from mixtral_jax.routers import ROUTERS, RouterOutput, topk_gates

N, D, F, E = 29, 12, 18, 5
TOL = 1e-5  # float32; strategies differ only in summation order (observed ~3e-7)


def weights(seed=0):
  k1, k3, k2, kx = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (N, D)), 0.3 * jax.random.normal(k1, (E, D, F)),
          0.3 * jax.random.normal(k3, (E, D, F)), 0.3 * jax.random.normal(k2, (E, F, D)))


def dispatch(name, x, route, w1, w3, w2, top_k=2, capacity_factor=None, **options):
  cf = E / top_k if capacity_factor is None else capacity_factor  # default: capacity N, never drops
  return DISPATCHERS.get(name)(x, route, w1, w3, w2, dtype=jnp.float32, top_k=top_k, capacity_factor=cf,
                               **options)


STRATEGIES = [("capacity", {}), ("dropless", {}), ("dropless", dict(block_size=8)),
              ("dropless", dict(grouped_matmul="ragged_dot"))]


@pytest.mark.parametrize("router", ["mixtral_topk", "expert_choice"])
def test_strategies_equal_dense_when_nothing_drops(router):
  """Outputs and gradients (input, router logits, all expert weights) equal the dense reference."""
  x, w1, w3, w2 = weights()
  logits = 2.0 * jax.random.normal(jax.random.key(5), (N, E))
  gate = ROUTERS.get(router)(D, E, 2, rngs=__import__("flax").nnx.Rngs(0))

  def route_of(logits):
    if router == "expert_choice":  # E slots per token, most unused: exercises skipping weight-0 slots
      out = gate(x)
      return out.replace(weights=jnp.where(out.weights > 0, jax.nn.softmax(logits, -1), 0.0))
    return topk_gates(logits, 2, renormalize=router == "mixtral_topk")

  def loss(name, options):
    def f(x, logits, w1, w3, w2):
      y, stats = dispatch(name, x, route_of(logits), w1, w3, w2, capacity_factor=E / 2 if router != "expert_choice" else E, **options)
      return jnp.sum(jnp.sin(y)), (y, stats)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

  (_, (ref, _)), ref_grads = loss("dense", {})(x, logits, w1, w3, w2)
  for name, options in STRATEGIES:
    (_, (y, stats)), grads = loss(name, options)(x, logits, w1, w3, w2)
    assert float(stats["dropped_fraction"]) == 0.0
    assert rel_err(y, ref) <= TOL, (name, options)
    for g, r in zip(grads, ref_grads):
      assert rel_err(g, r) <= TOL, (name, options)


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
  with pytest.raises(ConfigError, match="config.model.grouped_matmul='cuda'"):
    tiny_config(grouped_matmul="cuda")


def test_bfloat16_dispatch_close_to_float32():
  x, w1, w3, w2 = weights(3)
  route = topk_gates(jax.random.normal(jax.random.key(4), (N, E)), 2, renormalize=True)
  ref, _ = dispatch("dense", x, route, w1, w3, w2)
  for name in ("capacity", "dropless"):
    y, _ = DISPATCHERS.get(name)(x, route, w1, w3, w2, dtype=jnp.bfloat16, top_k=2, capacity_factor=E / 2)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y.astype(jnp.float32), ref) <= 2e-2  # 8 mantissa bits


@pytest.mark.parametrize("name", ["capacity", "dropless"])
def test_model_with_dispatch_equals_dense_model(name):
  """A whole model: logits with capacity (large enough not to drop) / dropless equal dense dispatch."""
  cfg = tiny_config()
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  dense = jax.jit(lambda m, t: m(t).logits)(build(cfg, seed=4), tokens)
  other = build(cfg.replace(dispatch=name, capacity_factor=cfg.num_experts / cfg.top_k), seed=4)
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
