"""Balancing losses: HF equality, values at perfect balance (as documented), masks, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.moe.losses import LOSSES, cv_squared, load_balancing, seq_aux
from mixtral_jax.moe.routers import RouterOutput, topk_gates

L, B, T = 3, 2, 11


def route_from_logits(logits, top_k, renormalize=True):
  flat = topk_gates(logits.reshape(-1, logits.shape[-1]), top_k, renormalize=renormalize)
  return jax.tree.map(lambda a: a.reshape(*logits.shape[:-1], *a.shape[1:]), flat)


def balanced_route(num_experts, top_k):
  """Perfect balance: uniform probabilities, every expert chosen equally often in each sequence."""
  t = num_experts * 2
  experts = (np.arange(t)[:, None] + np.arange(top_k)[None] * (num_experts // top_k)) % num_experts
  experts = jnp.broadcast_to(jnp.asarray(experts, jnp.int32), (L, B, t, top_k))
  return RouterOutput(logits=jnp.zeros((L, B, t, num_experts)), probs=jnp.full((L, B, t, num_experts), 1 / num_experts),
                      experts=experts, weights=jnp.full((L, B, t, top_k), 1 / top_k))


@pytest.mark.parametrize("num_experts,top_k,masked", [(7, 2, False), (7, 2, True), (5, 1, True), (8, 3, False)])
def test_load_balancing_equals_transformers(num_experts, top_k, masked):
  """Same router logits -> HF's load_balancing_loss_func to 1e-6 (all layers pooled, padding excluded)."""
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  rng = np.random.default_rng(num_experts + top_k)
  logits = 2.0 * rng.standard_normal((L, B, T, num_experts)).astype(np.float32)
  mask = np.ones((B, T), np.int64)
  if masked:
    mask[0, :4] = 0  # left padding
    mask[1, -3:] = 0  # right padding
  expected = load_balancing_loss_func(tuple(torch.as_tensor(layer.reshape(B * T, -1)) for layer in logits),
                                      num_experts, top_k, torch.as_tensor(mask) if masked else None)
  route = route_from_logits(jnp.asarray(logits), top_k)
  got = jax.jit(lambda r, m: load_balancing(r, mask=m, num_experts=num_experts, top_k=top_k))(
      route, jnp.asarray(mask) if masked else None)
  assert abs(float(got) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))


# The value of each loss at perfect balance; README and losses.py document the same table.
AT_BALANCE = {"load_balancing": lambda e, k: k, "z_loss": lambda e, k: np.log(e) ** 2,
              "importance_cv2": lambda e, k: 0.0, "load_cv2": lambda e, k: 0.0, "seq_aux": lambda e, k: 1.0,
              "dynamic_entropy": lambda e, k: np.log(e)}
BALANCING = sorted(set(AT_BALANCE) - {"dynamic_entropy"})  # dynamic_entropy rewards confidence instead


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (6, 3), (4, 1)])
def test_values_at_perfect_balance(num_experts, top_k):
  assert set(AT_BALANCE) == set(LOSSES.names())
  route = balanced_route(num_experts, top_k)
  for name, value in AT_BALANCE.items():
    got = LOSSES.get(name)(route, mask=None, num_experts=num_experts, top_k=top_k)
    np.testing.assert_allclose(float(got), value(num_experts, top_k), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", BALANCING)
def test_losses_grow_with_imbalance_and_have_gradients(name):
  """A router preferring expert 0 scores worse than a uniform one (z-loss: larger logits); finite grads."""
  e, k = 7, 2
  base = jax.random.normal(jax.random.key(0), (L, B, T, e))
  mask = jnp.ones((B, T)).at[1, :3].set(0)
  fn = lambda logits: LOSSES.get(name)(route_from_logits(logits, k), mask=mask, num_experts=e, top_k=k)  # noqa: E731
  skewed = base.at[..., 0].add(4.0)
  assert float(fn(skewed)) > float(fn(0.1 * base))
  grad = jax.jit(jax.grad(fn))(base)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0


def test_padding_is_ignored():
  """Changing routing at padded positions changes no loss."""
  e, k = 5, 2
  logits = jax.random.normal(jax.random.key(1), (L, B, T, e))
  mask = jnp.ones((B, T)).at[0, -4:].set(0)
  other = logits.at[:, 0, -4:].set(9.0 * jax.random.normal(jax.random.key(2), (L, 4, e)))
  for name in LOSSES.names():
    a = LOSSES.get(name)(route_from_logits(logits, k), mask=mask, num_experts=e, top_k=k)
    b = LOSSES.get(name)(route_from_logits(other, k), mask=mask, num_experts=e, top_k=k)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6, err_msg=name)


