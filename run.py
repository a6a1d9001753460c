"""Entry point: `python run.py --config=configs/x.py[:variant] --config.a.b=value --workdir=DIR`.

The config's `mode` picks what runs (see mixtral_jax/modes.py). With no flags: configs/tiny.py.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # so config files can `from configs import base` from any cwd

config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "tiny.py"),
                                "Config file (get_config), optionally `path:variant`.", lock_config=True)
flags.DEFINE_string("workdir", os.path.join(_HERE, "workdir"), "Where checkpoints, logs and plots go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from mixtral_jax import hostmem
  from mixtral_jax.config import ConfigError
  from mixtral_jax.modes import load_modes
  config = flags.FLAGS.config
  try:
    mode = load_modes().get(config.mode)
  except KeyError as e:
    sys.exit(f"error: config.mode: {e.args[0]}")
  try:
    hostmem.apply(config.get("host_memory", "retain"))  # before JAX starts its threads
    mode(config, flags.FLAGS.workdir)
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
