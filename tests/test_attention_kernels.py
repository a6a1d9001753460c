"""Accelerator attention kernels (mixtral_jax/attention/kernels.py) against the reference.

On CPU: the Pallas kernels in the interpreter (pallas_gpu_interpret, splash_interpret) equal the `xla`
reference in float32 on causal, packed, left-padded and windowed batches, values and gradients; the real
kernels export from abstract inputs (bf16, 8x7B attention sizes) for `cuda` (Triton) and `tpu` (Mosaic),
forward and fwd+bwd; fallbacks and refusals are what the module says. cuDNN cannot be traced without a
CUDA backend (jax asks cuDNN for its version at trace time), so its numeric test runs only on a GPU; here
its refusal is tested instead.

Positions count up by one within each segment (packing, left padding): there the kernels' index-based
causal/window rules equal the reference's position-based ones.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from mixtral_jax.attention import api, kernels
from mixtral_jax.config import ConfigError

B, T, H, K, DH = 2, 256, 4, 2, 64
BIG = dict(b=1, t=2048, h=32, k=8, dh=128)  # Mixtral 8x7B attention


def _batch(case: str, t: int = T):
  """positions, segments [B, T] int32 and the rows that are real tokens [B, T] bool."""
  pos, seg = np.zeros((B, t), np.int32), np.zeros((B, t), np.int32)
  if case in ("causal", "window"):
    pos[:], seg[:] = np.arange(t), 1
  elif case in ("packed", "packed_window"):
    for row, cuts in enumerate(([0, 100, 140, 256], [0, 7, 200, 256])):  # segments 1, 2, 3, positions restart
      for s, (a, e) in enumerate(zip(cuts[:-1], cuts[1:])):
        a, e = a * t // 256, e * t // 256
        pos[row, a:e], seg[row, a:e] = np.arange(e - a), s + 1
  elif case == "left_pad":
    for row, pad in enumerate((37 * t // 256, 150 * t // 256)):  # seg 0 rows first (positions 0), then one sequence
      pos[row, pad:], seg[row, pad:] = np.arange(t - pad), 1
  else:
    raise ValueError(case)
  return jnp.asarray(pos), jnp.asarray(seg), seg > 0


WINDOW = {"causal": None, "packed": None, "left_pad": None, "window": 48, "packed_window": 48}


def _qkv(dtype=jnp.float32, b=B, t=T, h=H, k=K, dh=DH, seed=0):
  r = np.random.default_rng(seed)
  q = r.standard_normal((b, t, h, dh))
  kv = r.standard_normal((2, b, t, k, dh))
  return jnp.asarray(q, dtype), jnp.asarray(kv[0], dtype), jnp.asarray(kv[1], dtype)


def _call(name, q, k, v, pos, seg, window, block=128):
  return api.ATTENTIONS.get(name)(q, k, v, pos, pos, seg, seg, window=window, causal_self=True, block=block)


def _uses_kernel(name, *args) -> bool:
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: _call(name, q, k, v, *args))(*_qkv()))
  return "pallas_call" in jaxpr


def test_registered():
  for name in ("cudnn", "pallas_gpu", "pallas_gpu_interpret", "splash", "splash_interpret"):
    assert name in api.ATTENTIONS


@pytest.mark.parametrize("case", ["causal", "packed", "left_pad", "window", "packed_window"])
@pytest.mark.parametrize("name", ["pallas_gpu_interpret", "splash_interpret"])
def test_interpret_equals_reference(name, case):
  q, k, v = _qkv()
  pos, seg, real = _batch(case)
  window = WINDOW[case]
  out = jax.jit(lambda q, k, v: _call(name, q, k, v, pos, seg, window))(q, k, v)
  ref = _call("xla", q, k, v, pos, seg, window)
  flash = _call("flash", q, k, v, pos, seg, window)
  assert out.shape == ref.shape and out.dtype == q.dtype
  real = np.asarray(real)
  assert rel_err(np.asarray(out)[real], np.asarray(ref)[real]) <= 1e-5
  assert rel_err(np.asarray(out)[real], np.asarray(flash)[real]) <= 1e-5
  # pallas_gpu has no window: those calls are flash's; everything else runs the kernel
  assert _uses_kernel(name, pos, seg, window) == (window is None or name == "splash_interpret")


@pytest.mark.parametrize("case", ["packed", "left_pad", "packed_window"])
@pytest.mark.parametrize("name", ["pallas_gpu_interpret", "splash_interpret"])
def test_interpret_gradients(name, case):
  """d/d(q, k, v) of sum(out * cotangent) through the kernels' own VJPs; the cotangent is zero on padding
  rows (as the loss mask makes it), so every gradient entry is defined and compared."""
  q, k, v = _qkv()
  pos, seg, real = _batch(case)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * real[:, :, None, None]

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(_call(impl, q, k, v, pos, seg, WINDOW[case]) * cot)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for got, want in zip(grads(name), grads("xla")):
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", ["pallas_gpu_interpret", "splash_interpret"])
def test_interpret_unaligned_length(name):
  """T = 200 is no whole number of tiles: rows are added (segment -1, seen only by themselves) and sliced
  off; the loss and its gradients (cotangent on every row) stay those of the reference."""
  t = 200
  q, k, v = _qkv(t=t)
  pos, seg, real = _batch("packed", t=t)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def value_and_grads(impl):
    loss = lambda q, k, v: jnp.sum(_call(impl, q, k, v, pos, seg, None) * cot)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (val, grads), (ref_val, ref_grads) = value_and_grads(name), value_and_grads("xla")
  assert abs(float(val) - float(ref_val)) <= 1e-5 * (1 + abs(float(ref_val)))
  for got, want in zip(grads, ref_grads):
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


def test_fallback_to_flash_for_cache_attention():
  """causal_self=False (a prefill over a non-empty cache): keys are cache slots, so flash serves it."""
  q, _, _ = _qkv(t=128)
  _, k, v = _qkv(t=256, seed=1)
  k_pos = jnp.tile(jnp.arange(256, dtype=jnp.int32), (B, 1))
  k_seg = jnp.ones((B, 256), jnp.int32).at[1, :20].set(0)  # row 1: 20 empty slots
  q_pos, q_seg = k_pos[:, 128:], jnp.ones((B, 128), jnp.int32)
  args = (q, k, v, q_pos, k_pos, q_seg, k_seg)
  kw = dict(window=None, causal_self=False, block=128)
  ref = api.ATTENTIONS.get("xla")(*args, **kw)
  for name in kernels.KERNELS:
    fn = functools.partial(api.ATTENTIONS.get(name), **kw)
    assert rel_err(fn(*args), ref) <= 1e-5, name
    assert "pallas_call" not in str(jax.make_jaxpr(fn)(*args)), name


def test_unsupported_combinations_raise_one_line():
  pos, seg, _ = _batch("causal")
  q, k, v = _qkv(jnp.float32)
  with pytest.raises(ConfigError, match=r"^attention 'cudnn' needs bfloat16 or float16 inputs, got float32") as e:
    _call("cudnn", q, k, v, pos, seg, None)
  assert "\n" not in str(e.value)
  q, k, v = _qkv(jnp.bfloat16, dh=12)
  with pytest.raises(ConfigError, match=r"^attention 'cudnn' needs a head dim that is a multiple of 8"):
    _call("cudnn", q, k, v, pos, seg, None)


def _has(platform):
  try:
    return bool(jax.devices(platform))
  except RuntimeError:
    return False


@pytest.mark.skipif(_has("cuda"), reason="a CUDA backend is present: test_gpu_kernels_on_gpu runs instead")
def test_cudnn_refused_without_cuda():
  """jax's cuDNN attention asks cuDNN for its version while tracing; on a machine without CUDA that fails,
  exporting for "cuda" included, so `cudnn` says so in one line before jax's bare RuntimeError."""
  pos, seg, _ = _batch("causal")
  q, k, v = _qkv(jnp.bfloat16)
  with pytest.raises(ConfigError, match=r"^attention 'cudnn' needs a CUDA GPU with cuDNN when it is traced") as e:
    _call("cudnn", q, k, v, pos, seg, None)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="needs a CUDA GPU"):
    jax.export.export(jax.jit(lambda q, k, v: _call("cudnn", q, k, v, pos, seg, None)), platforms=["cuda"],
                      disabled_checks=kernels.export_disabled_checks("cudnn"))(q, k, v)
  with pytest.raises(RuntimeError, match="cuDNN is not detected"):  # the library's own check, for the record
    jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation="cudnn")


