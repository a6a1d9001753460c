"""Routing ablation: one training run per arm (arms.py) on the same data, seed and model; one command.

    python experiments/routing_ablation/run.py            # 12 arms x 2 seeds x 250 steps (~11 min, 2 cores)
    python experiments/routing_ablation/run.py --quick    # 2 arms x a few steps (the test suite runs this)

Every arm runs once per seed (--seeds; the seed sets initialisation, data order and router noise), so a
difference between arms can be read against the spread between seeds of one arm. Writes OUT/ablation.csv
(per arm: mean final held-out loss over seeds and its range, tokens dropped, load CV, dead experts, step
time; per-seed losses), OUT/ablation.md (the same, best arm first), OUT/loss_curves.png and
OUT/expert_load_<arm>.png (seed 0: expert load per layer over training), default
OUT = experiments/results/routing_ablation.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402
from experiments.routing_ablation.arms import ARMS, QUICK_ARMS  # noqa: E402


def arm_config(name: str, *, steps: int, seed: int = 0):
  """The shared small setup (byte-level tokens keep the vocabulary at 263, so the 15-minute budget goes to
  the expert layers, not a 32k softmax) with this arm's routing fields: the router and model fields in
  config.model, the dispatch strategy (training, and the held-out evaluation that follows it) and its
  execution fields in config.run."""
  router, aux, dispatch, model_fields, run_fields = ARMS[name]
  config = tiny.get_config()
  config.seed = seed
  config.model.update(dict(vocab_size=263, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           ffn_dim=128, num_experts=8, top_k=2, router=router, max_positions=512))
  config.model.update(model_fields)
  config.run.train_dispatch = dispatch
  config.run.update(run_fields)
  config.data.tokenizer = "bytes"
  t = config.train
  t.steps, t.batch_size, t.seq_len = steps, 8, 128
  t.warmup_steps = max(1, steps // 10)
  t.learning_rate = 3e-3
  t.aux_losses = dict(aux)
  t.eval_every, t.eval_batches, t.log_every = max(1, steps // 4), 2, max(1, steps // 20)
  t.checkpoint_every, t.keep_checkpoints, t.sample_tokens = 10 ** 9, 1, 0
  config.logging.update(dict(wandb="disabled", progress=False, plot=False))
  return config


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarise(name, records, summary, wall):
  """One run's end-of-training routing statistics from its metrics.jsonl."""
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  last = train[-1]
  load = np.asarray(last["expert_load"], np.float64)  # [L, E]
  cfg_steps = summary["step"] - summary["start_step"]
  return {
      "final_eval_loss": evals[-1]["eval_loss"], "first_eval_loss": evals[0]["eval_loss"],
      "tokens_dropped_pct": 100 * float(np.mean(last.get("dropped_fraction", [0.0]))),
      "load_cv": float(np.mean(last["load_cv"])), "dead_experts": int(np.sum(load == 0)),
      "step_time_ms": 1000 * wall / max(cfg_steps, 1),  # compile amortised over the run
  }


def arm_row(name, runs: dict) -> dict:
  """The CSV row of one arm: means over its seeds' runs ({seed: summarise(...)}), the loss range, and
  each seed's final loss."""
  mean = lambda key: float(np.mean([r[key] for r in runs.values()]))  # noqa: E731
  losses = [r["final_eval_loss"] for r in runs.values()]
  row = {"arm": name, "router": ARMS[name][0], "aux_losses": "+".join(ARMS[name][1]) or "none",
         "dispatch": ARMS[name][2], "final_eval_loss": round(mean("final_eval_loss"), 4),
         "loss_range": round(max(losses) - min(losses), 4), "first_eval_loss": round(mean("first_eval_loss"), 4),
         "tokens_dropped_pct": round(mean("tokens_dropped_pct"), 3), "load_cv": round(mean("load_cv"), 4),
         "dead_experts": round(mean("dead_experts"), 2), "step_time_ms": round(mean("step_time_ms"), 1)}
  row.update({f"loss_seed{seed}": round(r["final_eval_loss"], 4) for seed, r in runs.items()})
  return row


