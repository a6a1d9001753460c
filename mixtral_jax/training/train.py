"""Training and fine-tuning: `train_and_evaluate(config, workdir)`, the run mode `train`.

One path: config -> model (fresh, or loaded for fine-tuning) -> trainable tree (every parameter, or LoRA
adapters) -> optimizer (optim.py) -> packed batches (data.py) -> jitted `train_step` (train_step.py) whose
local `loss_fn` adds the weighted auxiliary losses -> Orbax checkpoints (train_checkpoints.py) -> metrics.jsonl / wandb / plot
(reporting.py) -> held-out perplexity and a generated sample.

The train state is a dict of pure pytrees (`step`, `params` = the trainable tree, `opt_state`, `rng`,
`rest` = non-parameter model state), so Orbax saves it as is and a resume restores it bit for bit.
Master weights are float32; `config.model.dtype=bfloat16` makes the model compute in bfloat16.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Optional

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.training import data
from mixtral_jax.training import lora
from mixtral_jax.training import optim
from mixtral_jax.training import reporting
from mixtral_jax.parallel import placement, sharding
from mixtral_jax.config import ConfigError, to_dict
from mixtral_jax.moe.losses import LOSSES
from mixtral_jax.modes import MODES
from mixtral_jax.training.run_checkpoints import Checkpoints
from mixtral_jax.training.step import build_setup, effective_params, evaluate, greedy_sample, make_eval_step, \
    make_train_step


class TrainingError(ConfigError):
  """The run stopped for a reason the user must act on (a non-finite loss, a mismatched workdir); run.py
  prints it as one line and exits non-zero."""


def validate(config) -> None:
  t = config.train
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "log_every", "checkpoint_every",
               "keep_checkpoints"):
    if not isinstance(t[name], int) or t[name] <= 0:
      raise ConfigError(f"config.train.{name} must be a positive integer, got {t[name]!r}")
  if t.learning_rate <= 0 or t.warmup_steps < 0:
    raise ConfigError("config.train.learning_rate must be > 0 and config.train.warmup_steps >= 0")
  for name in t.aux_losses:
    if name not in LOSSES:
      raise ConfigError(f"config.train.aux_losses has unknown loss {name!r}; known: {', '.join(LOSSES.names())}")


class StopSignal:
  """SIGTERM (and Ctrl-C) set a flag; the loop saves a checkpoint at the end of the current step and exits."""

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _finite(*values) -> bool:
  return all(math.isfinite(float(v)) for v in values)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint), then evaluates, samples, plots.
  Returns a summary dict (also printed).

  With more than one device the run uses `config.mesh` (mixtral_jax/parallel/sharding.py): the train state is
  placed by the sharding rules, batches are split over the batch axes, and the steps are traced inside
  the mesh, so expert-parallel dispatch (`ep_capacity`, `ep_dropless`) finds it. A checkpoint restores onto
  the current mesh, whatever mesh saved it.
  """
  validate(config)
  sharding.initialize_distributed(config.get("distributed"))  # before anything touches a device
  mesh, rules = sharding.mesh_from_config(config)
  with sharding.use_mesh(mesh, rules):
    return _train_and_evaluate(config, workdir, mesh, rules)