@pytest.mark.skipif(not _has("cuda"), reason="no CUDA GPU: Triton needs one to run, cuDNN even to trace")
@pytest.mark.parametrize("name", ["cudnn", "pallas_gpu"])
@pytest.mark.parametrize("case", ["packed", "left_pad", "packed_window"])
def test_gpu_kernels_on_gpu(name, case):
  _device_check(name, case)


@pytest.mark.skipif(not _has("tpu"), reason="the splash kernel runs compiled on a TPU only")
@pytest.mark.parametrize("case", ["packed", "left_pad", "packed_window"])
def test_splash_on_tpu(case):
  _device_check("splash", case)


def _device_check(name, case):
  """bf16 values and gradients against the float32 reference (bf16 rounding: 2e-2)."""
  q, k, v = _qkv(jnp.bfloat16)
  pos, seg, real = _batch(case)
  window = WINDOW[case]
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * real[:, :, None, None]
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

  def value_and_grads(impl, *qkv):
    loss = lambda q, k, v: jnp.sum(f32(_call(impl, q, k, v, pos, seg, window)) * cot)  # noqa: E731
    return jax.jit(lambda *a: (_call(impl, *a, pos, seg, window), jax.grad(loss, argnums=(0, 1, 2))(*a)))(*qkv)

  out, grads = value_and_grads(name, q, k, v)
  ref, ref_grads = value_and_grads("xla", f32(q), f32(k), f32(v))
  real = np.asarray(real)
  assert rel_err(f32(out)[real], ref[real]) <= 2e-2
  for got, want in zip(grads, ref_grads):
    assert rel_err(f32(got), want) <= 2e-2


