"""The fused AdamW (mixtral_jax/training/optim.py) against optax's own chain of the same transformations."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mixtral_jax.training import optim


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": jnp.asarray(rng.standard_normal((11, 7)), jnp.float32),
          "layers": {"moe": {"w1": jnp.asarray(rng.standard_normal((2, 5, 7, 3)), jnp.float32),
                             "router": {"kernel": jnp.asarray(rng.standard_normal((2, 7, 5)), jnp.float32)}},
                     "attn_norm": {"scale": jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)}}}


def _train_config(**overrides):
  t = dict(learning_rate=3e-2, warmup_steps=2, steps=6, schedule="cosine", end_lr_fraction=0.1, b1=0.9,
           b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, freeze_router=False, freeze_experts="")
  t.update(overrides)
  return ml_collections.ConfigDict(t)


def _run(opt, params, grads_seq):
  state = opt.init(params)
  step = jax.jit(lambda p, g, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
  for grads in grads_seq:
    params, state = step(params, grads, state)
  return params


@pytest.mark.parametrize("clip_norm", [1.0, 0.0, 1e3])
def test_fused_adamw_equals_the_optax_chain(clip_norm):
  """Six steps through warmup and cosine decay, gradients large enough that clipping acts (1.0), never
  acts (1e3) or is off (0): every parameter agrees with optax to float32 rounding (rtol 1e-6)."""
  t = _train_config(clip_norm=clip_norm)
  params = _params()
  grads_seq = [jax.tree.map(lambda p, i=i: 3.0 * jnp.sin(p * (i + 1)), params) for i in range(6)]
  ours, _ = optim.make_optimizer(t, params, num_experts=5)
  schedule = optim.learning_rate_schedule(t)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  reference = optax.chain(*parts, optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                                                mask=optim.decay_mask(params)))
  got, want = _run(ours, params, grads_seq), _run(reference, params, grads_seq)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, params)
  assert min(jax.tree.leaves(moved)) > 1e-3  # every tensor trained


def test_frozen_entries_do_not_move_or_count_in_the_clipping_norm():
  t = _train_config(freeze_router=True, freeze_experts="1,3")
  params = _params()
  grads = jax.tree.map(lambda p: jnp.cos(p), params)
  huge = jax.tree.map(lambda g: g, grads)
  huge["layers"]["moe"]["router"]["kernel"] = grads["layers"]["moe"]["router"]["kernel"] * 1e6
  huge["layers"]["moe"]["w1"] = grads["layers"]["moe"]["w1"].at[:, [1, 3]].multiply(1e6)
  opt, _ = optim.make_optimizer(t, params, num_experts=5)
  out = _run(opt, params, [huge] * 3)
  np.testing.assert_array_equal(out["layers"]["moe"]["router"]["kernel"], params["layers"]["moe"]["router"]["kernel"])
  np.testing.assert_array_equal(out["layers"]["moe"]["w1"][:, [1, 3]], params["layers"]["moe"]["w1"][:, [1, 3]])
  # The frozen gradients' 1e6 scale is invisible to clipping: the rest trains as with normal gradients.
  normal = jax.tree.map(lambda g: g, grads)
  normal["layers"]["moe"]["router"]["kernel"] = grads["layers"]["moe"]["router"]["kernel"] * 0
  normal["layers"]["moe"]["w1"] = grads["layers"]["moe"]["w1"].at[:, [1, 3]].set(0.0)
  ref = _run(opt, params, [normal] * 3)
  np.testing.assert_allclose(out["embed"], ref["embed"], rtol=1e-6)
  np.testing.assert_allclose(out["layers"]["moe"]["w1"], ref["layers"]["moe"]["w1"], rtol=1e-6)
