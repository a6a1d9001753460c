"""Per-expert LoRA through the experts' grouped matmul vs the dense per-expert merge vs full fine-tuning.

The same model, batch and optimizer for three trainer steps (each built as `python run.py` builds it:
train_step.build_setup from a config, then make_train_step):
  grouped   LoRA on the experts (targets `experts`), adapters on the routed rows: x W_e + s (x A_e) B_e
            through the dispatch's grouped matmul (lora.apply, moe/adapted.py) -- the trainer's default
  merged    the same adapters merged densely every step, W + s A B per expert (Setup.lora_experts="merged":
            the implementation before AdaptedExperts)
  full      every parameter trained (float32 master weights, AdamW state for all of them)
For each: median step time over all repeats (the variants are interleaved within each repeat, so a
neighbour's load falls on all of them alike), XLA's compiled temp allocation of the step, the train
state's bytes (trainable + AdamW moments), and XLA's FLOP count of the step (while loops -- the CPU's
`loop` grouped matmul -- are counted once per loop body, so read FLOPs from a loop-free dispatch such as
capacity). The frozen base is float32 as well, so the variants differ only in what they compute.

    python experiments/bench_lora_experts.py [--preset small|cpu] [--dispatch auto,capacity] [--steps 3]
                                             [--repeats 3] [--rank 16]

Writes experiments/results/bench_lora_experts.json and .md (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import report  # noqa: E402
from experiments.bench_train import make_batch, train_config  # noqa: E402
from mixtral_jax.config import model_config_from, to_dict as model_dict  # noqa: E402
from mixtral_jax.execution import Execution, to_dict as execution_dict  # noqa: E402
from mixtral_jax.training import lora, optim  # noqa: E402
from mixtral_jax.training import step as train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PRESETS = {  # tiny but not trivial: the experts hold most weights, the dense delta E D F r is real work
    "small": dict(model=dict(vocab_size=4096, dim=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                             ffn_dim=1024, num_experts=8, top_k=2), batch=4, seq_len=128),
    "cpu": dict(model=dict(vocab_size=32000, dim=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                           ffn_dim=1792, num_experts=8, top_k=2), batch=8, seq_len=256),
}
VARIANTS = ("grouped", "merged", "full")


def build(cfg, run: Execution, variant: str, rank: int, steps: int):
  """(jitted step, state, base) for one variant; the state is the trainer's dict."""
  config = ml_collections.ConfigDict(dict(seed=0, model=model_dict(cfg), run=execution_dict(run),
                                          train=train_config(steps)))
  if variant != "full":
    config.train.lora.update(dict(rank=rank, alpha=2.0 * rank, targets="experts"))
  setup = train_step.build_setup(config)
  if variant == "merged":
    setup = setup._replace(lora_experts="merged")
  base = setup.base if setup.lora else None
  trainable = setup.base
  if setup.lora:
    trainable = jax.jit(lambda b: lora.init(b, rank=rank, targets=setup.lora["targets"],
                                            key=jax.random.PRNGKey(1)))(setup.base)
  opt, schedule = optim.make_optimizer(config.train, trainable, num_experts=setup.cfg.num_experts)
  state = dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=jax.jit(opt.init)(trainable),
               rng=jax.random.PRNGKey(0), rest=setup.rest)
  return train_step.make_train_step(setup, config.train, opt, schedule), state, base, setup


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(cfg, run: Execution, batch, *, rank: int, steps: int, repeats: int) -> list:
  rows = {}
  for variant in VARIANTS:
    step, state, base, setup = build(cfg, run, variant, rank, steps)
    start = time.perf_counter()
    compiled = step.lower(state, base, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    rows[variant] = dict(
        variant=variant, dispatch=setup.run.train_dispatch, grouped_matmul=setup.run.grouped_matmul,
        lora_experts=setup.lora_experts if setup.lora else None, compile_s=compile_s,
        temp_bytes=compiled.memory_analysis().temp_size_in_bytes, gflop=float(cost.get("flops", 0.0)) / 1e9,
        trainable=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))),
        state_bytes=tree_bytes(state["params"]) + tree_bytes(state["opt_state"]), times=[], losses=[],
        holder=dict(step=step, state=state, base=base))
  for _ in range(repeats):
    for variant in VARIANTS:  # interleaved: a neighbour's load falls on every variant alike
      r = rows[variant]
      h = r["holder"]
      for _ in range(steps + 1):  # the first of each repeat warms up (caches), untimed
        t0 = time.perf_counter()
        h["state"], metrics = h["step"](h["state"], h["base"], batch)
        loss = float(metrics["loss"])  # syncs
        r["times"].append(time.perf_counter() - t0)
        r["losses"].append(loss)
      r["times"].pop(-steps - 1)
  out = []
  for variant in VARIANTS:
    r = rows[variant]
    del r["holder"]
    r["median_s"] = float(np.median(r["times"]))
    out.append(r)
  full = rows["full"]["median_s"]
  for r in out:
    r["vs_full"] = full / r["median_s"]
    r["vs_merged"] = rows["merged"]["median_s"] / r["median_s"]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
  parser.add_argument("--dispatch", default="auto,capacity", help="config.run.train_dispatch values")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat and variant")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="", help="results path without extension (default results/bench_lora_experts)")
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  cfg = model_config_from({**preset["model"], "max_positions": max(1024, preset["seq_len"])})
  batch = jax.device_put(make_batch(cfg, preset["batch"], preset["seq_len"]))
  load_before = os.getloadavg()[0]
  rows = []
  for dispatch in args.dispatch.split(","):
    for r in measure(cfg, Execution(train_dispatch=dispatch), batch, rank=args.rank, steps=args.steps,
                     repeats=args.repeats):
      rows.append(r)
      print(f"{r['dispatch']} {r['variant']}: median {r['median_s']:.3f}s/step, temp {r['temp_bytes'] / 2**20:.1f} MiB,"
            f" {r['gflop']:.2f} GFLOP (XLA count)", flush=True)
  out = dict(preset=args.preset, model=preset["model"], batch=preset["batch"], seq_len=preset["seq_len"],
             rank=args.rank, steps=args.steps, repeats=args.repeats, backend=jax.default_backend(),
             cpu_count=os.cpu_count(), load_avg_before=load_before, load_avg_after=os.getloadavg()[0], rows=rows)
  out = json.loads(json.dumps(out, default=float))  # numpy scalars -> plain floats
  report.write_results(args.out or os.path.join(RESULTS, "bench_lora_experts"), out, markdown(out).splitlines())


