"""Generation: greedy equals HF transformers' generate, cache == no cache, padding-invariance, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_model, ours_from_hf, tiny_config
from mixtral_jax.inference import sampling
from mixtral_jax.model import build

HF_CONFIGS = {
    "gqa5": dict(),                                              # 5 heads / 1 kv head, head_dim 12
    "gqa4_top1": dict(num_heads=8, num_kv_heads=2, head_dim=6, top_k=1),
    "window4": dict(sliding_window=4, num_heads=6, num_kv_heads=3, head_dim=14),  # rolls in decode
    "e3_odd": dict(vocab_size=101, dim=22, num_heads=2, num_kv_heads=1, head_dim=18, ffn_dim=27,
                   num_experts=3, num_layers=2, rope_theta=1e6),
}


_forward_logits = jax.jit(lambda m, t: m(t).logits[0])


def greedy_without_cache(model, prompt, new, width=16):
  """Reference: a full forward pass per new token, no cache. One fixed-width jitted forward for every
  prompt (causal, so the zeros after the current token do not change its logits)."""
  assert len(prompt) + new <= width
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + new):
    tokens[0, i] = int(jnp.argmax(_forward_logits(model, jnp.asarray(tokens))[i - 1]))
  return tokens[0, :len(prompt) + new].tolist()


def hf_generate(hf, prompts, new, eos_id=None):
  """HF greedy generate on left-padded prompts; returns the continuation [B, new] (pad 0 after EOS)."""
  import torch
  tokens, lengths = sampling.pad_prompts(prompts)
  mask = (np.arange(tokens.shape[1])[None] >= tokens.shape[1] - lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    out = hf.generate(torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                      max_new_tokens=new, min_new_tokens=0, do_sample=False, eos_token_id=eos_id,
                      pad_token_id=0)
  cont = out[:, tokens.shape[1]:].numpy()
  return np.pad(cont, ((0, 0), (0, new - cont.shape[1])))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_greedy_equals_hf_generate(name):
  """Batched, left-padded prompts of different lengths; token for token over 9 new tokens."""
  cfg = tiny_config(**HF_CONFIGS[name])
  hf = hf_model(cfg, seed=len(name))
  rng = np.random.default_rng(len(name))
  prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (7, 3, 5)]
  expected = hf_generate(hf, prompts, 9)
  out = sampling.generate(ours_from_hf(cfg, hf), prompts, 9)
  assert out.shape == (3, 7 + 9)
  if cfg.sliding_window:  # the cache rolls: 4 slots for 16 tokens
    assert sampling.cache_size(cfg, 7, 9) == cfg.sliding_window
  np.testing.assert_array_equal(np.asarray(out)[:, 7:], expected)


def test_eos_stops_each_row_like_hf():
  cfg = tiny_config()
  hf = hf_model(cfg, seed=11)
  ours = ours_from_hf(cfg, hf)
  prompts = [[1, 17, 33, 4], [1, 200]]
  free = np.asarray(sampling.generate(ours, prompts, 8))[:, 4:]
  eos = int(free[0, 2])  # row 0 emits it at step 2; row 1 stops only if it emits the same token
  out = np.asarray(sampling.generate(ours, prompts, 8, eos_id=eos))
  np.testing.assert_array_equal(out[:, 4:], hf_generate(hf, prompts, 8, eos_id=eos))
  assert out[0, 4:7].tolist() == free[0, :3].tolist() and (out[0, 7:] == 0).all()
  assert sampling.generated_lengths(out, 4, eos)[0] == 3


def test_padded_batch_equals_each_prompt_alone_and_uncached_forward():
  cfg = tiny_config(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8)
  model = build(cfg, seed=5)
  prompts = [[1, 4, 9, 16, 25, 36], [1, 99, 98]]
  batch = np.asarray(sampling.generate(model, prompts, 5))
  for row, p in zip(batch, prompts):
    alone = np.asarray(sampling.generate(model, [p], 5))[0]
    assert row[-5:].tolist() == alone[-5:].tolist()
    # Cached, jitted decode == a plain loop of full forward passes without a cache.
    assert alone.tolist() == greedy_without_cache(model, p, 5)
  # The same prompts right-padded in an array with a mask give the same continuation.
  right = np.zeros((2, 6), np.int32)
  mask = np.zeros((2, 6), np.int32)
  for i, p in enumerate(prompts):
    right[i, :len(p)], mask[i, :len(p)] = p, 1
  np.testing.assert_array_equal(sampling.generate(model, right, 5, prompt_mask=mask), batch)


def test_sampling_is_reproducible_with_a_key():
  cfg = tiny_config(num_layers=1)
  model = build(cfg, seed=7)
  prompts = [[1, 2, 3], [1, 4]]
  kw = dict(temperature=1.3, top_k=50, top_p=0.95)
  a = sampling.generate(model, prompts, 8, key=jax.random.key(1), **kw)
  b = sampling.generate(model, prompts, 8, key=jax.random.key(1), **kw)
  c = sampling.generate(model, prompts, 8, key=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  greedy = sampling.generate(model, prompts, 8)
  np.testing.assert_array_equal(sampling.generate(model, prompts, 8, key=jax.random.key(3), temperature=2.0,
                                                  top_k=1), greedy)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.07, 0.03]] * 2000))  # [B, V]
  key = jax.random.key(0)
  top2 = np.asarray(sampling.sample_logits(logits, key, temperature=1.0, top_k=2))
  assert set(top2.tolist()) == {0, 1} and abs((top2 == 0).mean() - 2 / 3) < 0.05
  nucleus = np.asarray(sampling.sample_logits(logits, key, temperature=1.0, top_p=0.8))
  assert set(nucleus.tolist()) == {0, 1, 2}  # 0.5 + 0.25 < 0.8 <= 0.5 + 0.25 + 0.15
  full = np.asarray(sampling.sample_logits(logits, key, temperature=1.0))
  assert set(full.tolist()) == {0, 1, 2, 3, 4}


def test_streaming_callback_sees_every_token_in_order():
  cfg = tiny_config(num_layers=1)
  model = build(cfg, seed=8)
  seen = []
  out = sampling.generate(model, [[1, 2, 3]], 5, callback=lambda step, tok: seen.append((int(step), tok.tolist())))
  assert [s for s, _ in seen] == list(range(5))
  assert [t[0] for _, t in seen] == np.asarray(out)[0, 3:].tolist()


def test_user_errors_are_one_sentence():
  cfg = tiny_config(num_layers=1, max_positions=16)
  model = build(cfg)
  with pytest.raises(sampling.GenerationError, match="12 tokens \\+ max_new_tokens=5 = 17 exceeds .*max_positions=16"):
    sampling.generate(model, [list(range(1, 13))], 5)
  with pytest.raises(sampling.GenerationError, match="explicit PRNG key"):
    sampling.generate(model, [[1]], 2, temperature=0.7)
  with pytest.raises(sampling.GenerationError, match="at least one token"):
    sampling.generate(model, [[1], []], 2)
  with pytest.raises(sampling.GenerationError, match="token ids must be in"):
    sampling.generate(model, [[1, cfg.vocab_size]], 2)
