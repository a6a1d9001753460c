"""Model structure, configs, validation, cache and dtype behaviour (HF parity lives in test_parity.py)."""
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err, tiny_config
from mixtral_jax.config import ConfigError, ModelConfig, model_config_from
from mixtral_jax.execution import Execution, execution_from
from mixtral_jax.model import (KVCache, Mixtral, to_canonical, active_param_count, build, param_count, params_of,
                               with_execution)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_mixtral_8x7b_parameter_count_without_allocating(layout):
  from configs import mixtral_8x7b
  cfg = model_config_from(mixtral_8x7b.get_config().model)
  abstract = nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0), execution=Execution(layout=layout)))
  assert abstract.execution.layout == layout
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
  assert param_count(abstract) == 46_702_792_704
  active = active_param_count(cfg)
  assert active == 12_879_925_248 and round(active / 1e9, 1) == 12.9
  assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim) == (
      4096, 32, 32, 8, 128, 14336)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.norm_eps, cfg.num_experts, cfg.top_k) == (32000, 1e6, 1e-5, 8, 2)
  assert cfg.sliding_window is None and cfg.max_positions == 32768


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", 6, "num_heads=6 is not divisible by config.model.num_kv_heads"),
    ("top_k", 9, "top_k=9 exceeds config.model.num_experts=8"),
    ("router", "nope", "config.model.router='nope' is unknown"),
    ("dim", 0, "config.model.dim must be a positive integer"),
    ("num_experts", -2, "config.model.num_experts must be a positive integer"),
    ("param_dtype", "int8", "config.model.param_dtype='int8'"),
    # How the model runs is config.run: the old model fields are errors that say where they went.
    ("dispatch", "dense", "config.model.dispatch is how the model runs.*config.run.train_dispatch"),
    ("dtype", "bfloat16", "config.model.dtype is how the model runs.*config.run.dtype"),
    ("remat", "full", "config.model.remat is how the model runs.*config.run.remat"),
    ("scan_layers", False, "config.model.scan_layers is how the model runs.*config.run.layout"),
])
def test_validation_names_the_field(field, value, match):
  from configs import base
  model = base.tiny_model()
  model.num_kv_heads = 4 if field == "num_heads" else model.num_kv_heads
  model[field] = value
  with pytest.raises(ConfigError, match=match):
    model_config_from(model)


@pytest.mark.parametrize("field,value,match", [
    ("train_dispatch", "nope", "config.run.train_dispatch='nope' is unknown"),
    ("decode_dispatch", "nope", "config.run.decode_dispatch='nope' is unknown"),
    ("dtype", "int8", "config.run.dtype='int8'"),
    ("remat", "sometimes", "config.run.remat='sometimes'"),
    ("layout", "scanned", "config.run.layout='scanned'"),
    ("capacity_factor", 0.0, "config.run.capacity_factor must be positive"),
    ("loop_block", -1, "config.run.loop_block must be a non-negative integer"),
    ("bogus", 1, "config.run has unknown field.*bogus"),
])
def test_run_validation_names_the_field(field, value, match):
  from configs import base
  run = base.run_config()
  assert execution_from(run) == Execution()  # the base config's run section is all "auto"
  run[field] = value
  with pytest.raises(ConfigError, match=match):
    execution_from(run)


def test_unknown_model_field_is_an_error():
  from configs import base
  model = base.tiny_model().to_dict()
  model["num_expert"] = 4
  with pytest.raises(ConfigError, match="unknown field.*num_expert"):
    model_config_from(model)


def test_config_variants():
  from configs import base, mixtral_8x7b
  assert mixtral_8x7b.get_config("runlocal=True").model.num_layers == 2
  with pytest.raises(ValueError, match="unknown config variant 'bogus'"):
    base.get_config("bogus=1")


# Forward passes jitted: eager, the unstacked layout (the CPU default) runs op by op, ~10x slower to test.
forward = jax.jit(lambda model, tokens, **kwargs: model(tokens, **kwargs))


@pytest.mark.parametrize("layout", ["auto", "stacked"])
def test_cached_decode_equals_uncached_forward(layout):
  """Prefill 6 tokens, then decode 5 one at a time: every step's logits equal the full forward pass, in
  the default execution (on CPU unstacked; prefill, decode and the full pass each their own dispatch)
  and with the scanned layers."""
  cfg = tiny_config()
  model = build(cfg, seed=1, execution=Execution(layout=layout))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
  full = forward(model, tokens).logits
  cache = KVCache.init(cfg, batch=2, size=16)
  out = forward(model, tokens[:, :6], cache=cache)
  steps = [out.logits]
  step = jax.jit(lambda m, t, c: m(t, cache=c))
  cache = out.cache
  for i in range(6, 11):
    out = step(model, tokens[:, i:i + 1], cache)
    cache = out.cache
    steps.append(out.logits)
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-5
  assert int(cache.index) == 11