def _train_and_evaluate(config, workdir: str, mesh, rules) -> dict:
  t = config.train
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax narrates every save at INFO
  os.makedirs(workdir, exist_ok=True)
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  docs = data.read_documents(config.data.paths, config.data.chunk_chars)  # data errors before any compute
  setup = build_setup(config)
  cfg = setup.cfg
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} (config.data.tokenizer={config.data.tokenizer!r})")
  if t.seq_len > cfg.max_positions:
    raise ConfigError(f"config.train.seq_len={t.seq_len} exceeds config.model.max_positions={cfg.max_positions}")

  train_docs, eval_docs = data.split_heldout(docs, config.data.eval_fraction, config.seed)
  dataset = data.train_dataset(train_docs, tokenizer, seq_len=t.seq_len, batch_size=t.batch_size * t.grad_accum,
                               seed=config.seed)
  eval_set = data.eval_batches(eval_docs, tokenizer, seq_len=t.seq_len, batch_size=t.batch_size,
                               num_batches=t.eval_batches)

  key = jax.random.PRNGKey(config.seed)
  base = setup.base if setup.lora else None
  trainable = setup.base
  if setup.lora:
    with jax.threefry_partitionable(False):
      trainable = jax.jit(lambda base, k: lora.init(base, rank=setup.lora["rank"], targets=setup.lora["targets"],
                                                    key=k))(setup.base, jax.random.fold_in(key, 1))
  optimizer, schedule = optim.make_optimizer(t, trainable, num_experts=cfg.num_experts)
  state = dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=jax.jit(optimizer.init)(trainable),
               rng=key, rest=setup.rest)
  on_mesh = lambda batch: batch  # noqa: E731
  if mesh is not None:
    state = placement.place_tree(state, cfg, mesh, rules)
    base = None if base is None else placement.place_tree(base, cfg, mesh, rules)
    on_mesh = lambda batch: sharding.put_batch(batch, mesh, rules)  # noqa: E731
    eval_set = [on_mesh(b) for b in eval_set]
  meta = dict(model=to_dict(cfg), lora=setup.lora and {**setup.lora, "targets": list(setup.lora["targets"])},
              tokenizer=config.data.tokenizer, source_checkpoint=config.get("checkpoint") or "")
  ckpt = Checkpoints(workdir, t)
  iterator = data.batches(dataset)
  restored = ckpt.restore(state, iterator, meta)
  if restored is not None:
    state, iterator = restored
  start = int(state["step"])

  writer = reporting.MetricsWriter(workdir, config.logging, config.to_dict(), resume_step=start)
  train_step, eval_step = make_train_step(setup, t, optimizer, schedule), make_eval_step(setup)
  summary = dict(workdir=workdir, start_step=start, lora_params=setup.lora and lora.count(trainable),
                 mesh=None if mesh is None else {a: n for a, n in mesh.shape.items() if n > 1},
                 params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.base)))
  what = (f"LoRA rank {setup.lora['rank']} on {','.join(setup.lora['targets'])}: {summary['lora_params']:,} trained"
          if setup.lora else "all trained")
  if setup.lora and set(setup.lora["targets"]) & set(lora.EXPERT_TARGETS):
    what += f"; expert adapters {setup.lora_experts}"  # grouped: on the routed rows; merged: dense W + s A B
  print(f"model: {summary['params']:,} parameters ({what}), {cfg.num_layers} layers x {cfg.num_experts} experts "
        f"top-{cfg.top_k}, {setup.run.train_dispatch} dispatch, compute {setup.run.dtype}\n"
        f"data: {config.data.paths} -> {len(train_docs):,} training / {len(eval_docs):,} held-out documents, "
        f"tokenizer {config.data.tokenizer} ({tokenizer.vocab_size:,}); steps {start}..{t.steps} of "
        f"{t.batch_size * t.grad_accum} x {t.seq_len} tokens; workdir {workdir}", flush=True)
  if start == 0 and eval_set:
    eval_loss = evaluate(eval_step, state, base, eval_set)
    writer.write(0, {"eval_loss": eval_loss})
    print(f"step 0: held-out {eval_loss:.3f} (ppl {math.exp(eval_loss):,.1f})", flush=True)

  from tqdm import tqdm
  bar = tqdm(total=t.steps, initial=start, disable=not config.logging.progress, dynamic_ncols=True,
             file=sys.stderr, desc="train")
  began, step = time.perf_counter(), start
  try:
    with StopSignal() as stop:
      while step < t.steps:
        batch = on_mesh(next(iterator))
        state, metrics = train_step(state, base, batch)
        step += 1
        metrics = jax.device_get(metrics)
        if step == start + 1:
          compiled = time.perf_counter()  # throughput is reported from here: after the compile
        if not _finite(metrics["loss"], metrics["grad_norm"], metrics["update_norm"]):
          ckpt.wait()
          last = ckpt.latest_step()
          raise TrainingError(
              f"non-finite loss {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])}) at step {step}; "
              f"stopped. Last good checkpoint: {ckpt.path(last) if last is not None else 'none'}. "
              f"Try a lower config.train.learning_rate or config.train.clip_norm")
        if step % t.log_every == 0 or step == t.steps:
          writer.write(step, {**metrics, "perplexity": math.exp(min(float(metrics["loss"]), 50.0))})
          bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        if step % t.eval_every == 0 or step == t.steps:
          eval_loss = evaluate(eval_step, state, base, eval_set) if eval_set else None
          if eval_loss is not None:
            writer.write(step, {"eval_loss": eval_loss})
          for line in reporting.summary_lines(step, metrics, eval_loss):
            bar.write(line)
        ckpt.save(step, state, iterator, meta, force=step == t.steps or stop.received is not None)
        bar.update(1)
        if stop.received:
          ckpt.wait()
          print(f"\n{stop.received}: saved checkpoint {ckpt.path(step)}; exiting (rerun to resume)", flush=True)
          summary.update(step=step, stopped=stop.received, checkpoint=ckpt.path(step))
          return summary
    elapsed = (began, compiled if step > start else None, time.perf_counter())
  finally:
    bar.close()
    ckpt.wait()
    writer.close()
  ckpt.save(step, state, iterator, meta, force=True)  # no-op when the loop already saved this step
  ckpt.wait()
  return _finish(config, workdir, setup, state, base, tokenizer, writer, ckpt, summary, step, start, elapsed)


