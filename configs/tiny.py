"""The CPU-size Mixtral (see configs/base.py:tiny_model); `python run.py` uses this config."""
from configs import base


def get_config(arg=None):
  return base.get_config(arg)
