"""Memory planner: will a config, at a quant level, batch and context, fit on a device?

    python run.py --config=configs/plan.py --config.plan.quant=q4 --config.plan.batch=8 --config.plan.context=32768

Counts, in bytes:
  weights      attention + expert weights at the quant level's bits per weight (scales included), the
               rest (embeddings, LM head, norms, routers) in param_dtype;
  kv_cache     2 (K and V) x layers x batch x slots x kv_heads x head_dim x dtype, slots = context
               (or sliding_window when smaller: the rolling cache);
  activations  the peak of one prefill chunk of `chunk` tokens through one layer (hidden states, q/k/v,
               attention's float32 scores and probabilities: over the whole [cache slots ; chunk] below
               the accelerators' attention_min_len (execution.BACKENDS), one flash block per head
               from there on, the routed expert activations of `sparse` dispatch) plus float32
               last-position logits; decode's are smaller.
A device "fits" when the total is within `usable` (default 90%) of its memory: the rest is the runtime,
XLA's workspace and fragmentation.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mixtral_jax.config import ModelConfig
from mixtral_jax.execution import BACKENDS
from mixtral_jax.inference.quant import LEVELS, QuantError, bits_per_weight

DEVICES_GB = {"24GB (RTX 4090 / L4)": 24, "48GB (L40S / A6000)": 48, "80GB (A100 / H100)": 80,
              "141GB (H200)": 141}
GB = 1e9


def parameter_groups(cfg: ModelConfig) -> dict:
  """Parameter counts: 'quantizable' (attention + experts + shared experts) and 'other'."""
  d, l = cfg.dim, cfg.num_layers
  attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  experts = 3 * d * cfg.ffn_dim * (cfg.num_experts + cfg.num_shared_experts)
  other = 2 * cfg.vocab_size * d + d + l * (2 * d + d * cfg.num_experts)
  return {"quantizable": l * (attn + experts), "other": other}


def attention_bytes(cfg: ModelConfig, batch: int, t: int, keys: int, backend: str = "gpu") -> int:
  """Float32 scores and probabilities of one layer's attention for t queries over `keys` keys: the whole
  matrix for xla attention (keys below the backend's attention_min_len), one block per head for flash."""
  d = BACKENDS[backend]
  if keys < d["attention_min_len"]:
    return 2 * batch * cfg.num_heads * t * keys * 4
  block = d["flash_block"]
  return 2 * batch * cfg.num_heads * min(t, block) * min(keys, block) * 4


def plan(cfg: ModelConfig, *, quant: Optional[str] = None, batch: int = 1, context: int = 4096,
         chunk: Optional[int] = None, usable: float = 0.9) -> dict:
  """Bytes of weights, KV cache and activations, and which named devices the total fits."""
  if quant and quant not in LEVELS:
    raise QuantError(f"config.plan.quant={quant!r} is not one of none, {', '.join(LEVELS)}")
  if batch < 1 or context < 1:
    raise ValueError(f"config.plan.batch and config.plan.context must be >= 1, got {batch}, {context}")
  pbytes = jnp.dtype(cfg.jnp_param_dtype).itemsize
  abytes = pbytes  # inference computes in the parameters' dtype (execution's dtype="auto")
  groups = parameter_groups(cfg)
  qbits = bits_per_weight(quant, rows=cfg.dim) if quant else 8 * pbytes
  weights = groups["quantizable"] * qbits / 8 + groups["other"] * pbytes
  slots = min(context, cfg.sliding_window) if cfg.sliding_window else context
  kv = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * abytes
  t = min(chunk or context, context)
  n = batch * t
  hidden = 4 * n * cfg.dim * abytes                                        # residual, normed, attn out, moe out
  qkv = n * cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads) * abytes
  scores = attention_bytes(cfg, batch, t, keys=t if context <= t else slots + t)
  moe = 3 * n * cfg.top_k * cfg.ffn_dim * abytes + n * cfg.num_experts * 4 * 3
  logits = batch * cfg.vocab_size * 4
  activations = hidden + qkv + max(scores, moe) + logits
  total = weights + kv + activations
  return {"quant": quant or cfg.param_dtype, "batch": batch, "context": context, "chunk": t,
          "params": groups["quantizable"] + groups["other"], "bits_per_weight": qbits,
          "weights": weights, "kv_cache": kv, "activations": activations, "total": total,
          "fits": {name: total <= usable * gb * GB for name, gb in DEVICES_GB.items()}}


def format_plan(p: dict) -> str:
  lines = [f"{p['params'] / 1e9:.2f}B parameters, {p['quant']} ({p['bits_per_weight']:.2f} bits per quantized "
           f"weight), batch {p['batch']}, context {p['context']} (prefill chunk {p['chunk']})",
           f"  weights      {p['weights'] / GB:8.2f} GB",
           f"  kv cache     {p['kv_cache'] / GB:8.2f} GB",
           f"  activations  {p['activations'] / GB:8.2f} GB",
           f"  total        {p['total'] / GB:8.2f} GB"]
  for name, ok in p["fits"].items():
    lines.append(f"  {name:22s} {'fits' if ok else 'does NOT fit'}")
  return "\n".join(lines)
