"""run.py's command line: a misspelt or mistyped --config.a.b override is one line and exit status 2.

Each case fails while flags are parsed, before any JAX work, so a run is a fraction of a second.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(*args):
  return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)


def assert_one_line_error(out, line):
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr, out.stderr
  assert out.stderr.splitlines() == [line]


@pytest.mark.parametrize("args, line", [
    (["--config.train.setps=5"],
     "error: unknown config key config.train.setps (did you mean config.train.steps?)"),
    # "mode" is closer to "modle" than "model", but only config.model has a top_k.
    (["--config.modle.top_k=3"], "error: unknown config key config.modle (did you mean config.model?)"),
    (["--config.nosuchkey=1"], "error: unknown config key config.nosuchkey"),
    (["--config.train.lora.rnak=4"],
     "error: unknown config key config.train.lora.rnak (did you mean config.train.lora.rank?)"),
    (["--config.train.steps.x=1"],
     "error: unknown config key config.train.steps.x (config.train.steps is a value, not a section)"),
    # An explicit --config is loaded at parse time, not when the flag is defined: the same one line.
    (["--config=configs/generate.py", "--config.prmpt=hi"],
     "error: unknown config key config.prmpt (did you mean config.prompt?)"),
    (["--config", "configs/tiny.py", "--config.trian.steps=5"],
     "error: unknown config key config.trian (did you mean config.train?)"),
])
def test_unknown_key_is_one_line_with_suggestion(args, line):
  assert_one_line_error(run_py(*args), line)


def test_unknown_key_in_a_flagfile(tmp_path):
  flagfile = tmp_path / "flags"
  flagfile.write_text("--config.train.setps=5\n")
  assert_one_line_error(run_py(f"--flagfile={flagfile}"),
                        "error: unknown config key config.train.setps (did you mean config.train.steps?)")


@pytest.mark.parametrize("args, line", [
    (["--config.train.steps=abc"], "error: config.train.steps: cannot parse 'abc' as int"),
    (["--config.train.learning_rate=fast"],
     "error: config.train.learning_rate: cannot parse 'fast' as float"),
    (["--config.train.export=maybe"], "error: config.train.export: cannot parse 'maybe' as bool"),
])
def test_wrong_type_is_one_line_naming_the_key(args, line):
  assert_one_line_error(run_py(*args), line)


def test_other_flag_errors_are_one_line():
  assert_one_line_error(run_py("--nosuchflag=1"), "error: Unknown command line flag 'nosuchflag'")
