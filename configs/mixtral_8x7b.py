"""Mixtral 8x7B as released: 46.7B parameters, 12.9B active per token. Needs accelerators.

`runlocal=True` keeps the architecture's shape ratios but shrinks it to 2 layers of width 256 so the
config path can be exercised on a laptop.
"""
from configs import base


def get_config(arg=None):
  variant = base.parse_arg(arg, runlocal=False)
  config = base.get_config()
  config.model = base.mixtral_8x7b_model()
  if variant.runlocal:
    config.model.update(dict(dim=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32, ffn_dim=896,
                             param_dtype="float32"))
  return config