def test_z_loss_value():
  logits = jax.random.normal(jax.random.key(3), (L, B, T, 4))
  expected = jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
  np.testing.assert_allclose(LOSSES.get("z_loss")(route_from_logits(logits, 2), num_experts=4, top_k=2),
                             expected, rtol=1e-6)


def test_cv_squared_and_shazeer_losses_by_hand():
  np.testing.assert_allclose(cv_squared(jnp.asarray([1.0, 3.0])), 0.25)  # var 1, mean 2
  route = RouterOutput(logits=jnp.zeros((1, 1, 2, 2)), probs=jnp.asarray([[[[0.9, 0.1], [0.5, 0.5]]]]),
                       experts=jnp.asarray([[[[0], [1]]]], jnp.int32), weights=jnp.asarray([[[[1.0], [3.0]]]]))
  # Importance = gates summed over tokens = [1, 3]; load falls back to summed probs [1.4, 0.6].
  np.testing.assert_allclose(LOSSES.get("importance_cv2")(route, num_experts=2), 0.25, rtol=1e-6)
  np.testing.assert_allclose(LOSSES.get("load_cv2")(route, num_experts=2), 0.16, rtol=1e-5)
  noisy = route.replace(load_probs=jnp.asarray([[[[1.0, 0.0], [1.0, 0.0]]]]))
  np.testing.assert_allclose(LOSSES.get("load_cv2")(noisy, num_experts=2), 1.0, rtol=1e-6)


def test_seq_aux_is_per_sequence():
  """Two sequences each using one expert only (globally balanced) still pay the sequence-wise loss."""
  e, k, t = 2, 1, 4
  experts = jnp.asarray([[[[0]] * t, [[1]] * t]], jnp.int32)  # [1, 2, t, 1]
  probs = jnp.asarray([[[[1.0, 0.0]] * t, [[0.0, 1.0]] * t]])
  route = RouterOutput(logits=jnp.zeros((1, 2, t, e)), probs=probs, experts=experts, weights=jnp.ones((1, 2, t, 1)))
  np.testing.assert_allclose(seq_aux(route, num_experts=e, top_k=k), 2.0)  # f = [2, 0], P = [1, 0]
  pooled = jax.tree.map(lambda a: a.reshape(1, 1, 2 * t, *a.shape[3:]), route)
  np.testing.assert_allclose(seq_aux(pooled, num_experts=e, top_k=k), 1.0)  # one sequence: balanced


def test_dynamic_entropy_by_hand_and_falls_as_the_router_gets_confident():
  """Huang et al. 2024's dynamic loss: mean entropy of router.probs over real tokens and layers; lower
  for a confident router (top-p then needs fewer experts), with finite gradients even at p = 0."""
  probs = jnp.asarray([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]]])
  route = RouterOutput(logits=jnp.log(probs), probs=probs, experts=jnp.zeros((1, 2, 2, 1), jnp.int32),
                       weights=jnp.ones((1, 2, 2, 1)))
  entropies = [np.log(2), 0.0, 1.5 * np.log(2), np.log(3)]  # [B=2, T=2] in nats
  np.testing.assert_allclose(LOSSES.get("dynamic_entropy")(route, num_experts=3, top_k=1), np.mean(entropies),
                             rtol=1e-6)
  mask = jnp.asarray([[1, 0], [0, 1]])
  np.testing.assert_allclose(LOSSES.get("dynamic_entropy")(route, mask=mask, num_experts=3, top_k=1),
                             (np.log(2) + np.log(3)) / 2, rtol=1e-6)
  grad = jax.grad(lambda p: LOSSES.get("dynamic_entropy")(route.replace(probs=p), num_experts=3, top_k=1))(probs)
  assert bool(jnp.all(jnp.isfinite(grad)))
  base = jax.random.normal(jax.random.key(4), (L, B, T, 7))
  fn = jax.jit(lambda logits: LOSSES.get("dynamic_entropy")(route_from_logits(logits, 2), num_experts=7, top_k=2))
  assert float(fn(4.0 * base)) < float(fn(base)) < float(fn(0.1 * base)) < np.log(7)
  grad = jax.grad(fn)(base)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0
