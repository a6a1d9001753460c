"""Attention implementations (mixtral_jax/attention): every mask combination against a head-by-head
reference, values and gradients; flash's block plan (what it skips); the model with flash vs xla; the
compiled memory of long sequences. Kernels: tests/test_attention_kernels.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from mixtral_jax.attention import ATTENTIONS, attention_mask, dot_product_attention, flash, flash_attention
from mixtral_jax.config import ConfigError
from mixtral_jax.execution import Execution, resolve


def _reference(q, k, v, mask):
  """Grouped-query attention written out head by head: q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S]."""
  group = q.shape[2] // k.shape[2]
  out = []
  for head in range(q.shape[2]):
    kh = head // group
    scores = jnp.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kh]) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    out.append(jnp.einsum("bts,bsd->btd", probs, v[:, :, kh]))
  return jnp.stack(out, axis=2)


def _qkv(rng, b, t, s, h, kv, dh, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in
               [(b, t, h, dh), (b, s, kv, dh), (b, s, kv, dh)])


# Self-attention layouts of a batch of 2 x 45 tokens: (positions, segments) per row.
def _layout(kind: str, t: int = 45):
  ar = np.arange(t)
  if kind == "plain":
    return np.stack([ar, ar]), np.ones((2, t), int)
  if kind == "packed":  # three documents, positions restarting; the second row one document + padding
    seg = np.array([[1] * 10 + [2] * 20 + [3] * (t - 30), [1] * (t - 7) + [0] * 7])
    pos = np.array([list(range(10)) + list(range(20)) + list(range(t - 30)), list(range(t - 7)) + [0] * 7])
    return pos, seg
  if kind == "left_pad":  # what sampling.left_align builds: padding first, the prompt's positions from 0
    seg = np.array([[0] * 9 + [1] * (t - 9), [1] * t])
    pos = np.array([[0] * 9 + list(range(t - 9)), list(range(t))])
    return pos, seg
  raise ValueError(kind)


@pytest.mark.parametrize("block", [3, 5, 64])
@pytest.mark.parametrize("window", [None, 4])
def test_block_causal_attention_is_exact(block, window):
  """Packed documents, a sliding window, blocks that do and do not divide T: the blocked self-attention
  equals attention over every key with the full mask."""
  rng = np.random.default_rng(block)
  q, k, v = _qkv(rng, 2, 11, 11, 6, 2, 8)
  segments = jnp.asarray([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2])  # two documents; trailing padding
  positions = jnp.asarray([list(range(6)) + list(range(5)), list(range(9)) + [0, 0]])
  mask = attention_mask(positions, positions, segments, segments, window)
  got = dot_product_attention(q, k, v, mask, causal_self=True, block=block)
  real = np.asarray(segments > 0)
  expected = _reference(q, k, v, mask)
  assert rel_err(np.asarray(got)[real], np.asarray(expected)[real]) <= 1e-6
  assert rel_err(dot_product_attention(q, k, v, mask), expected) <= 1e-6  # no blocks: same


def _check_equal(fn, q, k, v, mask, tol=1e-5):
  """fn(q, k, v) vs the head-by-head reference: values and d/d(q, k, v) of a random projection."""
  expected = _reference(q, k, v, mask)
  got = fn(q, k, v)
  assert rel_err(got, expected) <= tol
  cot = jnp.asarray(np.random.default_rng(7).standard_normal(expected.shape), jnp.float32)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2))(q, k, v)  # noqa: E731
  for name, g, e in zip("qkv", grads(fn), grads(lambda *a: _reference(*a, mask))):
    assert rel_err(g, e) <= tol, name


@pytest.mark.parametrize("impl,block", [("flash", 8), ("flash", 16), ("xla", 8)])
@pytest.mark.parametrize("kind", ["plain", "packed", "left_pad"])
@pytest.mark.parametrize("window", [None, 6])
def test_self_attention_every_mask(impl, kind, window, block):
  """Self-attention (no cache): GQA 6/2 heads, causal order, packed documents, left padding and a sliding
  window, blocks that do not divide T=45: values and gradients equal the reference (fp32, 1e-5)."""
  pos, seg = (jnp.asarray(a, jnp.int32) for a in _layout(kind))
  q, k, v = _qkv(np.random.default_rng(0), 2, 45, 45, 6, 2, 16)
  index = jnp.arange(45)
  mask = attention_mask(pos, pos, seg, seg, window) & (index[:, None] >= index[None, :])
  fn = lambda q, k, v: ATTENTIONS.get(impl)(q, k, v, pos, pos, seg, seg, window=window,  # noqa: E731
                                            causal_self=True, block=block)
  _check_equal(fn, q, k, v, mask)


@pytest.mark.parametrize("impl", ["flash", "xla"])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("t", [1, 5, 12])
def test_attention_over_a_cache(impl, window, t):
  """Prefill chunks (t > 1) and decode steps (t = 1) against a cache of 40 slots: a rolling cache whose
  slots hold positions out of order, empty slots (segment 0), left-padded rows. Values and gradients."""
  rng = np.random.default_rng(t)
  s = 40
  k_pos = np.stack([(np.arange(s) + 13) % s + 50, np.arange(s)])  # row 0: rolled; row 1: in order
  k_seg = np.stack([np.ones(s, int), np.array([0] * 4 + [1] * 30 + [0] * 6)])  # row 1: padding, empty slots
  q_pos = np.stack([90 + np.arange(t), 34 + np.arange(t)])
  q_seg = np.ones((2, t), int)
  k_pos, k_seg = np.concatenate([k_pos, q_pos], 1), np.concatenate([k_seg, q_seg], 1)  # [cache ; new keys]
  s += t
  args = [jnp.asarray(a, jnp.int32) for a in (q_pos, k_pos, q_seg, k_seg)]
  q, k, v = _qkv(rng, 2, t, s, 6, 3, 16)
  mask = attention_mask(args[0], args[1], args[2], args[3], window)
  assert bool(jnp.all(jnp.any(mask, axis=-1))), "every query sees a key"
  fn = lambda q, k, v: ATTENTIONS.get(impl)(q, k, v, args[0], args[1], args[2], args[3], window=window,  # noqa: E731
                                            causal_self=False, block=16)
  _check_equal(fn, q, k, v, mask)


def test_flash_padded_key_block_that_is_fully_visible():
  """20 keys in blocks of 16, every key visible from every query: the last key block is padded and must
  still be masked (its padding is not a key)."""
  q, k, v = _qkv(np.random.default_rng(4), 2, 3, 20, 4, 2, 8)
  q_pos, k_pos = jnp.full((2, 3), 100, jnp.int32), jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
  q_seg, k_seg = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 20), jnp.int32)
  mask = attention_mask(q_pos, k_pos, q_seg, k_seg, None)
  fn = lambda q, k, v: flash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q=16, block_k=16)  # noqa: E731
  _check_equal(fn, q, k, v, mask)


def test_flash_bf16_close_to_float32():
  pos, seg = (jnp.asarray(a, jnp.int32) for a in _layout("packed", 64))
  q, k, v = _qkv(np.random.default_rng(3), 2, 64, 64, 4, 2, 32)
  mask = attention_mask(pos, pos, seg, seg, None) & jnp.tril(jnp.ones((64, 64), bool))
  got = flash_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), pos, pos, seg, seg, causal_self=True,
                        block_q=16, block_k=16)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got.astype(jnp.float32), _reference(q, k, v, mask)) <= 2e-2


def test_flash_skips_blocks_outside_the_window_and_above_the_diagonal():
  """The visit plan of a 1024-token sliding-window self-attention in 128-row blocks: query block i visits
  exactly key blocks i-2 .. i for window 256 (the loop bounds: nothing else is even masked); packed
  documents aligned with blocks make the other documents' blocks invisible (skipped by a cond)."""
  t, blk = 1024, 128
  pos = jnp.broadcast_to(jnp.arange(t), (1, t))
  seg = jnp.ones((1, t), jnp.int32)
  q = jnp.zeros((1, t, 2, 8))
  lay = flash._Layout(q, q, pos, pos, seg, seg, 256, True, blk, blk)
  lo, hi = flash._ranges(lay.pred)
  assert np.asarray(lo).tolist() == [max(0, i - 2) for i in range(8)]
  assert np.asarray(hi).tolist() == [i + 1 for i in range(8)]
  assert int(jnp.sum(lay.pred)) == 1 + 2 + 3 * 6  # of the 64 pairs (36 without the window)
  docs = jnp.repeat(jnp.arange(1, 5), 256)[None]  # 4 documents of 2 blocks each
  lay = flash._Layout(q, q, pos % 256, pos % 256, docs, docs, None, True, blk, blk)
  assert int(jnp.sum(lay.pred)) == 4 * 3  # each document: its own lower block triangle


