"""MoE metrics: definitions on hand-made routings, padding masks, and the model's own output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mixtral_jax.execution import Execution
from mixtral_jax.moe.losses import z_loss
from mixtral_jax.moe.metrics import expert_load, experts_per_token, moe_metrics
from mixtral_jax.model import build
from mixtral_jax.moe.routers import RouterOutput


def route(experts, probs=None, weights=None, num_experts=4):
  experts = jnp.asarray(experts, jnp.int32)  # [L, B, T, k]
  probs = jnp.full((*experts.shape[:3], num_experts), 1 / num_experts) if probs is None else jnp.asarray(probs)
  weights = jnp.full(experts.shape, 1 / experts.shape[-1]) if weights is None else jnp.asarray(weights)
  return RouterOutput(logits=jnp.log(probs), probs=probs, experts=experts, weights=weights)


def test_balanced_layer_and_skewed_layer():
  balanced = [[[0], [1], [2], [3]]]  # [B=1, T=4, k=1]
  skewed = [[[0], [0], [0], [1]]]
  m = moe_metrics(route([balanced, skewed]), stats={"dropped_fraction": jnp.asarray([0.0, 0.5])})
  np.testing.assert_allclose(m["expert_load"], [[0.25] * 4, [0.75, 0.25, 0, 0]])
  np.testing.assert_allclose(m["load_cv"], [0.0, np.std([0.75, 0.25, 0, 0]) / 0.25], rtol=1e-6)
  np.testing.assert_allclose(m["max_violation"], [0.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(m["dead_experts"], [0, 2])
  np.testing.assert_allclose(m["router_entropy"], [1.0, 1.0], rtol=1e-6)  # uniform probs
  np.testing.assert_allclose(m["z_loss"], [0.0, 0.0], atol=1e-6)  # log-softmax logits: logsumexp = 0
  np.testing.assert_allclose(m["dropped_fraction"], [0.0, 0.5])


def test_entropy_normalised_and_one_hot_is_zero():
  probs = np.zeros((1, 1, 2, 4))
  probs[..., 0] = 1.0
  m = moe_metrics(route([[[[0], [0]]]], probs=probs))
  np.testing.assert_allclose(m["router_entropy"], [0.0], atol=1e-6)


def test_padding_and_unused_slots_do_not_count():
  experts = [[[[0, 1], [2, 3], [3, 2]]]]  # [L=1, B=1, T=3, k=2]
  weights = [[[[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]]]  # token 1's second slot is unused
  load = expert_load(route(experts, weights=weights), mask=jnp.asarray([[1, 1, 0]]))
  np.testing.assert_allclose(load, [[1 / 3, 1 / 3, 1 / 3, 0.0]])


def test_experts_per_token_counts_used_slots_of_real_tokens():
  """Adaptive compute: slots with weight 0 are not experts used; padding does not count."""
  experts = [[[[0, 1, 2], [2, 3, 0], [3, 2, 1]]], [[[0, 1, 2], [1, 2, 3], [3, 2, 1]]]]  # [L=2, B=1, T=3, k=3]
  weights = [[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]], [[[1.0, 0, 0], [1.0, 0, 0], [0.5, 0.5, 0]]]]
  r = route(experts, weights=weights)
  np.testing.assert_allclose(experts_per_token(r), [2.0, 4 / 3], rtol=1e-6)
  np.testing.assert_allclose(experts_per_token(r, jnp.asarray([[1, 1, 0]])), [1.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(moe_metrics(r)["experts_per_token"], [2.0, 4 / 3], rtol=1e-6)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_model_metrics_have_one_value_per_layer(layout):
  """The model's router output and dispatch stats, in either layer layout, give [L] metrics."""
  cfg = tiny_config()
  model = build(cfg, seed=2, execution=Execution.everywhere("capacity", capacity_factor=0.5, layout=layout))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  out = jax.jit(lambda m, t: m(t))(model, tokens)
  mask = jnp.ones((2, 9)).at[1, :3].set(0)
  m = moe_metrics(out.router, out.moe_stats, mask)
  for name in ("router_entropy", "load_cv", "max_violation", "dead_experts", "z_loss", "dropped_fraction",
               "dropped_tokens", "experts_per_token"):
    assert m[name].shape == (cfg.num_layers,), name
  assert m["expert_load"].shape == (cfg.num_layers, cfg.num_experts)
  np.testing.assert_allclose(m["expert_load"].sum(-1), 1.0, rtol=1e-6)
  assert bool(jnp.all(m["dropped_fraction"] > 0))  # capacity 0.5 must drop
  np.testing.assert_allclose(m["experts_per_token"], cfg.top_k)  # routed slots (drops: dropped_fraction)
  np.testing.assert_allclose(jnp.mean(m["z_loss"]), z_loss(out.router, mask=mask), rtol=1e-6)
  assert bool(jnp.all((m["router_entropy"] > 0) & (m["router_entropy"] <= 1)))