def markdown(rows, steps: int, seeds) -> str:
  lines = [f"# Routing ablation: {len(rows)} arms x seeds {', '.join(map(str, seeds))}, {steps} steps each", "",
           "Final held-out loss (nats/byte, mean over seeds; range = max - min over seeds), best first. Arms whose "
           "means differ by less than the ranges are not distinguished by this run.", "",
           "| arm | router | aux losses | dispatch | held-out loss | range | dropped % | load CV | dead experts | "
           "step ms |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in sorted(rows, key=lambda r: r["final_eval_loss"]):
    lines.append(f"| {r['arm']} | {r['router']} | {r['aux_losses']} | {r['dispatch']} | {r['final_eval_loss']:.4f} | "
                 f"{r['loss_range']:.4f} | {r['tokens_dropped_pct']:.1f} | {r['load_cv']:.3f} | "
                 f"{r['dead_experts']:g} | {r['step_time_ms']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(out_dir, curves, loads):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, (steps, losses) in curves.items():
    ax.plot(steps, losses, label=name)
  ax.set_xlabel("step"), ax.set_ylabel("train loss (nats/token)"), ax.set_title("routing ablation")
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=110)
  plt.close(fig)
  for name, (steps, load) in loads.items():  # load [S, L, E]
    layers = load.shape[1]
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 2.8), squeeze=False)
    for layer in range(layers):
      im = axes[0, layer].imshow(load[:, layer].T, aspect="auto", origin="lower", vmin=0, cmap="viridis",
                                 extent=(steps[0], steps[-1], -0.5, load.shape[2] - 0.5))
      axes[0, layer].set_title(f"{name} layer {layer}", fontsize=8)
      axes[0, layer].set_xlabel("step"), axes[0, layer].set_ylabel("expert")
    fig.colorbar(im, ax=axes[0, -1], label="load fraction")
    fig.savefig(os.path.join(out_dir, f"expert_load_{name}.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 arms x 4 steps (smoke test)")
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--seeds", default="", help="comma-separated seeds, every arm runs once per seed "
                      "(default 0,1; --quick: 0)")
  parser.add_argument("--arms", default="", help="comma-separated subset of arms.py")
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "routing_ablation"))
  args = parser.parse_args(argv)
  from mixtral_jax.training.train import train_and_evaluate
  names = args.arms.split(",") if args.arms else list(QUICK_ARMS if args.quick else ARMS)
  steps = 4 if args.quick else args.steps
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
  os.makedirs(args.out, exist_ok=True)
  rows, curves, loads = [], {}, {}
  for name in names:
    runs = {}
    for seed in seeds:
      workdir = os.path.join(args.out, "runs", name, f"seed{seed}")
      if os.path.exists(workdir):  # an ablation restarts every arm from scratch
        import shutil
        shutil.rmtree(workdir)
      t0 = time.perf_counter()
      summary = train_and_evaluate(arm_config(name, steps=steps, seed=seed), workdir)
      wall = time.perf_counter() - t0
      records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
      runs[seed] = summarise(name, records, summary, wall)
      if seed == seeds[0]:
        train = [r for r in records if "loss" in r]
        curves[name] = ([r["step"] for r in train], [r["loss"] for r in train])
        loads[name] = ([r["step"] for r in train], np.asarray([r["expert_load"] for r in train], np.float64))
    rows.append(arm_row(name, runs))
    print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(args.out, "ablation.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(args.out, "ablation.md"), "w") as f:
    f.write(markdown(rows, steps, seeds))
  plot(args.out, curves, loads)
  print(f"wrote {os.path.join(args.out, 'ablation.csv')}")
  return rows


if __name__ == "__main__":
  main()
