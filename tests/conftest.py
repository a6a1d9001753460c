"""Shared helpers: tiny configs with distinct odd sizes, and HF transformers as the test oracle."""
import os

# The suite's time is XLA:CPU compiling many small programs (every parameter shape's initializer, every
# test's forward); its optimisation passes make that ~3x slower and buy run time these tiny models do not
# need. The tests compare numbers, never speed. Set before jax starts, and inherited by the processes the
# tests launch (run.py, notebook kernels); tests that set XLA_FLAGS for a subprocess add FAST_COMPILE.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import numpy as np
import pytest

from mixtral_jax.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
  """Distinct, odd sizes so a wrong axis fails loudly: V=257 D=40 H=5 K=1 Dh=12 F=36 E=7 k=2."""
  base = dict(vocab_size=257, dim=40, num_layers=3, num_heads=5, num_kv_heads=1, head_dim=12, ffn_dim=36,
              num_experts=7, top_k=2, rope_theta=10000.0, max_positions=128)
  base.update(overrides)
  return ModelConfig(**base).replace()  # replace() validates


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_model(cfg: ModelConfig, seed: int = 0, router_scale: float = 20.0):
  """A random HF MixtralForCausalLM (float32, eager attention) for `cfg`.

  Router weights are scaled up so top-k choices are far from ties: otherwise a 1e-7 rounding difference
  can flip an expert and the comparison would test tie-breaking, not the model.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from mixtral_jax.checkpoints.params import config_to_hf
  torch.manual_seed(seed)
  hf_cfg = transformers.MixtralConfig(**config_to_hf(cfg), attn_implementation="eager",
                                     experts_implementation="eager")
  model = transformers.MixtralForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for layer in model.model.layers:
      layer.mlp.gate.weight.mul_(router_scale)
      # Non-trivial norm scales so a missing/misplaced norm weight is caught.
      layer.input_layernorm.weight.uniform_(0.5, 1.5)
      layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    model.model.norm.weight.uniform_(0.5, 1.5)
  return model


def hf_state(model) -> dict:
  return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
  import torch
  with torch.no_grad():
    kwargs = {} if attention_mask is None else {"attention_mask": torch.as_tensor(np.asarray(attention_mask))}
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs).logits.float().numpy()


def ours_from_hf(cfg: ModelConfig, model):
  from mixtral_jax.model import from_params
  from mixtral_jax.checkpoints.params import from_hf
  state = hf_state(model)
  return from_params(cfg, from_hf(state.__getitem__, list(state), cfg))