def _export(name, platform, grad, window=None):
  a = jax.ShapeDtypeStruct((BIG["b"], BIG["t"], BIG["h"], BIG["dh"]), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((BIG["b"], BIG["t"], BIG["k"], BIG["dh"]), jnp.bfloat16)
  ints = jax.ShapeDtypeStruct((BIG["b"], BIG["t"]), jnp.int32)

  def f(q, k, v, pos, seg):
    return api.ATTENTIONS.get(name)(q, k, v, pos, pos, seg, seg, window=window, causal_self=True, block=512)

  fn = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2)) if grad else f
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=kernels.export_disabled_checks(name))(a, kv, kv, ints, ints)
  assert exported.platforms == (platform,)
  text = exported.mlir_module()
  return re.findall(r"custom_call @([\w$.]+)", text), text


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd_bwd"])
def test_pallas_gpu_exports_triton_kernels(grad):
  """Lowered for cuda on this CPU machine: forward Triton kernel, plus the backward's preprocess and
  dq/dk/dv kernels (the library's custom VJP, not an XLA fallback)."""
  calls, text = _export("pallas_gpu", "cuda", grad)
  assert calls.count("__gpu$xla.gpu.triton") == (3 if grad else 1)
  assert "mha_forward" in text and ("mha_backward" in text) == grad
  assert "bf16" in text


@pytest.mark.parametrize("window", [None, 1024], ids=["causal", "window"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd_bwd"])
def test_splash_exports_tpu_kernels(grad, window):
  """Lowered for tpu on this CPU machine: the forward Mosaic kernel, plus its dq and dkv kernels."""
  calls, text = _export("splash", "tpu", grad, window)
  assert calls.count("tpu_custom_call") == (3 if grad else 1)
  assert "splash_mha_fwd_segmented" in text and ("splash_mha_dkv_segmented" in text) == grad
