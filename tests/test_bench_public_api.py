"""experiments/bench_public_api.py --quick runs end to end and writes every measurement it promises."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~1 min on 2 cores: an HF model, a conversion, three compiles and two eval processes
def test_bench_public_api_quick(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_public_api.py"), "--quick",
                         "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((tmp_path / "bench_public_api.json").read_text())
  m = record["measurements"]
  assert set(m) == {"forward", "generate_b1", "generate_b8", "eval"}
  for name in ("forward", "generate_b1", "generate_b8"):
    row = m[name]
    for side in ("ours", "hf"):
      assert len(row[side]["seconds"]) == 1 and row[side]["tok_s_median"] > 0 and row[side]["tok_s_best"] > 0
    assert row["ours_compile_s"] > 0 and row["hf_first_call_s"] > 0 and row["ratio_median"] > 0
  for name in ("generate_b1", "generate_b8"):
    assert 0.0 <= m[name]["agreement"]["fraction_equal"] <= 1.0
  # Same weights on both sides: float32 logits agree to rounding (a wrong conversion would be O(1)).
  assert m["forward"]["logits_rel_err"] < 1e-4
  assert m["forward"]["ours_mfu"] > 0 and m["forward"]["hf_mfu"] > 0
  e = m["eval"]
  assert e["runs"][0]["wall_s"] > 0 and e["runs"][0]["tok_s"] > 0
  assert e["tok_s_median"] > 0 and 0 < e["runs"][0]["tokens"] <= e["batch_size"] * e["seq_len"] * e["max_batches"]
  assert record["machine"]["host_memory"] in ("retain", "default")
  table = (tmp_path / "bench_public_api.md").read_text()
  assert "| what the user calls | ours | HF | ratio (range) | goal |" in table
  assert table.count(">= ") >= 4  # one goal per measurement
