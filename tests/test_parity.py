"""The model reproduces HF transformers' MixtralForCausalLM logits (float32, rel. error <= 1e-5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, hf_model, ours_from_hf, rel_err, tiny_config
from mixtral_jax.execution import Execution, resolve
from mixtral_jax.model import with_execution

TOL = 1e-5  # float32 end to end; the only differences are summation order (observed ~1e-7)

CONFIGS = {
    "gqa5_headdim_ne": dict(),  # 5 heads / 1 kv head (ratio 5), head_dim 12 != 40 / 5
    "top1": dict(top_k=1),
    "top3_e5": dict(top_k=3, num_experts=5),
    "gqa1": dict(num_heads=4, num_kv_heads=4, head_dim=10),
    "gqa2": dict(num_heads=6, num_kv_heads=3, head_dim=14),
    "gqa4": dict(num_heads=8, num_kv_heads=2, head_dim=6),
    "gqa8": dict(num_heads=8, num_kv_heads=1, head_dim=8),
    "window": dict(sliding_window=5),
    "e3_odd": dict(vocab_size=101, dim=22, num_heads=2, num_kv_heads=1, head_dim=18, ffn_dim=27,
                   num_experts=3, top_k=2, num_layers=2, rope_theta=1e6, norm_eps=1e-6),
}


# Jitted: eager, the default (unstacked) layout runs op by op.
forward = jax.jit(lambda model, tokens, **kwargs: model(tokens, **kwargs))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(name):
  """The default execution (what a user gets: on CPU the unstacked layout, sorted_loop prefill)."""
  cfg = tiny_config(**CONFIGS[name])
  hf = hf_model(cfg, seed=len(name))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
  expected = hf_logits(hf, tokens)
  ours = ours_from_hf(cfg, hf)
  assert ours.execution == resolve(Execution(), purpose="inference")
  got = jax.jit(lambda m, t: m(t).logits)(ours, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", ["gqa5_headdim_ne", "top3_e5", "window"])
def test_training_forward_matches_hf(name):
  """The trainer's execution: the scanned (stacked) layers and the training dispatch (train=True; the
  router has no jitter, so training changes nothing else)."""
  cfg = tiny_config(**CONFIGS[name])
  hf = hf_model(cfg, seed=len(name))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
  ours = with_execution(ours_from_hf(cfg, hf), resolve(Execution(), purpose="train"))
  assert ours.execution.layout == "stacked" and cfg.router_jitter == 0
  got = jax.jit(lambda m, t: m(t, train=True).logits)(ours, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, hf_logits(hf, tokens)) <= TOL


@pytest.mark.parametrize("name", ["gqa4", "window"])
def test_block_causal_attention_matches_hf(name):
  """Queries in blocks of 4 over 13 tokens (3 whole blocks and a partial one), each attending only to the
  keys up to its block's end: the same logits as HF."""
  cfg = tiny_config(**CONFIGS[name])
  hf = hf_model(cfg, seed=7)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 13))
  ours = with_execution(ours_from_hf(cfg, hf), causal_block=4)
  assert ours.execution.causal_block == 4
  got = jax.jit(lambda m, t: m(t).logits)(ours, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, hf_logits(hf, tokens)) <= TOL


def test_router_choices_match_hf():
  """Per-layer router logits and chosen experts equal HF's (output_router_logits)."""
  import torch
  cfg = tiny_config()
  hf = hf_model(cfg, seed=3)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
  with torch.no_grad():
    out = hf(torch.as_tensor(tokens), output_router_logits=True)
  ours = forward(ours_from_hf(cfg, hf), jnp.asarray(tokens, jnp.int32))
  for layer, hf_router_logits in enumerate(out.router_logits):
    got = np.asarray(ours.router.logits[layer]).reshape(-1, cfg.num_experts)
    assert rel_err(got, hf_router_logits.numpy()) <= TOL
    hf_top = torch.topk(torch.softmax(hf_router_logits, -1), cfg.top_k).indices.numpy()
    np.testing.assert_array_equal(np.asarray(ours.router.experts[layer]).reshape(-1, cfg.top_k), hf_top)


def test_padding_mask_matches_hf():
  """Left padding through segment_ids (0 = pad) equals HF with attention_mask, on the real tokens."""
  cfg = tiny_config(num_heads=4, num_kv_heads=2, head_dim=10)
  hf = hf_model(cfg, seed=5)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (2, 11))
  mask = np.ones((2, 11), np.int64)
  mask[1, :4] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  import torch
  with torch.no_grad():
    expected = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                  position_ids=torch.as_tensor(positions)).logits.numpy()
  got = forward(ours_from_hf(cfg, hf), jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions),
                segment_ids=jnp.asarray(mask)).logits
  real = mask.astype(bool)
  assert rel_err(np.asarray(got)[real], expected[real]) <= TOL


def test_bf16_close_to_fp32():
  """bfloat16 compute stays within 5e-2 relative error of float32 (8 mantissa bits, 3 layers)."""
  cfg = tiny_config()
  hf = hf_model(cfg, seed=7)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 13)), jnp.int32)
  ref = forward(ours_from_hf(cfg, hf), tokens).logits
  bf_model = ours_from_hf(cfg.replace(param_dtype="bfloat16"), hf)
  assert bf_model.dtype == jnp.bfloat16  # the compute dtype follows the parameters' by default
  bf = forward(bf_model, tokens).logits
  assert bf.dtype == jnp.float32  # logits are accumulated in float32 whatever the compute dtype
  assert rel_err(bf, ref) <= 5e-2
