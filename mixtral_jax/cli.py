"""run.py's flag parsing: a bad --config override is one line naming the key (and the closest known
one) and exit status 2, never a traceback. `parse_flags` is absl's `flags_parser`."""
import dataclasses
import difflib
import re
import sys

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path
# The loader DEFINE_config_file uses, to read the config again when explaining a bad override.
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

_DEFAULT_CONFIG = ""


def _config_arg(argv):
  """The --config value in argv (`path[:variant]`), or the default file."""
  for i, arg in enumerate(argv):
    if re.match(r"^--?config$", arg) and i + 1 < len(argv):
      return argv[i + 1]
    if re.match(r"^--?config=", arg):
      return arg.split("=", 1)[1]
  return _DEFAULT_CONFIG


def _override_paths(argv):
  """The `a.b` of every --config.a.b[=value] in argv (the same match ml_collections makes)."""
  return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if re.match(r"^--?(no)?config\.", arg)]


_MISSING = object()


def _child(node, part):
  """node.part / node[part] the way ml_collections walks an override path, or _MISSING."""
  if hasattr(node, "keys"):  # ConfigDict or dict
    return node[part] if part in node else _MISSING
  if isinstance(part, str) and dataclasses.is_dataclass(node) and hasattr(node, part):
    return getattr(node, part)
  if isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
    return node[part]
  return _MISSING


def _lookup(node, parts):
  for part in parts:
    node = _child(node, part)
    if node is _MISSING:
      break
  return node


def _join(prefix, part):
  return f"{prefix}.{part}" if isinstance(part, str) else f"{prefix}[{part!r}]"


def _unknown_key(config, path):
  """`unknown config key config.a.b (did you mean config.a.c?)` for the first missing part of path, or None.

  Among close names, one under which the rest of the path exists wins: `modle.top_k` -> `model`, not `mode`.
  """
  try:
    parts = config_path.split(path)  # `a.b`, `a.b[0]`, `a["c.d"]` as ml_collections reads them
  except ValueError:
    return None
  node, seen = config, "config"
  for i, part in enumerate(parts):
    child = _child(node, part)
    if child is not _MISSING:
      node, seen = child, _join(seen, part)
      continue
    if not hasattr(node, "keys"):
      return f"unknown config key {_join(seen, part)} ({seen} is a value, not a section)"
    close = difflib.get_close_matches(str(part), [str(k) for k in node.keys()], n=5)
    fits = [c for c in close if _lookup(node[c], parts[i + 1:]) is not _MISSING]
    hint = f" (did you mean {_join(seen, (fits or close)[0])}?)" if close else ""
    return f"unknown config key {_join(seen, part)}{hint}"
  return None


def _load_config(argv):
  """The config file's get_config() without overrides, or None if that fails (absl reports it then)."""
  try:
    return ConfigFileFlagParser(name="config", lock_config=False).parse(_config_arg(argv))
  except Exception:  # pylint: disable=broad-except
    return None


def _explain(argv, error):
  """One line for a bad --config.a.b override, absl's message for other flag errors, or None (re-raise)."""
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile, as ml_collections reads it
  except flags.Error:
    pass  # a bad --flagfile is `error` itself
  if isinstance(error, flags.Error):
    bad_value = re.match(r"flag --(config\.[^=]+)=(.*?): (.*)$", str(error), re.S)
    if not bad_value:
      return str(error)
    key, value, reason = bad_value.groups()
    try:
      current = _lookup(_load_config(argv), config_path.split(key.split(".", 1)[1]))
    except ValueError:
      current = _MISSING
    if current is _MISSING or current is None:
      return f"{key}={value}: {reason}"
    return f"{key}: cannot parse {value!r} as {type(current).__name__}"
  config = _load_config(argv)  # a KeyError/AttributeError: ml_collections found no such field
  if config is None:
    return None
  return next(filter(None, (_unknown_key(config, p) for p in _override_paths(argv))), None)


def parse_flags(argv, default_config: str):
  """absl's flag parsing, but a bad flag is one line (`error: ...`) and exit status 2, not a traceback."""
  global _DEFAULT_CONFIG
  _DEFAULT_CONFIG = default_config
  try:
    # Defined here, not at import: without --config, ml_collections loads the default file and applies the
    # --config.a.b overrides while defining the flag, so an unknown key would raise before app.run.
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (get_config), optionally "
                                    "`path:variant`.", lock_config=True, sys_argv=argv)
    return flags.FLAGS(argv)
  except (KeyError, AttributeError, flags.Error) as e:
    message = _explain(argv, e)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
