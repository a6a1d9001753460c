"""Entry point: `python run.py --config=configs/x.py[:variant] --config.a.b=value --workdir=DIR`.

The config's `mode` picks what runs (see mixtral_jax/modes.py). With no flags: configs/tiny.py.
A bad flag (`--config.train.setps=5`, `--config.train.steps=abc`) is one line on stderr and exit status 2.
"""
import os
import sys

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # so config files can `from configs import base` from any cwd

_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "tiny.py")
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
  from mixtral_jax.cli import parse_flags
  app.run(main, flags_parser=lambda argv: parse_flags(argv, _DEFAULT_CONFIG))