def markdown(out: dict) -> str:
  m = out["model"]
  lines = [
      f"# Per-expert LoRA: grouped matmul vs dense merge vs full fine-tuning ({out['preset']} preset)",
      "",
      f"Model D={m['dim']} F={m['ffn_dim']} L={m['num_layers']} E={m['num_experts']} k={m['top_k']} "
      f"V={m['vocab_size']}; batch {out['batch']} x {out['seq_len']}; LoRA rank {out['rank']} on the experts "
      f"(w1, w3, w2). Backend {out['backend']} ({out['cpu_count']} cores), load average "
      f"{out['load_avg_before']:.2f} before, {out['load_avg_after']:.2f} after. Median of {out['repeats']} "
      f"interleaved repeats x {out['steps']} steps (after a warm-up step each). XLA GFLOP: the compiled step's "
      "cost analysis (while loops, i.e. the `loop` grouped matmul, counted once per body: compare FLOPs on "
      "capacity). temp: compiled temp allocation; state: trainable + AdamW moments.",
      "",
      "| dispatch | variant | s/step | vs merged | vs full | temp MiB | state MiB | trained params | XLA GFLOP | "
      "compile s |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in out["rows"]:
    name = f"{r['dispatch']}" + (f" ({r['grouped_matmul']})" if r["dispatch"] == "dropless" else "")
    lines.append(f"| {name} | {r['variant']} | {r['median_s']:.3f} | {r['vs_merged']:.2f}x | {r['vs_full']:.2f}x | "
                 f"{r['temp_bytes'] / 2**20:.1f} | {r['state_bytes'] / 2**20:.1f} | {r['trainable']:,} | "
                 f"{r['gflop']:.2f} | {r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
