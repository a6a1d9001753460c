"""Attention implementations by name, and the one call the model makes: `attend`.

Every implementation computes the same function (reference.attention_mask): key j is visible from query
i when they share a segment (0 = padding / empty cache slot), 0 <= pos_i - pos_j (< sliding window), and,
for self-attention (`causal_self`: the keys are the queries' own tokens), index_j <= index_i.

    xla          reference.py: the score matrix materialised (block-causal for self-attention). Fastest on
                 XLA:CPU for short sequences and for decode (one row per sequence); quadratic memory.
    flash        flash.py: key/value blocks with an online softmax and a recomputing custom VJP, in plain
                 JAX (every backend); memory linear in the sequence; skips blocks nothing can see.
    cudnn, pallas_gpu, pallas_gpu_interpret, splash, splash_interpret: accelerator kernels (kernels.py).

`Execution.attention` names the implementation for long sequences; shorter ones (keys < Execution.
attention_min_len) use `xla`, where the score matrix is small. See execution.BACKENDS. A decode step
against a KV cache does not come here: the layer calls reference.decode_attention, which reads the cache
in place before its slot is written.
"""
from __future__ import annotations

from typing import Optional

import jax

import mixtral_jax.attention.flash as flash
import mixtral_jax.attention.kernels as kernels
import mixtral_jax.attention.reference as reference
from mixtral_jax.registry import Registry

ATTENTIONS = Registry("attention implementation")


@ATTENTIONS.register("xla")
def xla(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, causal_self, block):
  mask = reference.attention_mask(q_pos, k_pos, q_seg, k_seg, window)  # [B, T, S]
  return reference.dot_product_attention(q, k, v, mask, causal_self=causal_self, block=block)


@ATTENTIONS.register("flash")
def flash_blocks(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, causal_self, block):
  return flash.flash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, causal_self=causal_self,
                               block_q=block, block_k=block)


for _name, _fn in kernels.KERNELS.items():
  ATTENTIONS.register(_name)(_fn)


def attend(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window: Optional[int], causal_self: bool,
           impl: str = "flash", min_len: int = 0, block: int = 128, flash_block: int = 256) -> jax.Array:
  """q [B, T, H, Dh], k/v [B, S, K, Dh], positions/segments [B, T] / [B, S] -> [B, T, H, Dh].

  impl: the ATTENTIONS name for long sequences; keys shorter than min_len, and a single query row, use
  "xla". block: xla's block-causal query rows; flash_block: the rows of flash / kernel blocks."""
  t, s = q.shape[1], k.shape[1]
  name = "xla" if (t == 1 or s < min_len) else impl
  fn = ATTENTIONS.get(name)
  return fn(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, causal_self=causal_self,
            block=block if name == "xla" else flash_block)