def test_attend_uses_xla_below_min_len_and_for_decode(monkeypatch):
  from mixtral_jax.attention import api
  called = []
  monkeypatch.setitem(api.ATTENTIONS._items, "flash", lambda *a, **k: called.append("flash") or a[0])
  monkeypatch.setitem(api.ATTENTIONS._items, "xla", lambda *a, **k: called.append("xla") or a[0])
  q, k = jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 1, 4))
  pos, seg = jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
  api.attend(q, k, k, pos, pos, seg, seg, window=None, causal_self=True, impl="flash", min_len=8)
  api.attend(q, k, k, pos, pos, seg, seg, window=None, causal_self=True, impl="flash", min_len=9)
  api.attend(q[:, :1], k, k, pos[:, :1], pos, seg[:, :1], seg, window=None, causal_self=False, impl="flash")
  assert called == ["flash", "xla", "xla"]


def test_execution_attention_fields():
  run = resolve(Execution(), backend="cpu")
  assert (run.attention, run.attention_min_len, run.flash_block) == ("flash", 2048, 256)
  with pytest.raises(ConfigError, match="config.run.attention='nope' is unknown"):
    Execution(attention="nope").replace()
  with pytest.raises(ConfigError, match="config.run.flash_block must be a non-negative integer"):
    Execution(flash_block=-1).replace()


