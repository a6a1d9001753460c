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


def _run_script(*argv):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_bench_attention_quick(tmp_path):
  """experiments/bench_attention.py end to end at tiny heads: every implementation timed at every T and pass,
  ratios against HF and xla, temp memory, the default's check against HF's sdpa, the model-API layer."""
  from mixtral_jax.execution import Execution, resolve
  _run_script("experiments/bench_attention.py", "--quick", "--repeats=1", "--warmup=0", f"--out={tmp_path}")
  record = json.loads((tmp_path / "bench_attention.json").read_text())
  md = (tmp_path / "bench_attention.md").read_text()
  run = resolve(Execution())
  assert record["check"]["ok"] and record["check"]["default_fwd_rel_err"] <= 1e-4
  assert {(c["t"], c["mode"]) for c in record["cells"]} == {(t, m) for t in (64, 2048) for m in ("fwd", "fwd+bwd")}
  for cell in record["cells"]:
    assert set(cell["arms"]) == {"default", "xla", "flash", "hf"}
    assert cell["default_runs"] == ("xla" if cell["t"] < run.attention_min_len else run.attention)
    for arm, row in cell["arms"].items():
      assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["gflops"] > 0
      if arm != "hf":
        assert row["temp_bytes"] > 0 and row["rel_err_vs_hf"] < 1e-4 and row["vs_hf"]["median"] > 0
  assert 0 < record["peak_gflops"] and record["flops_convention"].startswith("causal forward")
  for label in ("ours (default)", "xla (block-causal, materialised)", "flash (forced)", "HF (torch sdpa)"):
    assert md.count(f"| {label} |") == 4 + 2  # 2 T x 2 passes, + the layer section's 2 T
  layer = record["layer"]["cells"]
  assert [c["t"] for c in layer] == [64, 2048]
  assert all(set(c["arms"]) == {"default", "xla", "flash", "hf"} for c in layer)
  assert layer[1]["arms"]["flash"]["runs"] == "flash" and layer[1]["arms"]["xla"]["runs"] == "xla"


def test_bench_attention_skips_programs_over_the_memory_limit(tmp_path):
  """A program whose compiled temp memory exceeds --max-temp-gib is compiled, measured and not run; the
  peer still is. Also the FLOP convention and the default's implementation rule."""
  from experiments import bench_attention as ba
  from mixtral_jax.execution import Execution
  assert ba.causal_flops(1, 32, 8192, 128, "fwd") == 4 * 32 * 8192 ** 2 * 128 / 2
  assert ba.causal_flops(1, 32, 8192, 128, "fwd+bwd") == 3.5 * ba.causal_flops(1, 32, 8192, 128, "fwd")
  run = Execution(attention="flash", attention_min_len=2048)
  assert (ba.resolved_impl(run, 2047), ba.resolved_impl(run, 2048)) == ("xla", "flash")
  record = ba.main(["--quick", "--seqs=32", "--modes=fwd+bwd", "--no-layer", "--max-temp-gib=0", "--repeats=1",
                    "--warmup=0", "--host-memory=default", f"--out={tmp_path}"])
  (cell,) = record["cells"]
  for arm in ("default", "xla", "flash"):
    assert cell["arms"][arm]["skipped"].startswith("skipped: ") and cell["arms"][arm]["temp_bytes"] > 0
  assert cell["arms"]["hf"]["median_ms"] > 0
  assert "| 32 | fwd+bwd | xla (block-causal, materialised) | xla | skipped: " in (tmp_path / "bench_attention.md").read_text()


