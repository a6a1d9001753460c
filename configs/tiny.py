"""The CPU-size Mixtral (see configs/base.py:tiny_model); `python run.py` uses this config and trains it.

Default run: the tiny model with the real Mixtral tokenizer on the Python standard library's source, a
few hundred steps on 2 CPU cores in under 3 minutes; held-out perplexity, a checkpoint, a sample, a plot.
"""
from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.mode = "train"
  return config