def test_model_flash_equals_xla(window=9):
  """The whole model with flash attention everywhere (min_len 1) vs xla: logits of packed documents,
  gradients of a loss w.r.t. every parameter, and generation through a KV cache (prefill, chunked
  prefill, decode)."""
  from flax import nnx
  from mixtral_jax.inference import sampling
  from mixtral_jax.model import build, with_execution
  cfg = tiny_config(sliding_window=window, num_layers=2)
  base = build(cfg, seed=1, execution=Execution(layout="stacked", attention="xla"))
  fast = with_execution(base, attention="flash", attention_min_len=1, flash_block=8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30)), jnp.int32)
  pos, seg = (jnp.asarray(a, jnp.int32) for a in _layout("packed", 30))
  assert rel_err(fast(tokens, positions=pos, segment_ids=seg).logits,
                 base(tokens, positions=pos, segment_ids=seg).logits) <= 1e-5

  def grads(model):
    def loss(m):
      return jnp.mean(m(tokens, positions=pos, segment_ids=seg, train=True).logits ** 2)
    return jax.tree.leaves(nnx.state(nnx.grad(loss)(model), nnx.Param))
  for g, e in zip(grads(fast), grads(base)):
    assert rel_err(g, e) <= 1e-5
  prompts = tokens[:, :11]
  expected = sampling.generate(base, prompts, 6)
  np.testing.assert_array_equal(sampling.generate(fast, prompts, 6), expected)
  # Chunked prefill: flash over [cache slots ; chunk] (not self-attention) for the later chunks.
  np.testing.assert_array_equal(sampling.generate(fast, prompts, 6, prefill_chunk=4), expected)


@pytest.mark.slow  # end to end (20-45 s); `-m slow` runs it
def test_long_sequence_memory_is_linear():
  """Width-64 2-layer model, default execution (flash from 2048 keys): forward and forward+backward temp
  memory grow at most 12x from 4k to 32k tokens (8x the length; the materialised scores grew 55x) and
  stay under 1 GiB at 32k."""
  from mixtral_jax.config import ModelConfig
  cfg = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    ffn_dim=128, num_experts=4, top_k=2, rope_theta=1e4, max_positions=32768).replace()
  from mixtral_jax.training.plan import compiled_temp_bytes
  run = Execution(layout="stacked")
  for backward in (False, True):
    short, long = (compiled_temp_bytes(cfg, run, 1, t, backward=backward) / 2 ** 20 for t in (4096, 32768))
    assert long <= 12 * short and long < 1024, (backward, short, long)


