"""Memory planner: `python run.py --config=configs/plan.py --config.plan.quant=q4 --config.plan.batch=8`.

Mixtral 8x7B by default; `--config=configs/plan.py:tiny=True` plans the tiny model instead.
"""
import ml_collections

from configs import base


def get_config(arg=None):
  variant = base.parse_arg(arg, tiny=False)
  config = base.get_config()
  config.mode = "plan"
  config.model = base.tiny_model() if variant.tiny else base.mixtral_8x7b_model()
  config.plan = ml_collections.ConfigDict(dict(
      quant="none",      # none | q8 | q6 | q5 | q4 | q3 | q2
      batch=1,
      context=4096,      # prompt + generated tokens per sequence
      chunk=2048,        # prefill chunk (sampling.generate(prefill_chunk=...)); 0 = all at once
  ))
  return config
