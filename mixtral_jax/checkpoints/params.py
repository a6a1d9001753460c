"""Parameter-name mapping between HF transformers' Mixtral and this model's parameter tree.

Pure functions on numpy arrays: `get(name) -> np.ndarray` reads one tensor (from a state dict, a
safetensors file, ...), so the same code serves in-memory parity tests and streaming conversion.

Our tree (leading L axis on everything under `layers`):
  embed [V, D]; lm_head [D, V]; final_norm.scale [D]
  layers.attn.wq [L, D, H, Dh], wk/wv [L, D, K, Dh], wo [L, H, Dh, D]; layers.attn_norm/ffn_norm.scale [L, D]
  layers.moe.router.kernel [L, D, E]; layers.moe.w1/w3 [L, E, D, F]; layers.moe.w2 [L, E, F, D]
HF layouts: legacy per-expert (`block_sparse_moe.experts.E.w1.weight` [F, D], what the Hub holds) and the
transformers-v5 fused one (`mlp.experts.gate_up_proj` [E, 2F, D] = w1 then w3, `down_proj` [E, D, F]).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import numpy as np

from mixtral_jax.config import ModelConfig, model_config_from

Getter = Callable[[str], np.ndarray]


def hf_layout(names) -> str:
  """'fused' if the tensor names use transformers-v5 fused experts, else 'legacy'."""
  return "fused" if any(n.endswith("mlp.experts.gate_up_proj") for n in names) else "legacy"


def hf_layer(get: Getter, i: int, cfg: ModelConfig, layout: str) -> Dict[str, Any]:
  """One HF decoder layer -> our per-layer subtree (numpy, no leading L axis)."""
  d, h, k, dh, e, f = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts, cfg.ffn_dim
  p = f"model.layers.{i}."
  attn = {
      "wq": get(p + "self_attn.q_proj.weight").T.reshape(d, h, dh),   # [H*Dh, D] -> [D, H, Dh]
      "wk": get(p + "self_attn.k_proj.weight").T.reshape(d, k, dh),
      "wv": get(p + "self_attn.v_proj.weight").T.reshape(d, k, dh),
      "wo": get(p + "self_attn.o_proj.weight").T.reshape(h, dh, d),   # [D, H*Dh] -> [H, Dh, D]
  }
  if layout == "fused":
    gate_up = get(p + "mlp.experts.gate_up_proj")  # [E, 2F, D]
    w1 = gate_up[:, :f].transpose(0, 2, 1)
    w3 = gate_up[:, f:].transpose(0, 2, 1)
    w2 = get(p + "mlp.experts.down_proj").transpose(0, 2, 1)  # [E, D, F] -> [E, F, D]
    router = get(p + "mlp.gate.weight").T  # [E, D] -> [D, E]
  else:
    q = p + "block_sparse_moe."
    w1 = np.stack([get(f"{q}experts.{j}.w1.weight").T for j in range(e)])  # [E, D, F]
    w3 = np.stack([get(f"{q}experts.{j}.w3.weight").T for j in range(e)])
    w2 = np.stack([get(f"{q}experts.{j}.w2.weight").T for j in range(e)])  # [E, F, D]
    router = get(q + "gate.weight").T
  return {
      "attn": attn,
      "attn_norm": {"scale": get(p + "input_layernorm.weight")},
      "ffn_norm": {"scale": get(p + "post_attention_layernorm.weight")},
      "moe": {"router": {"kernel": router}, "w1": w1, "w3": w3, "w2": w2},
  }


def stack_layers(layer_fn: Callable[[int], Dict[str, Any]], num_layers: int, dtype=None) -> Dict[str, Any]:
  """Builds the [L, ...] stacked subtree one layer at a time into preallocated arrays (peak: result +
  one layer, never a list of all layers)."""
  import jax  # local: keeps this module importable without initialising a backend
  first = layer_fn(0)
  stacked = jax.tree.map(lambda a: np.empty((num_layers, *a.shape), dtype or a.dtype), first)

  def put(i, layer):
    jax.tree.map(lambda dst, src: dst.__setitem__(i, src), stacked, layer)

  put(0, first)
  del first
  for i in range(1, num_layers):
    put(i, layer_fn(i))
  return stacked


def from_hf(get: Getter, names, cfg: ModelConfig, dtype=None) -> Dict[str, Any]:
  """HF tensors -> our full parameter tree (a pure dict of numpy arrays)."""
  layout = hf_layout(names)
  cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: a)
  lm_head = get("lm_head.weight") if "lm_head.weight" in names else get("model.embed_tokens.weight")
  return {
      "embed": cast(get("model.embed_tokens.weight")),
      "final_norm": {"scale": cast(get("model.norm.weight"))},
      "lm_head": cast(lm_head.T),
      "layers": stack_layers(lambda i: hf_layer(get, i, cfg, layout), cfg.num_layers, dtype),
  }


def to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> Iterator[Tuple[str, np.ndarray]]:
  """Our tree -> (HF legacy per-expert name, array) pairs, one layer at a time."""
  d, h, k, dh, e = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts
  yield "model.embed_tokens.weight", np.asarray(params["embed"])
  layers = params["layers"]
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    at = lambda a: np.asarray(a[i])  # noqa: E731 -- one layer's slice
    yield p + "self_attn.q_proj.weight", at(layers["attn"]["wq"]).reshape(d, h * dh).T
    yield p + "self_attn.k_proj.weight", at(layers["attn"]["wk"]).reshape(d, k * dh).T
    yield p + "self_attn.v_proj.weight", at(layers["attn"]["wv"]).reshape(d, k * dh).T
    yield p + "self_attn.o_proj.weight", at(layers["attn"]["wo"]).reshape(h * dh, d).T
    yield p + "input_layernorm.weight", at(layers["attn_norm"]["scale"])
    yield p + "post_attention_layernorm.weight", at(layers["ffn_norm"]["scale"])
    moe = layers["moe"]
    yield p + "block_sparse_moe.gate.weight", at(moe["router"]["kernel"]).T
    w1, w3, w2 = at(moe["w1"]), at(moe["w3"]), at(moe["w2"])
    for j in range(e):
      yield f"{p}block_sparse_moe.experts.{j}.w1.weight", w1[j].T
      yield f"{p}block_sparse_moe.experts.{j}.w2.weight", w2[j].T
      yield f"{p}block_sparse_moe.experts.{j}.w3.weight", w3[j].T
  yield "model.norm.weight", np.asarray(params["final_norm"]["scale"])
  yield "lm_head.weight", np.asarray(params["lm_head"]).T


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """HF config.json dict -> ModelConfig. rope_theta may be top-level or inside rope_parameters."""
  rope = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", rope.get("rope_theta", 1e6))
  heads = hf["num_attention_heads"]
  model = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_dim=hf["intermediate_size"],
      num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], rope_theta=float(theta),
      norm_eps=hf.get("rms_norm_eps", 1e-5), sliding_window=hf.get("sliding_window"),
      max_positions=hf.get("max_position_embeddings", 32768))
  model.update(overrides)
  return model_config_from(model)


def config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
  """ModelConfig -> HF MixtralConfig keyword arguments / config.json fields."""
  return dict(
      architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=cfg.vocab_size,
      hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim,
      num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.norm_eps, sliding_window=cfg.sliding_window, max_position_embeddings=cfg.max_positions,
      tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


# --- The original Mistral release (params.json + consolidated.*) -------------------------------------

def config_from_mistral(p: Mapping[str, Any], vocab_size: int | None = None, **overrides) -> ModelConfig:
  """Mistral params.json dict -> ModelConfig. rope_theta defaults to 1e6 (Mixtral's); vocab_size may be
  absent or -1 in some releases, then the embedding's row count is used."""
  moe = p["moe"]
  heads = p["n_heads"]
  vocab = p.get("vocab_size")
  model = dict(
      vocab_size=vocab if vocab not in (None, -1) else vocab_size, dim=p["dim"], num_layers=p["n_layers"],
      num_heads=heads, num_kv_heads=p.get("n_kv_heads") or heads, head_dim=p.get("head_dim") or p["dim"] // heads,
      ffn_dim=p["hidden_dim"], num_experts=moe["num_experts"], top_k=moe["num_experts_per_tok"],
      rope_theta=float(p.get("rope_theta") or 1e6), norm_eps=p.get("norm_eps", 1e-5),
      sliding_window=p.get("sliding_window"))
  model.update(overrides)
  return model_config_from(model)


def config_to_mistral(cfg: ModelConfig) -> Dict[str, Any]:
  """ModelConfig -> Mistral params.json fields."""
  return dict(dim=cfg.dim, n_layers=cfg.num_layers, head_dim=cfg.head_dim, hidden_dim=cfg.ffn_dim,
              n_heads=cfg.num_heads, n_kv_heads=cfg.num_kv_heads, norm_eps=cfg.norm_eps,
              vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, sliding_window=cfg.sliding_window,
              moe=dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k))


def interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
  """q/k projection rows [N*Dh, D] from Mistral's interleaved rotary pairs (2i, 2i+1) to the rotate-half
  pairs (i, i + Dh/2) this model and HF use: within each head, even rows first, then odd rows."""
  rows, d = w.shape
  return w.reshape(heads, rows // heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of interleaved_to_half (HF / ours -> Mistral's layout)."""
  rows, d = w.shape
  return w.reshape(heads, 2, rows // heads // 2, d).transpose(0, 2, 1, 3).reshape(rows, d)