@pytest.mark.slow
def test_long_context_config_trains_a_tiny_model_at_16k(tmp_path):
  """configs/long_context.py:size=tiny through run.py: packed 16,384-token rows of the stdlib corpus (byte
  tokens, documents of ~4,000 characters: flash skips the blocks other documents own), remat full, a few
  steps; the held-out loss falls."""
  import re
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "run.py", "--config=configs/long_context.py:size=tiny,seq=16384,steps=3,batch=1",
                        f"--workdir={tmp_path}", "--config.data.tokenizer=bytes", "--config.model.vocab_size=259",
                        "--config.model.num_layers=2", "--config.data.chunk_chars=4000",
                        "--config.train.learning_rate=1e-2", "--config.logging.wandb=disabled",
                        "--config.logging.plot=False", "--config.logging.progress=False"],
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "steps 0..3 of 1 x 16384 tokens" in out.stdout, out.stdout
  found = re.search(r"held-out perplexity: ([\d,.]+) at step 0 -> ([\d,.]+) at step 3", out.stdout)
  assert found, out.stdout
  start, end = (float(x.replace(",", "")) for x in found.groups())
  assert end < start, found.group(0)


def test_decode_reads_the_cache_in_place():
  """Decode steps in a loop (as sampling runs them), unstacked layout with per-layer cache buffers: the
  compiled loop body writes each layer's slot in place and copies no cache-sized buffer (before: every
  layer's keys were copied out of the stacked cache and back, 5x slower per step at 32k slots)."""
  import re
  from flax import nnx
  from mixtral_jax.config import ModelConfig
  from mixtral_jax.model import KVCache, build
  cfg = ModelConfig(vocab_size=256, dim=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                    ffn_dim=128, num_experts=4, top_k=2, rope_theta=1e4, max_positions=8192).replace()
  model = build(cfg, 0, Execution(layout="unstacked"))
  cache = KVCache.for_model(model, 1, 4096).replace(fresh=False)  # per-layer buffers, as sampling uses
  assert isinstance(cache.k, tuple)
  graphdef, state = nnx.split(model)

  def steps(state, cache):
    def body(i, c):
      return nnx.merge(graphdef, state)(jnp.zeros((1, 1), jnp.int32), cache=c).cache
    return jax.lax.fori_loop(0, 4, body, cache)

  hlo = jax.jit(steps, donate_argnums=(1,)).lower(state, cache).compile().as_text()
  bodies = [hlo[hlo.index(f"%{name} "):] for name in set(re.findall(r"body=%([\w.\-]+)", hlo))]
  bodies = [b[:b.index("\n}\n")] for b in bodies]
  cache_shape = "f32[1,2,4096,16]"
  writes = [l for b in bodies for l in b.splitlines() if cache_shape in l and "dynamic-update-slice" in l]
  copies = [l.strip()[:120] for b in bodies for l in b.splitlines() if cache_shape in l and " copy(" in l]
  assert len(writes) >= 2 * cfg.num_layers and not copies, copies


@pytest.mark.parametrize("window", [None, 16])
def test_decode_attention_equals_attention_over_the_written_cache(window):
  """reference.decode_attention (the cache before the write + the new token) == attention over the cache
  after writing the token into its slot: with a window, a rolling cache of `window` slots whose slot held
  the key leaving the window; without one, an empty slot; row 1 left-padded."""
  from mixtral_jax.attention import reference
  rng = np.random.default_rng(5)
  s, slot = 16, 3
  rolled = 100 - s + (np.arange(s) - slot) % s  # slot 3 holds position 84, the oldest
  old_pos = np.stack([rolled if window else np.arange(s), np.arange(s)])
  old_seg = np.stack([np.ones(s, int), np.array([0] * 2 + [1] * 1 + [0] * 13)])
  if not window:
    old_seg[0, slot:] = 0  # slots from 3 on are empty; the token goes to slot 3
  q_pos, q_seg = np.array([[100 if window else 3], [3]]), np.ones((2, 1), int)
  q, k_new, v_new = _qkv(rng, 2, 1, 1, 6, 3, 16)
  _, k_old, v_old = _qkv(rng, 2, 1, s, 6, 3, 16)
  new_pos, new_seg = old_pos.copy(), old_seg.copy()
  new_pos[:, slot], new_seg[:, slot] = q_pos[:, 0], q_seg[:, 0]
  k_written, v_written = k_old.at[:, slot].set(k_new[:, 0]), v_old.at[:, slot].set(v_new[:, 0])
  as_j = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
  got = reference.decode_attention(q, k_new, v_new, k_old.transpose(0, 2, 1, 3), v_old.transpose(0, 2, 1, 3),
                                   as_j(q_pos), as_j(old_pos), as_j(q_seg), as_j(old_seg), window)
  mask = attention_mask(as_j(q_pos), as_j(new_pos), as_j(q_seg), as_j(new_seg), window)
  assert rel_err(got, _reference(q, k_written, v_written, mask)) <= 1e-6