def test_rolling_cache_with_sliding_window():
  """A window-4 model decoding with only 4 cache slots (rolling) equals the uncached forward."""
  cfg = tiny_config(sliding_window=4)
  model = build(cfg, seed=2)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
  full = forward(model, tokens).logits
  step = jax.jit(lambda m, t, c: m(t, cache=c))  # one compile for the prompt, one for all decode steps
  out = step(model, tokens[:, :7], KVCache.init(cfg, batch=1, size=4))  # prompt longer than the cache
  steps, cache = [out.logits], out.cache
  for i in range(7, 12):
    out = step(model, tokens[:, i:i + 1], cache)
    steps.append(out.logits)
    cache = out.cache
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-5


@pytest.mark.parametrize("window, size", [(None, 16), (4, 4)])
def test_chunked_prefill_equals_uncached_forward(window, size):
  """Prefill in chunks of 5, 4 and 3 tokens: the first goes into a fresh cache (new keys only), the
  others attend over [cache ; chunk]; with a 4-slot rolling cache every chunk is longer than the window's
  remaining slots. Every chunk's logits equal the full forward pass."""
  cfg = tiny_config(sliding_window=window)
  model = build(cfg, seed=3)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  full = forward(model, tokens).logits
  cache = KVCache.init(cfg, batch=2, size=size)
  assert cache.fresh
  steps = []
  for start, stop in [(0, 5), (5, 9), (9, 12)]:
    out = forward(model, tokens[:, start:stop], cache=cache)
    cache = out.cache
    assert not cache.fresh
    steps.append(out.logits)
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-5


def test_packed_segments_do_not_attend_across_documents():
  cfg = tiny_config()
  model = build(cfg, seed=3)
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 7)
  packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 7])
  pos = jnp.asarray([list(range(5)) + list(range(7))])
  out = forward(model, packed, positions=pos, segment_ids=seg).logits
  alone_b = forward(model, jnp.asarray(b[None], jnp.int32)).logits
  assert rel_err(out[:, 5:], alone_b) <= 1e-5


REMAT_TOKENS = np.random.default_rng(4).integers(0, 257, (2, 7))


@functools.lru_cache(maxsize=None)  # the reference (stacked, no remat) is computed once for all variants
def remat_loss_and_grad(run: Execution):
  model = build(tiny_config(), seed=5, execution=run)
  tokens = jnp.asarray(REMAT_TOKENS, jnp.int32)

  def loss(m):
    return jnp.mean(m(tokens).logits ** 2)
  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)  # remat policies are what jit compiles: test them there
  # An unstacked model's gradient is per layer (and per expert): compare in the canonical stacked tree.
  return value, to_canonical(nnx.to_pure_dict(grads), model.execution.layout)


@pytest.mark.parametrize("changes", [dict(remat="full"), dict(remat="dots"), dict(layout="unstacked"),
                                     dict(layout="unstacked", remat="full")])
def test_remat_and_unrolled_layers_change_nothing(changes):
  """Loss and gradients (through the default prefill dispatch) are the same with remat and with the
  per-layer (unstacked) layout as with the scanned layers."""
  base = Execution(layout="stacked")
  (l0, g0), (l1, g1) = remat_loss_and_grad(base), remat_loss_and_grad(base.replace(**changes))
  assert rel_err(l1, l0) <= 1e-6
  leaves0, leaves1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves_with_path(g1)
  assert [p for p, _ in leaves1] == [p for p, _ in leaves0] and leaves0
  for (path, a), (_, b) in zip(leaves1, leaves0):
    assert a.shape == b.shape and rel_err(a, b) <= 1e-5, path


def test_param_dtype_policy():
  cfg = tiny_config(param_dtype="bfloat16")
  model = build(cfg)
  assert model.execution.dtype == "bfloat16" and model.dtype == jnp.bfloat16  # compute dtype "auto": the params'
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(params_of(model))} == {jnp.dtype(jnp.bfloat16)}
  out = forward(model, jnp.zeros((1, 3), jnp.int32))
  assert out.router.probs.dtype == jnp.float32  # router math stays float32
  assert out.logits.dtype == jnp.float32
  # float32 compute on the same bfloat16 weights is the execution's choice, not the config's.
  wide = with_execution(model, dtype="float32")
  assert wide.dtype == jnp.float32 and wide.config == cfg
  assert {x.dtype for x in jax.tree.leaves(params_of(wide))} == {jnp.dtype(jnp.bfloat16)}
  assert forward(wide, jnp.zeros((1, 3), jnp.int32)).logits.dtype == jnp.float32


def test_import_does_not_pull_torch():
  code = "import sys, mixtral_jax, mixtral_jax.model, mixtral_jax.checkpoints.params; assert 'torch' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_run_py_default_summary():
  out = subprocess.run([sys.executable, "run.py", "--config.seq_len=16", "--config.mode=summary"],
                       capture_output=True, text=True, check=True)
  assert "46,702" not in out.stdout and "parameters:" in out.stdout and "layer  3:" in out.stdout


def test_run_py_bad_config_is_one_line_error():
  out = subprocess.run([sys.executable, "run.py", "--config.model.top_k=9"], capture_output=True, text=True)
  assert out.returncode != 0
  assert "config.model.top_k=9 exceeds config.model.num_experts=8" in out.stderr
  assert "Traceback" not in out.stderr


