"""The research experiments run end to end in their --quick modes and write what they promise."""
import csv
import json
import os

import jax.numpy as jnp
import numpy as np
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
    assert row["loss_seed0"] == row["final_eval_loss"] and float(row["loss_range"]) == 0  # one seed
  for name in ("loss_curves.png", "expert_load_mixtral_lb_dropless.png", "expert_load_switch_lb.png"):
    assert os.path.getsize(tmp_path / name) > 1000
  assert "| switch_lb | switch |" in (tmp_path / "ablation.md").read_text()


def test_routing_ablation_rows_average_over_seeds():
  from experiments.routing_ablation import run
  runs = {seed: dict(final_eval_loss=loss, first_eval_loss=5.0, tokens_dropped_pct=drop, load_cv=0.5,
                     dead_experts=dead, step_time_ms=100.0)
          for seed, loss, drop, dead in [(0, 3.0, 1.0, 0), (3, 3.5, 3.0, 1)]}
  row = run.arm_row("switch_lb", runs)
  assert (row["final_eval_loss"], row["loss_range"], row["tokens_dropped_pct"], row["dead_experts"]) == (3.25, 0.5, 2.0, 0.5)
  assert (row["loss_seed0"], row["loss_seed3"], row["router"], row["dispatch"]) == (3.0, 3.5, "switch", "dropless")
  table = run.markdown([row, dict(row, arm="hash", final_eval_loss=3.1)], steps=10, seeds=[0, 3])
  assert table.index("| hash |") < table.index("| switch_lb |")  # best (lowest loss) first


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


def test_decode_matvec_loop_quick(tmp_path):
  from experiments import decode_matvec_loop
  layers, head = decode_matvec_loop.make_weights(dim=8, ffn=12, layers=2, vocab=32, kv=4)
  assert decode_matvec_loop.step_bytes(layers, head) == 4 * (2 * (8 * 8 * 2 + 8 * 4 * 2 + 8 * 8 + 2 * 3 * 8 * 12)
                                                              + 8 * 32)
  x = jnp.ones((1, 8), jnp.float32)
  outs = [decode_matvec_loop.decode_loop(v, tokens=3)(x, layers, head) for v in ("fixed", "cond", "switch")]
  assert np.all(np.isfinite(outs[0])) and np.allclose(outs[1], outs[2], rtol=1e-6)  # cond = switch: same experts
  decode_matvec_loop.main(["--quick", "--repeats=1", f"--out={tmp_path / 'loop'}"])
  assert {r["variant"] for r in json.loads((tmp_path / "loop.json").read_text())["rows"]} == {"fixed", "cond", "switch"}
