"""Accelerator attention kernels from maintained libraries, behind the ATTENTIONS names (api.py).

    cudnn                 jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention on
                          NVIDIA GPUs. GQA native; index-causal (is_causal: the upper triangle is skipped);
                          window as local_window_size=(window - 1, 0). The public API takes no segment ids,
                          and its query/key_value_seq_lengths mean right padding (ours is left padding), so
                          segments go in as a boolean [B, 1, T, S] mask, which cuDNN reads as an additive
                          bias: one [T, S] array per batch row in the input dtype, shared by the heads, and
                          a dbias of that shape in the backward pass. Exact for packing and left padding;
                          memory quadratic in the sequence (2 bytes a score and row, not a head). The
                          private packed layout (q_offsets / kv_offsets) would avoid that but needs a
                          static bound on segments per row and Hopper. bfloat16 / float16 only, head dim a
                          multiple of 8. jax asks cuDNN for its version at trace time: with no CUDA backend
                          (a CPU-only machine, exporting for "cuda" too) nothing can be traced, so it
                          raises ConfigError; its numbers are tested only where a GPU is.
    pallas_gpu            jax.experimental.pallas.ops.gpu.attention.mha: Pallas Triton flash attention
                          with a custom VJP (Triton backward kernels). One segment-id array for queries and
                          keys, index-causal, no window; K/V are repeated to H heads (its GQA), so the
                          kernel reads G = H / K copies of them. Library tiles (forward 128, backward 32):
                          `block` is not used. Lowers (and exports for "cuda") without a GPU.
    splash                jax.experimental.pallas.ops.tpu.splash_attention (make_splash_mha, per batch row
                          by vmap): TPU block-sparse flash attention with its own VJP. GQA native (k/v
                          [K, S, Dh]); a static CausalMask, or LocalMask((window - 1, 0)) for a window,
                          ANDed with SegmentIds; tiles of `block` rows (a multiple of 128). The kernel
                          does not scale: q is multiplied by Dh ** -0.5 in its own dtype first.
    *_interpret           the same kernels in the Pallas interpreter (any backend, slow): tests on CPU.

The kernels' masks are index-based structures over the queries' own tokens, so each applies only to
self-attention (causal_self, T == S). Every other call (a prefill or chunk over a non-empty cache, where
keys are cache slots) goes to flash (flash.py, the plain-JAX reference for long sequences), and so does a
window pallas_gpu cannot express (window < T). These are calls the model makes, so they are served, not
refused; each such fallback is logged once. Configurations that cannot work raise ConfigError instead
(cudnn with float32, a head dim cuDNN rejects, cudnn without a CUDA backend).

Semantics. The mask of reference.attention_mask is position-based: key j is visible from query i when
seg_i == seg_j and 0 <= pos_i - pos_j (< window). The kernels use indices (HF's own rule): j <= i and
i - j < window, with the segment mask. The two agree whenever positions count up by one within each
segment, which is what packing (training/data.py) and left padding produce (padding rows, segment 0, only
see padding; their outputs are never used). Sequences are padded to whole tiles with a segment id (-1) no
real token has: padded rows see only padded rows, and are sliced off.

Shapes: B batch, T queries, S keys (= T here), H query heads, K kv heads, G = H // K, Dh head dim,
Tp = T padded to whole tiles. The Pallas kernels see one device's arrays: under a sharded jit, wrap them in
shard_map (GSPMD has no partitioning rule for a pallas_call).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

import mixtral_jax.attention.flash as flash
from mixtral_jax.config import ConfigError

_PAD_SEG = -1  # segment id of the rows added to fill tiles: never a real segment (>= 0)
_LANES = 128  # splash's key tiles are multiples of the TPU lane width
_PALLAS_GPU_TILE = 128  # the Pallas GPU kernel's default forward tile (BlockSizes.get_default())
_logged = set()


def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, causal_self, block, name, why):
  if (name, why) not in _logged:
    _logged.add((name, why))
    logging.getLogger(__name__).info("attention %r falls back to 'flash': %s", name, why)
  return flash.flash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, causal_self=causal_self,
                               block_q=block, block_k=block)


def _fallback_reason(q, k, causal_self) -> Optional[str]:
  if not causal_self:
    return "the keys are not the queries' own tokens (causal_self=False: attention over a cache)"
  if q.shape[1] != k.shape[1]:
    return f"causal_self with {q.shape[1]} queries and {k.shape[1]} keys"
  return None


def _window(window: Optional[int], t: int) -> Optional[int]:
  """The window, or None where it excludes nothing (positions step by one: pos_i - pos_j <= i - j < T)."""
  return None if window is None or window >= t else int(window)


def _pad_rows(x, rows: int, fill=0):
  """Pads axis 1 of x [B, T, ...] to `rows`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, rows - x.shape[1])
  return jnp.pad(x, pad, constant_values=fill)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _has_backend(platform: str) -> bool:
  try:
    return len(jax.devices(platform)) > 0
  except RuntimeError:  # no such backend in this process
    return False


# --- cuDNN -----------------------------------------------------------------------------------------------

