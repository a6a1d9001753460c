"""Sparse upcycling vs training the MoE from scratch, at the same training compute (one command).

    python experiments/upcycling/run.py            # the tiny model on the default corpus (~20 min, 2 cores)
    python experiments/upcycling/run.py --quick    # a few steps of each arm (the test suite runs this)

Arms, all the default run's tiny model (configs/tiny.py: Mixtral tokenizer, Python standard library sources,
8 x 128 tokens per step, same seed and held-out set):
  dense            the model with one expert and top-1 (a dense Mistral-style FFN), DENSE steps
  upcycled         `python -m mixtral_jax.convert --upcycle --num-experts 8 --top-k 2` of dense's final
                   checkpoint, then trained (configs/finetune.py) for MOE steps
  dense_continued  dense trained on (configs/finetune.py, same learning rate) for the steps that cost what
                   upcycled's MOE steps cost
  scratch          the 8-expert top-2 model from random weights for the steps that cost dense + upcycled
Training compute is counted as matmul FLOPs per token (experiments/bench_train.model_flops_per_token: 6 x the
active matmul parameters plus attention), so the arms are compared at equal FLOPs, not equal steps. Writes
OUT/upcycling.md (+ .json): final held-out loss of each arm and the held-out loss of every arm at the same
compute points, and OUT/upcycling.png (held-out loss against training FLOPs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import base  # noqa: E402
from experiments import report  # noqa: E402
from experiments.bench_train import model_flops_per_token  # noqa: E402
from mixtral_jax.config import model_config_from  # noqa: E402

NUM_EXPERTS, TOP_K = 8, 2
CONTINUE_LR = 1e-3  # upcycled and dense_continued: the dense run ends at 3e-4 (cosine to 0.1 x 3e-3)


def model_cfg(num_experts: int, top_k: int):
  model = base.tiny_model()
  model.update(dict(num_experts=num_experts, top_k=top_k))
  return model_config_from(model)


def common_flags(steps: int, eval_every: int, eval_batches: int) -> list:
  return [f"--config.train.steps={steps}", f"--config.train.eval_every={eval_every}",
          f"--config.train.eval_batches={eval_batches}", "--config.train.sample_tokens=0",
          f"--config.train.checkpoint_every={steps}", "--config.train.keep_checkpoints=1",
          "--config.logging.wandb=disabled", "--config.logging.progress=False", "--config.logging.plot=False"]


def run(argv: list, log: str) -> float:
  start = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    sys.exit(f"error: {' '.join(argv[:3])} failed (exit {proc.returncode}); see {log}")
  return time.perf_counter() - start


def train(workdir: str, steps: int, flags: list, args, *, checkpoint: str = "", lr: float = 0.0) -> float:
  """run.py training into `workdir` (skipped when its metrics already reach `steps`: rerunning the
  experiment only runs the arms that are missing). Returns seconds (0 when skipped)."""
  if _last_step(workdir) >= steps:
    return 0.0
  config = "configs/finetune.py" if checkpoint else "configs/tiny.py"
  argv = ["run.py", f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}", *flags,
          *common_flags(steps, args.eval_every, args.eval_batches)]
  if checkpoint:
    argv += [f"--config.checkpoint={checkpoint}", f"--config.train.learning_rate={lr}",
             f"--config.train.warmup_steps={max(1, steps // 10)}", "--config.train.end_lr_fraction=0.1",
             "--config.train.export=False", "--config.train.export_hf=False", "--config.train.weight_decay=0.1"]
  return run(argv, workdir + ".log")


def _records(workdir: str) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _last_step(workdir: str) -> int:
  evals = [r["step"] for r in _records(workdir) if "eval_loss" in r]
  return max(evals, default=-1)


def curve(workdir: str, flops_per_step: float, offset: float = 0.0) -> list:
  """[(training FLOPs, held-out loss)] of a run, its FLOPs starting at `offset`."""
  return [(offset + r["step"] * flops_per_step, r["eval_loss"]) for r in _records(workdir) if "eval_loss" in r]


def at(points: list, flops: float) -> float:
  """Held-out loss at `flops` by linear interpolation between evaluations (nan outside the run; a run that
  stops within 2% short of `flops`, from rounding its step count, gives its last value)."""
  if points and points[-1][0] < flops <= points[-1][0] * 1.02:
    return points[-1][1]
  for (f0, l0), (f1, l1) in zip(points, points[1:]):
    if f0 <= flops <= f1:
      return l0 + (l1 - l0) * (flops - f0) / max(f1 - f0, 1e-9)
  return float("nan")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "upcycling"))
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdir", "upcycling"))
  p.add_argument("--dense-steps", type=int, default=200)
  p.add_argument("--moe-steps", type=int, default=200)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--quick", action="store_true", help="3 + 3 steps, a small model (tests)")
  args = p.parse_args(argv)
  extra = []
  if args.quick:
    args.dense_steps, args.moe_steps, args.eval_every, args.eval_batches = 3, 3, 3, 1
    extra = ["--config.train.batch_size=2", "--config.train.seq_len=32", "--config.data.chunk_chars=2000"]
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  seq_len = 32 if args.quick else base.train_config().seq_len
  tokens_per_step = (2 if args.quick else base.train_config().batch_size) * seq_len
  dense_step = model_flops_per_token(model_cfg(1, 1), seq_len) * tokens_per_step
  moe_step = model_flops_per_token(model_cfg(NUM_EXPERTS, TOP_K), seq_len) * tokens_per_step
  continued_steps = round(args.moe_steps * moe_step / dense_step)
  scratch_steps = round((args.dense_steps * dense_step + args.moe_steps * moe_step) / moe_step)
  w = lambda name: os.path.join(args.workdir, name)  # noqa: E731

  seconds = {}
  seconds["dense"] = train(w("dense"), args.dense_steps, extra + ["--config.model.num_experts=1",
                                                                 "--config.model.top_k=1"], args)
  seconds["dense_continued"] = train(w("dense_continued"), continued_steps, extra, args, checkpoint=w("dense"),
                                     lr=CONTINUE_LR)
  seconds["scratch"] = train(w("scratch"), scratch_steps, extra, args)
  upcycled_ckpt = w("upcycled_checkpoint")
  if not os.path.exists(upcycled_ckpt):
    seconds["upcycle"] = run(["-m", "mixtral_jax.convert", "--upcycle", "--num-experts", str(NUM_EXPERTS),
                              "--top-k", str(TOP_K), w("dense"), upcycled_ckpt], upcycled_ckpt + ".log")
  seconds["upcycled"] = train(w("upcycled"), args.moe_steps, extra, args, checkpoint=upcycled_ckpt, lr=CONTINUE_LR)

  dense_total = args.dense_steps * dense_step
  curves = {"dense": curve(w("dense"), dense_step),
            "upcycled": curve(w("upcycled"), moe_step, dense_total),
            "dense_continued": curve(w("dense_continued"), dense_step, dense_total),
            "scratch": curve(w("scratch"), moe_step)}
  total = dense_total + args.moe_steps * moe_step
  continuation = args.moe_steps * moe_step
  rows = [dict(arm=name, steps=_last_step(w(name)), final_flops=points[-1][0], final_loss=points[-1][1])
          for name, points in curves.items()]
  # Equal total compute (the dense run counted), and equal compute after the dense checkpoint exists
  # (the dense run a sunk cost: what upcycling is for), both against the MoE trained from scratch.
  comparisons = dict(
      total=dict(flops=total, **{n: at(curves[n], total) for n in ("upcycled", "dense_continued", "scratch")}),
      sunk=dict(flops=continuation, upcycled=at(curves["upcycled"], total), scratch=at(curves["scratch"], continuation)))
  result = dict(dense_steps=args.dense_steps, moe_steps=args.moe_steps, continued_steps=continued_steps,
                scratch_steps=scratch_steps, flops_per_step=dict(dense=dense_step, moe=moe_step),
                comparisons=comparisons, rows=rows, curves=curves, seconds=seconds,
                continue_learning_rate=CONTINUE_LR, quick=args.quick)
  report.write_results(os.path.join(args.out, "upcycling"), result, table_lines(result))
  plot(curves, dense_total, os.path.join(args.out, "upcycling.png"))


def table_lines(result: dict) -> list:
  pf = lambda f: f"{f / 1e12:.2f}"  # noqa: E731
  cell = lambda x: f"{x:.3f} ({math.exp(x):,.0f})" if x == x else "—"  # noqa: E731
  c = result["comparisons"]
  lines = [f"# Sparse upcycling vs from scratch (tiny model, default corpus{', QUICK' if result['quick'] else ''})", "",
           f"dense {result['dense_steps']} steps (1 expert) -> `convert --upcycle --num-experts {NUM_EXPERTS} --top-k "
           f"{TOP_K}` -> trained {result['moe_steps']} steps (peak lr {result['continue_learning_rate']}, warmup, "
           f"cosine); dense_continued: {result['continued_steps']} more dense steps, same schedule; scratch: "
           f"{result['scratch_steps']} steps from random weights (the default run's schedule). Training TFLOPs "
           f"per step: dense {pf(result['flops_per_step']['dense'])}, MoE {pf(result['flops_per_step']['moe'])}.", "",
           "| arm | steps | training TFLOPs (from the dense run's start) | final held-out nats/token (ppl) |",
           "|---|---:|---:|---:|"]
  offsets = {"upcycled": result["dense_steps"] * result["flops_per_step"]["dense"],
             "dense_continued": result["dense_steps"] * result["flops_per_step"]["dense"]}
  for row in result["rows"]:
    lines.append(f"| {row['arm']} | {row['steps']} | {pf(row['final_flops'])} | {cell(row['final_loss'])} |")
  lines += ["", f"At equal total compute ({pf(c['total']['flops'])} TFLOPs, the dense run counted): upcycled "
            f"{cell(c['total']['upcycled'])}, dense_continued {cell(c['total']['dense_continued'])}, scratch "
            f"{cell(c['total']['scratch'])}.",
            f"At equal compute after the dense checkpoint exists ({pf(c['sunk']['flops'])} TFLOPs, the dense run a "
            f"sunk cost): upcycled {cell(c['sunk']['upcycled'])}, scratch {cell(c['sunk']['scratch'])}.",
            f"(The upcycled and dense_continued curves start at {pf(offsets['upcycled'])} TFLOPs.)"]
  return lines


def plot(curves: dict, dense_total: float, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, points in curves.items():
    ax.plot([f / 1e12 for f, _ in points], [l for _, l in points], marker=".", label=name)
  ax.axvline(dense_total / 1e12, color="grey", linestyle="--", linewidth=0.8)
  ax.set_xlabel("training TFLOPs")
  ax.set_ylabel("held-out cross-entropy (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  main()
