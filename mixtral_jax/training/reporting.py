"""Where training metrics go: metrics.jsonl in the workdir (always), wandb (offline by default, files under
the workdir; `online` when configured; `disabled` turns it off), and a PNG plot of loss and per-layer
expert load at the end.

A metrics record is a flat dict of JSON values; per-layer MoE metrics are lists ([L] or [L, E]). wandb gets
them flattened to scalars (`moe/expert_load/layer0/expert3`).

In a multi-process run every process runs the same training loop and holds the same (globally reduced)
metrics, so only process 0 writes: otherwise N processes would append N copies to one metrics.jsonl on a
shared workdir, start N wandb runs and race on training.png. The others call the same methods, which do
nothing.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
import numpy as np

WANDB_MODES = ("offline", "online", "disabled")


def to_json(value):
  """numpy / jax scalars and arrays -> JSON values (NaN/inf become strings so the file stays JSON)."""
  array = np.asarray(value)
  if array.ndim:
    return [to_json(v) for v in array]
  number = array.item()
  if isinstance(number, float) and not math.isfinite(number):
    return str(number)
  return number


def writes_here() -> bool:
  """Whether this process writes reports (process 0 of a multi-process run; always in a single one)."""
  return jax.process_index() == 0


def flatten(record: dict) -> dict:
  """{'expert_load': [[..]], 'load_cv': [..]} -> {'expert_load/layer0/expert3': .., 'load_cv/layer0': ..}."""
  out = {}
  for key, value in record.items():
    if not isinstance(value, list):
      out[key] = value
      continue
    for layer, row in enumerate(value):
      if isinstance(row, list):
        out.update({f"{key}/layer{layer}/expert{e}": x for e, x in enumerate(row)})
      else:
        out[f"{key}/layer{layer}"] = row
  return out


class MetricsWriter:
  """Appends records to WORKDIR/metrics.jsonl and mirrors them to wandb.

  On resume the file keeps only records up to the restored step, so a killed-and-restarted run leaves the
  same file an uninterrupted one would. On processes other than 0 it writes nothing (module docstring).
  """

  def __init__(self, workdir: str, logging_config, run_config: dict, *, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.wandb = None
    mode = logging_config.wandb
    if mode not in WANDB_MODES:  # checked on every process: a bad config fails everywhere alike
      from mixtral_jax.config import ConfigError
      raise ConfigError(f"config.logging.wandb={mode!r} is not one of {', '.join(WANDB_MODES)}")
    self.enabled = writes_here()
    if not self.enabled:
      return
    if resume_step and os.path.exists(self.path):
      keep = [line for line in open(self.path) if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    elif os.path.exists(self.path) and not resume_step:
      os.remove(self.path)
    if mode != "disabled":
      os.environ.setdefault("WANDB_SILENT", "true")
      import wandb
      self.wandb = wandb.init(mode=mode, dir=workdir, project=logging_config.project,
                              name=logging_config.name or None, config=run_config,
                              settings=wandb.Settings(console="off"))

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: to_json(v) for k, v in record.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in flatten(record).items() if k != "step" and not isinstance(v, str)},
                     step=int(step))

  def close(self) -> None:
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def summary_lines(step: int, metrics: dict, eval_loss: Optional[float]) -> list[str]:
  """A readable log of one step: loss and perplexity, held-out, auxiliary losses, per-layer expert load."""
  loss = float(metrics["loss"])
  line = f"step {step}: loss {loss:.3f} (ppl {math.exp(min(loss, 50)):,.1f})"
  if eval_loss is not None:
    line += f" | held-out {eval_loss:.3f} (ppl {math.exp(min(eval_loss, 50)):,.1f})"
  aux = " ".join(f"{k[4:]} {float(v):.3f}" for k, v in sorted(metrics.items()) if k.startswith("aux/"))
  line += f" | {aux} | lr {float(metrics['learning_rate']):.2e}"
  lines = [line]
  for layer, row in enumerate(np.asarray(metrics["expert_load"])):
    lines.append(f"  layer {layer} expert load: " + " ".join(f"{x:.2f}" for x in row) +
                 f"  (cv {float(metrics['load_cv'][layer]):.2f})")
  return lines


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl; none when it does not exist (nothing written yet, or a process other
  than 0 whose workdir is not the shared one)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training(metrics_path: str, out_path: str) -> Optional[str]:
  """Loss (train and held-out) over steps, and one panel per layer with every expert's load fraction over
  steps (a balanced router keeps every line near 1 / E, the dashed line). Returns the path written, None
  when there is nothing to plot or this is not process 0."""
  if not writes_here():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(metrics_path)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  loads = [r for r in train if "expert_load" in r]
  if not train:
    return None
  num_layers = len(loads[0]["expert_load"]) if loads else 0
  cols = max(num_layers, 1)
  fig = plt.figure(figsize=(max(10, 3 * cols), 7), constrained_layout=True)
  grid = fig.add_gridspec(2, cols)
  ax = fig.add_subplot(grid[0, :])
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train cross-entropy")
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out cross-entropy")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.legend()
  ax.grid(alpha=0.3)
  if loads:
    steps = [r["step"] for r in loads]
    load = np.asarray([r["expert_load"] for r in loads], np.float64)  # [S, L, E]
    for layer in range(num_layers):
      lax = fig.add_subplot(grid[1, layer])
      for expert in range(load.shape[2]):
        lax.plot(steps, load[:, layer, expert], lw=1, label=f"expert {expert}")
      lax.axhline(1.0 / load.shape[2], color="k", ls="--", lw=0.8)
      lax.set_title(f"layer {layer}: expert load")
      lax.set_xlabel("step")
      lax.set_ylim(0, max(0.5, float(load[:, layer].max()) * 1.1))
    lax.legend(fontsize=6, loc="upper right")
  fig.savefig(out_path, dpi=90)
  plt.close(fig)
  return out_path
