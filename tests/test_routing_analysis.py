"""moe/analysis.py: the Mixtral paper's routing statistics on hand-made and random routings."""
import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.moe import analysis
from mixtral_jax.moe.routers import RouterOutput


def _router(experts, weights=None, num_experts=4):
  experts = jnp.asarray(experts, jnp.int32)  # [L, B, T, k]
  weights = jnp.ones(experts.shape, jnp.float32) * jnp.asarray([0.7, 0.3])[:experts.shape[-1]] if weights is None \
      else jnp.asarray(weights, jnp.float32)
  shape = experts.shape[:-1] + (num_experts,)
  return RouterOutput(logits=jnp.zeros(shape), probs=jnp.zeros(shape), experts=experts, weights=weights)


def test_baselines_are_the_papers():
  b = analysis.random_baselines(8, 2)
  assert b["first_choice"] == 0.125 and abs(b["top_k_overlap"] - (1 - 15 / 28)) < 1e-12  # 46.4%


def test_consecutive_repeats_by_hand_with_mask_and_documents():
  # one layer, one row of 5 tokens, top-2; first choices 0 0 1 1 2; pairs: (0,1) same first, (1,2) share expert 2,
  # (2,3) same first, (3,4) share nothing (token 2 chose 1 and 2).
  experts = [[[[0, 1], [0, 2], [1, 2], [1, 0], [2, 3]]]]
  r = _router(experts)
  out = analysis.consecutive_repeats(r)
  assert np.allclose(out["first_choice"], [2 / 4]) and np.allclose(out["top_k_overlap"], [3 / 4])
  # token 4 padding, a document boundary between tokens 1 and 2: pairs (0,1) and (2,3) remain
  out = analysis.consecutive_repeats(r, mask=jnp.asarray([[1, 1, 1, 1, 0]]),
                                     segment_ids=jnp.asarray([[1, 1, 2, 2, 2]]))
  assert float(out["pairs"]) == 2 and np.allclose(out["first_choice"], [1.0])
  # the first choice is the highest-weight slot, whatever the slot order
  swapped = _router([[[[1, 0], [2, 0]]]], weights=[[[[0.3, 0.7], [0.2, 0.8]]]])
  assert np.allclose(analysis.consecutive_repeats(swapped)["first_choice"], [1.0])


def test_random_routing_matches_the_baselines_and_coactivation():
  e, k, n = 8, 2, 40000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  experts = jax.vmap(lambda kk: jax.random.choice(kk, e, (k,), replace=False))(keys)  # [n, k]
  r = _router(experts.reshape(1, 1, n, k), num_experts=e)
  out, base = analysis.consecutive_repeats(r), analysis.random_baselines(e, k)
  assert abs(float(out["first_choice"][0]) - base["first_choice"]) < 0.01
  assert abs(float(out["top_k_overlap"][0]) - base["top_k_overlap"]) < 0.01
  both = np.asarray(analysis.coactivation(r))[0]  # [E, E]
  np.testing.assert_allclose(both, both.T)
  np.testing.assert_allclose(np.diag(both), k / e, atol=0.01)  # each expert chosen by k/E of tokens
  off = both - np.diag(np.diag(both))
  np.testing.assert_allclose(off.sum(1), (k - 1) * np.diag(both), rtol=1e-6)


def test_routing_entropy_uniform_one_hot_and_mask():
  e = 4
  uniform = jnp.full((1, 1, 2, e), 1 / e)
  one_hot = jnp.asarray([[[[1.0, 0, 0, 0], [0, 0, 1.0, 0]]]])
  experts = jnp.asarray([[[[0, 1], [2, 3]]]], jnp.int32)
  r = RouterOutput(logits=jnp.zeros((1, 1, 2, e)), probs=uniform, experts=experts, weights=jnp.ones((1, 1, 2, 2)))
  out = analysis.routing_entropy(r)
  np.testing.assert_allclose(out["entropy"], [np.log(e)], rtol=1e-6)
  np.testing.assert_allclose(out["normalized"], [1.0], rtol=1e-6)
  np.testing.assert_allclose(out["load_entropy"], [1.0], rtol=1e-6)  # 4 slots on 4 experts
  r = r.replace(probs=one_hot, weights=jnp.asarray([[[[1.0, 0.0], [1.0, 0.0]]]]))  # experts 0 and 2 only
  out = analysis.routing_entropy(r)
  np.testing.assert_allclose(out["entropy"], [0.0], atol=1e-7)
  np.testing.assert_allclose(out["load_entropy"], [np.log(2) / np.log(e)], rtol=1e-6)
  # masking the second token leaves one expert loaded: load entropy 0
  mixed = r.replace(probs=jnp.concatenate([one_hot[:, :, :1], uniform[:, :, :1]], axis=2))
  out = analysis.routing_entropy(mixed, mask=jnp.asarray([[1, 0]]))
  np.testing.assert_allclose(out["entropy"], [0.0], atol=1e-7)
  np.testing.assert_allclose(out["load_entropy"], [0.0], atol=1e-7)