def _finish(config, workdir, setup, state, base, tokenizer, writer, ckpt, summary, step, start, elapsed):
  """Reports held-out perplexity (start -> end), the checkpoint, a greedy sample and the plot."""
  t = config.train
  records = reporting.read_metrics(writer.path)
  evals = [r for r in records if "eval_loss" in r]
  summary.update(step=step, checkpoint=ckpt.path(step), stopped=None)
  began, compiled, ended = elapsed
  if compiled is not None and step - start > 1:
    summary["tokens_per_second"] = (step - start - 1) * t.batch_size * t.grad_accum * t.seq_len / (ended - compiled)
    print(f"trained steps {start}..{step} in {ended - began:.1f}s (first step with compile: {compiled - began:.1f}s; "
          f"then {summary['tokens_per_second']:,.0f} tokens/s, evaluation and checkpoints included)")
  if evals:
    first, last = evals[0], evals[-1]
    summary.update(eval_loss_start=first["eval_loss"], eval_loss=last["eval_loss"])
    print(f"held-out perplexity: {math.exp(first['eval_loss']):,.1f} at step {first['step']} -> "
          f"{math.exp(last['eval_loss']):,.1f} at step {last['step']} "
          f"(cross-entropy {first['eval_loss']:.3f} -> {last['eval_loss']:.3f} nats/token)")
  print(f"checkpoint: {ckpt.path(step)}")
  params = effective_params(setup, state["params"], base)  # LoRA: merged densely, once
  if t.export or t.export_hf:
    from mixtral_jax.training.run_checkpoints import export
    summary.update(export(setup.cfg, params, workdir, hf=t.export_hf))
    print("exported " + ("merged " if setup.lora else "") + "weights: " +
          ", ".join(summary[k] for k in ("export", "hf") if k in summary))
  if t.sample_tokens:
    summary["sample"] = greedy_sample(setup, params, state["rest"], tokenizer, t.sample_prompt, t.sample_tokens)
    print(f"sample (greedy, prompt {t.sample_prompt!r}):\n{summary['sample']}")
  if config.logging.plot:
    summary["plot"] = reporting.plot_training(writer.path, os.path.join(workdir, "training.png"))
    print(f"plot: {summary['plot']}")
  print(f"metrics: {writer.path}" + (f"; wandb ({config.logging.wandb}): {os.path.join(workdir, 'wandb')}"
                                     if config.logging.wandb != "disabled" else ""))
  return summary


@MODES.register("train")
def train_mode(config, workdir):
  """run.py --config.mode=train: train_and_evaluate."""
  train_and_evaluate(config, workdir)