@pytest.mark.slow
def test_gpu_bench_dry_run_long_context_sections(tmp_path):
  """The gpu_bench sections added for attention (prefill_32k, train_8k) in the CPU dry run: flash timed, every
  other registered kernel a number or a one-line error (no CUDA here), the implementation recorded. The
  other benches' dry run is tests/test_inference.py::test_gpu_bench_dry_run."""
  from mixtral_jax.attention import ATTENTIONS
  out = tmp_path / "gpu.json"
  _run_script("experiments/gpu_bench.py", "--dry_run", "--repeats=1", "--only=prefill_32k,train_8k", f"--out={out}")
  benches = json.loads(out.read_text())["benches"]
  assert set(benches) == {"prefill_32k", "train_8k"}
  names = [n for n in ("flash", "cudnn", "pallas_gpu") if n in ATTENTIONS]
  for name, key in (("prefill_32k", "tok_s"), ("train_8k", "step_s")):
    bench = benches[name]
    assert "error" not in bench and list(bench["attentions"]) == names, bench
    flash = bench["attentions"]["flash"]
    assert flash[key] > 0 and flash["attention"] == "flash" and flash["compile_and_first_s"] > 0
    for cell in bench["attentions"].values():
      assert key in cell or ("error" in cell and "\n" not in cell["error"]), cell
  assert benches["prefill_32k"]["tok_s"] > 0 and benches["prefill_32k"]["default_attention"] in ATTENTIONS
  assert benches["train_8k"]["attentions"]["flash"]["remat"] == "full"
  assert benches["train_8k"]["attentions"]["flash"]["of_measured_peak"] > 0


def test_gpu_bench_long_context_cells_respect_the_time_budget(tmp_path):
  from experiments import gpu_bench
  result = gpu_bench.main(["--dry_run", "--only=prefill_32k", "--budget_s=0", f"--out={tmp_path / 'gpu.json'}"])
  cells = result["benches"]["prefill_32k"]["attentions"]
  assert cells and all(c["skipped"].startswith("time budget") for c in cells.values())


def test_upcycling_compares_at_equal_compute():
  from experiments.upcycling import run
  points = [(0.0, 5.0), (10.0, 4.0), (20.0, 3.0)]
  assert run.at(points, 15.0) == 3.5 and run.at(points, 0.0) == 5.0
  assert run.at(points, 20.3) == 3.0  # a run stopping short by a rounded step gives its last value
  assert run.at(points, 25.0) != run.at(points, 25.0)  # nan: outside the run


@pytest.mark.slow
def test_upcycling_quick(tmp_path):
  from experiments.upcycling import run
  run.main(["--quick", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")])
  result = json.loads((tmp_path / "out" / "upcycling.json").read_text())
  assert [r["arm"] for r in result["rows"]] == ["dense", "upcycled", "dense_continued", "scratch"]
  # the upcycled run starts from the dense model's function: its first held-out loss is the dense run's last
  dense_last, upcycled_first = result["curves"]["dense"][-1][1], result["curves"]["upcycled"][0][1]
  assert abs(dense_last - upcycled_first) < 1e-4
  assert os.path.getsize(tmp_path / "out" / "upcycling.png") > 1000
  assert "| scratch |" in (tmp_path / "out" / "upcycling.md").read_text()


def test_routing_analysis_on_a_tiny_model(tmp_path):
  from experiments import routing_analysis as ra
  from mixtral_jax.config import ModelConfig
  from mixtral_jax.model import build
  from mixtral_jax.training.data import ByteTokenizer
  model = build(ModelConfig(vocab_size=263, dim=24, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=12,
                            ffn_dim=40, num_experts=5, top_k=2), seed=1)
  tokens = np.random.default_rng(0).integers(3, 263, (2, 17)).astype(np.int32)
  segments = np.asarray([[1] * 17, [1] * 9 + [2] * 6 + [0] * 2], np.int32)  # two documents, padding
  positions = np.asarray([list(range(17)), list(range(9)) + list(range(6)) + [0, 0]], np.int32)
  stats = ra.statistics(model, [dict(tokens=tokens, positions=positions, segment_ids=segments)])
  assert stats["tokens"] == 32 and stats["pairs"] == 16 + 8 + 5  # no pair across documents or into padding
  for name in ("first_choice", "top_k_overlap", "entropy", "load_entropy"):
    assert len(stats[name]) == 2 and all(0 <= v <= 1 for v in stats[name])
  assert np.asarray(stats["coactivation"]).shape == (2, 5, 5)
  lines = ra.table(stats, stats, 5, 2)
  assert len(lines) == 4 + 2 and lines[-1].startswith("| 1 |")
  ra.colour_tokens(model, ByteTokenizer(), "def f(x):\n  return x + 1\n", str(tmp_path / "c.png"))
  assert os.path.getsize(tmp_path / "c.png") > 1000
