"""Attention for the Mixtral decoder: one function (`attend`) and its implementations by name.

`xla` materialises scores (short sequences, decode), `flash` is memory-efficient exact attention in plain
JAX (long sequences, every backend), and kernels.py holds the accelerator kernels (cuDNN, Pallas GPU,
TPU splash). Execution.attention / attention_min_len choose between them (mixtral_jax/execution.py).
"""
from mixtral_jax.attention.api import ATTENTIONS, attend
from mixtral_jax.attention.flash import flash_attention
from mixtral_jax.attention.reference import attention_mask, dot_product_attention

__all__ = ["ATTENTIONS", "attend", "attention_mask", "dot_product_attention", "flash_attention"]
