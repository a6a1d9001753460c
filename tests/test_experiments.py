"""The research experiments run end to end in their --quick modes and write what they promise."""
import csv
import os

import pytest




@pytest.mark.slow
def test_routing_ablation_quick(tmp_path):
  from experiments.routing_ablation import run
  rows = run.main(["--quick", "--out", str(tmp_path)])
  assert {r["arm"] for r in rows} == {"mixtral_lb_dropless", "switch_lb"}
  with open(tmp_path / "ablation.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 2
  for row in table:
    for field in ("final_eval_loss", "tokens_dropped_pct", "load_cv", "dead_experts", "step_time_ms"):
      assert row[field] != ""
    assert float(row["final_eval_loss"]) < float(row["first_eval_loss"])  # even 4 steps learn something
  for name in ("loss_curves.png", "expert_load_mixtral_lb_dropless.png", "expert_load_switch_lb.png"):
    assert os.path.getsize(tmp_path / name) > 1000


@pytest.mark.slow
def test_expert_specialization_quick(tmp_path):
  from experiments.expert_specialization import run
  from experiments.expert_specialization.tasks import TASKS
  rows = run.main(["--quick", "--out", str(tmp_path)])
  assert {r["task"] for r in rows} == set(TASKS)
  for row in rows:  # each row is a distribution over experts (top-2: fractions of slots sum to 1)
    assert abs(sum(row[f"e{e}"] for e in range(8)) - 1.0) < 1e-3
    assert 0.0 <= row["tv_vs_all"] <= 1.0
  assert os.path.getsize(tmp_path / "heatmap.png") > 1000
  assert "By token class" in (tmp_path / "specialization.md").read_text()


def test_run_benchmarks_collect_lists_every_benchmark(tmp_path, monkeypatch):
  from experiments import run_benchmarks
  monkeypatch.setattr(run_benchmarks, "RESULTS", str(tmp_path))
  (tmp_path / "bench_moe.md").write_text("# MoE\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
  assert run_benchmarks.main(["--collect"]) == 0
  text = (tmp_path / "BENCHMARKS.md").read_text()
  for name in run_benchmarks.BENCHMARKS:
    assert f"## {name}:" in text
  assert "### MoE" in text and "| 1 | 2 |" in text and "_not run yet: `python experiments/bench_train.py`_" in text