def check_cudnn(dtype, head_dim: int) -> None:
  """Raises ConfigError (one line) where the `cudnn` attention cannot run."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ConfigError(f"attention 'cudnn' needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name} "
                      "(use 'flash' or 'pallas_gpu')")
  if head_dim % 8 or head_dim > 256:
    raise ConfigError(f"attention 'cudnn' needs a head dim that is a multiple of 8 and at most 256 (128 "
                      f"before Hopper), got {head_dim}")
  if not _has_backend("cuda"):
    raise ConfigError("attention 'cudnn' needs a CUDA GPU with cuDNN when it is traced (jax asks cuDNN "
                      "for its version; this process has no CUDA backend, so it cannot be exported from "
                      "here either): use 'pallas_gpu' or 'flash'")


def cudnn(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, causal_self, block):
  why = _fallback_reason(q, k, causal_self)
  if why:
    return _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, causal_self=causal_self, block=block,
                  name="cudnn", why=why)
  check_cudnn(q.dtype, q.shape[-1])
  w = _window(window, q.shape[1])
  mask = (q_seg[:, :, None] == k_seg[:, None, :])[:, None]  # [B, 1, T, S]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn",
                                     local_window_size=None if w is None else (w - 1, 0))  # [B, T, H, Dh]
  return out.astype(q.dtype)


# --- Pallas GPU (Triton) ---------------------------------------------------------------------------------

def _pallas_gpu(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, causal_self, block, interpret, name):
  why = _fallback_reason(q, k, causal_self)
  if not why and _window(window, q.shape[1]) is not None:
    why = f"the kernel has no sliding window (window {window} < {q.shape[1]} tokens)"
  if why:
    return _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, causal_self=causal_self, block=block,
                  name=name, why=why)
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  _, t, h, dh = q.shape
  tp = _round_up(t, _PALLAS_GPU_TILE)
  g = h // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # [B, T, H, Dh]: kv head j serves j*G .. j*G+G-1
  q, k, v = (_pad_rows(x, tp) for x in (q, k, v))  # [B, Tp, H, Dh]
  seg = _pad_rows(q_seg.astype(jnp.int32), tp, _PAD_SEG)  # [B, Tp]: one array, queries' = keys' here
  out = gpu_attention.mha(q, k, v, seg, sm_scale=dh ** -0.5, causal=True, interpret=interpret)  # [B, Tp, H, Dh]
  return out[:, :t].astype(q.dtype)


# --- TPU splash ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _splash_kernel(tp: int, heads: int, window: Optional[int], tile: int, interpret: bool):
  """The splash kernel for one batch row: q [H, Tp, Dh], k/v [K, Tp, Dh], SegmentIds([Tp], [Tp])."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = sm.CausalMask((tp, tp)) if window is None else sm.LocalMask((tp, tp), (window - 1, 0), offset=0)
  sizes = sk.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile, block_kv_dkv=tile,
                        block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
  with jax.ensure_compile_time_eval():  # its mask tables are constants, cached across traces: never tracers
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, causal_self, block, interpret, name):
  why = _fallback_reason(q, k, causal_self)
  if why:
    return _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, causal_self=causal_self, block=block,
                  name=name, why=why)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  _, t, h, dh = q.shape
  tile = min(max(_LANES, block // _LANES * _LANES), _round_up(t, _LANES))
  tp = _round_up(t, tile)
  kernel = _splash_kernel(tp, h, _window(window, t), tile, interpret)
  heads_major = lambda x: _pad_rows(x, tp).transpose(0, 2, 1, 3)  # noqa: E731  [B, T, N, Dh] -> [B, N, Tp, Dh]
  qh = heads_major(q * jnp.asarray(dh ** -0.5, q.dtype))  # [B, H, Tp, Dh]
  kh, vh = heads_major(k), heads_major(v)  # [B, K, Tp, Dh]
  segs = sk.SegmentIds(q=_pad_rows(q_seg.astype(jnp.int32), tp, _PAD_SEG),  # [B, Tp]
                       kv=_pad_rows(k_seg.astype(jnp.int32), tp, _PAD_SEG))
  out = jax.vmap(kernel)(qh, kh, vh, segs)  # [B, H, Tp, Dh]
  return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, H, Dh]


KERNELS = {
    "cudnn": cudnn,
    "pallas_gpu": functools.partial(_pallas_gpu, interpret=False, name="pallas_gpu"),
    "pallas_gpu_interpret": functools.partial(_pallas_gpu, interpret=True, name="pallas_gpu_interpret"),
    "splash": functools.partial(_splash, interpret=False, name="splash"),
    "splash_interpret": functools.partial(_splash, interpret=True, name="splash_interpret"),
}

# Custom calls jax.export refuses without a compatibility guarantee: pass these as `disabled_checks` to
# export a program using the kernel (Pallas TPU's tpu_custom_call is on jax's stable list).
_UNSTABLE_CALLS = {
    "cudnn": ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"),
    "pallas_gpu": ("__gpu$xla.gpu.triton",),
}


def export_disabled_checks(name: str) -> list:
  """jax.export.DisabledSafetyCheck list for exporting a program that uses attention `name`."""
  return [jax.export.DisabledSafetyCheck.custom_call(c) for c in _UNSTABLE_CALLS.get(name, ())]
