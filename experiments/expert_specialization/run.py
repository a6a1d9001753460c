"""Expert specialisation: train on a mixture of distinguishable tasks, then ask which experts each task and
each token class routes to, per layer (in the spirit of the Mixtral paper's routing analysis, sec. 5).

    python experiments/expert_specialization/run.py [--quick] [--steps N] [--out DIR]

Writes OUT/routing_by_task.csv, OUT/routing_by_token_class.csv, OUT/specialization.md (tables and a
summary: how far each task's expert distribution is from the overall one) and OUT/heatmap.png.
Default OUT = experiments/results/expert_specialization.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402
from experiments.expert_specialization.tasks import TASKS, documents, token_class  # noqa: E402


def make_config(data_path: str, steps: int):
  config = tiny.get_config()
  config.model.update(dict(vocab_size=263, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           ffn_dim=128, num_experts=8, top_k=2, max_positions=512))
  # config.run stays the default: dropless training (exact), the backend's fastest inference for the analysis.
  config.data.update(dict(paths=data_path, tokenizer="bytes", eval_fraction=0.1))
  t = config.train
  t.steps, t.batch_size, t.seq_len, t.warmup_steps, t.learning_rate = steps, 8, 128, max(1, steps // 10), 3e-3
  t.eval_every, t.eval_batches, t.log_every = max(1, steps // 2), 2, max(1, steps // 10)
  t.checkpoint_every, t.keep_checkpoints, t.sample_tokens, t.export = 10 ** 9, 1, 0, True
  config.logging.update(dict(wandb="disabled", progress=False, plot=False))
  return config


def routing_counts(model, docs, num_experts: int, seq_len: int):
  """Per task and per token class: [L, E] counts of routing slots, from one forward pass on the held-out
  docs right-padded to seq_len (one compiled shape; causal attention and per-token routing mean a token
  routes as it would alone, and the padding after it is not counted)."""
  import jax
  import jax.numpy as jnp
  from mixtral_jax.training.data import ByteTokenizer
  tok = ByteTokenizer()
  ids = [tok.encode(text, bos=False)[:seq_len] for _, text in docs]
  tokens = np.zeros((len(docs), seq_len), np.int32)  # [N, T]
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
  experts = np.asarray(jax.jit(lambda m, t: m(t).router.experts)(model, jnp.asarray(tokens)))  # [L, N, T, k]
  by_task, by_class = {}, {}
  for (task, _), row, doc_experts in zip(docs, ids, experts.transpose(1, 0, 2, 3)):
    layers, n = doc_experts.shape[0], len(row)
    onehot = np.zeros((layers, n, num_experts))  # [L, T, E]
    for layer in range(layers):
      for k in range(doc_experts.shape[-1]):
        onehot[layer, np.arange(n), doc_experts[layer, :n, k]] += 1
    by_task[task] = by_task.get(task, 0) + onehot.sum(axis=1)
    for pos, byte in enumerate(row):
      cls = token_class(byte - 3)
      by_class[cls] = by_class.get(cls, 0) + onehot[:, pos]
  return by_task, by_class


def total_variation(p, q) -> float:
  return 0.5 * float(np.abs(p - q).sum())


def write_tables(out_dir, by_task, by_class):
  rows_task, rows_class = [], []
  overall = sum(by_task.values())
  overall = overall / overall.sum(axis=-1, keepdims=True)
  lines = ["# Expert specialisation", "",
           "Fraction of each task's routing slots per expert, per layer, and the total-variation distance",
           "from the all-task distribution (0 = routes like everyone else, 1 = disjoint experts).", ""]
  for name, table, rows in (("task", by_task, rows_task), ("token class", by_class, rows_class)):
    num_experts = next(iter(table.values())).shape[-1]
    lines += [f"## By {name}", "", f"| {name} | layer | " + " | ".join(f"e{e}" for e in range(num_experts))
              + " | TV vs all |", "|---|---|" + "---|" * (num_experts + 1)]
    for key, counts in sorted(table.items()):
      frac = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
      for layer, row in enumerate(frac):
        tv = total_variation(row, overall[layer])
        rows.append({name.replace(" ", "_"): key, "layer": layer, **{f"e{e}": round(float(x), 4)
                                                                        for e, x in enumerate(row)},
                     "tv_vs_all": round(tv, 4)})
        lines.append(f"| {key} | {layer} | " + " | ".join(f"{x:.2f}" for x in row) + f" | {tv:.2f} |")
    lines.append("")
  for fname, rows in (("routing_by_task.csv", rows_task), ("routing_by_token_class.csv", rows_class)):
    with open(os.path.join(out_dir, fname), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  with open(os.path.join(out_dir, "specialization.md"), "w") as f:
    f.write("\n".join(lines))
  return rows_task


def heatmap(out_dir, by_task):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = sorted(by_task)
  layers = next(iter(by_task.values())).shape[0]
  fig, axes = plt.subplots(1, layers, figsize=(3.5 * layers, 2.8), squeeze=False)
  for layer in range(layers):
    grid = np.stack([by_task[t][layer] / by_task[t][layer].sum() for t in tasks])  # [tasks, E]
    im = axes[0, layer].imshow(grid, aspect="auto", cmap="magma", vmin=0)
    axes[0, layer].set_yticks(range(len(tasks)), tasks, fontsize=7)
    axes[0, layer].set_xlabel("expert"), axes[0, layer].set_title(f"layer {layer}", fontsize=9)
  fig.colorbar(im, ax=axes[0, -1], label="share of routing slots")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "heatmap.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "expert_specialization"))
  args = parser.parse_args(argv)
  from mixtral_jax.checkpoints.store import load_model
  from mixtral_jax.training.train import train_and_evaluate
  steps, per_task = (4, 20) if args.quick else (args.steps, 400)
  os.makedirs(args.out, exist_ok=True)
  workdir = os.path.join(args.out, "run")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  data_path = os.path.join(workdir, "mixture.jsonl")
  with open(data_path, "w") as f:
    for _, text in documents(per_task, seed=0):
      f.write(json.dumps({"text": text}) + "\n")
  config = make_config(data_path, steps)
  summary = train_and_evaluate(config, workdir)
  model = load_model(summary["export"])
  heldout = documents(4 if args.quick else 20, seed=1)  # a different seed: unseen samples
  by_task, by_class = routing_counts(model, heldout, config.model.num_experts, config.train.seq_len)
  rows = write_tables(args.out, by_task, by_class)
  heatmap(args.out, by_task)
  print(open(os.path.join(args.out, "specialization.md")).read())
  return rows


if __name__ == "__main__":
  main()
