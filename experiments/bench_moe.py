"""MoE layer forward+backward throughput for each dispatch strategy, against the matmul peak and HF.

One MoE layer (router + 8 SwiGLU experts, top-2) at D=512, F=1792, E=8 on 4096 tokens, float32. For each
dispatch strategy: time of value_and_grad w.r.t. the input, router and expert weights, and GFLOP/s on
the ACTIVE FLOPs (router + k experts per token, forward + backward = 3x forward), next to the machine's
matmul peak measured in the same run and HF transformers' MixtralSparseMoeBlock (eager experts, PyTorch)
on the same weights and tokens as the peer. Each arm is one `Execution` (mixtral_jax/execution.py: the
strategy as `train_dispatch`, the rest this backend's training defaults), and its dispatcher is called
with the tuning the model's MoE block passes it.

    python experiments/bench_moe.py [--repeats 5] [--tokens 4096] [--no-hf]
    python experiments/bench_moe.py --tokens 256 --dim 64 --ffn 128 --repeats 1 --out DIR   # a smoke run

Writes experiments/results/bench_moe.json and bench_moe.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mixtral_jax.config import DTYPES  # noqa: E402
from mixtral_jax.moe.dispatch import FAST_CAPACITY, all_dispatchers, expert_capacity  # noqa: E402
from mixtral_jax.execution import Execution, resolve, to_dict  # noqa: E402
from mixtral_jax.moe.grouped import default_block_size  # noqa: E402
from mixtral_jax.moe.routers import topk_renormalized  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(fn, *args, repeats):
  """(best, median) seconds of fn(*args) after one compile/warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times), float(np.median(times))


def matmul_peak(repeats):
  """Best float32 GFLOP/s over a square matmul and the expert matmul's own shape."""
  best = 0.0
  for m, k, n in [(2048, 2048, 2048), (4096, 512, 1792), (4096, 1792, 512)]:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    t, _ = timed(jax.jit(jnp.matmul), a, b, repeats=repeats)
    best = max(best, 2 * m * k * n / t / 1e9)
  return best


def make_inputs(tokens, dim, ffn, experts, seed=0, skew=0.0):
  """Random weights and tokens. skew > 0 tilts the router: every token's logits gain about
  skew * linspace(1, -1, E) (tokens get a common offset u, the gate a matching component along u), so the
  loads are skewed the way a trained router's are, for HF's block and ours alike."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(0.02 * rng.standard_normal(shape), jnp.float32)  # noqa: E731
  x = rng.standard_normal((tokens, dim)).astype(np.float32)
  gate = 0.02 * rng.standard_normal((dim, experts)).astype(np.float32)
  if skew:
    u = np.ones(dim, np.float32)
    x = x + u  # [N, D]
    gate = gate - np.outer(u, u @ gate) / dim  # no random component along u
    gate = gate + np.outer(u / dim, skew * np.linspace(1, -1, experts)).astype(np.float32)  # [D, E]
  return dict(x=jnp.asarray(x), gate=jnp.asarray(gate),
              w1=normal(experts, dim, ffn), w3=normal(experts, dim, ffn), w2=normal(experts, ffn, dim),
              cotangent=jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32))


def jax_step(run: Execution, top_k, **options):
  """jit(value_and_grad) of <y, cotangent> through router + dispatch, w.r.t. x, gate, w1, w3, w2. The
  dispatcher is `run.train_dispatch`, called with the tuning the model passes it from its execution
  (MoEBlock.__call__); `options` are a strategy's own keywords (dropless: block_size, fast_capacity)."""
  def loss(x, gate, w1, w3, w2, cotangent):
    route = topk_renormalized(x @ gate, top_k)
    y, stats = all_dispatchers().get(run.train_dispatch)(
        x, route, w1, w3, w2, dtype=DTYPES[run.dtype], top_k=top_k, capacity_factor=run.capacity_factor,
        grouped_matmul=run.grouped_matmul, loop_block=run.loop_block, **options)
    return jnp.sum(y * cotangent), stats["dropped_fraction"]
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
  return jax.jit(lambda p: grad(p["x"], p["gate"], p["w1"], p["w3"], p["w2"], p["cotangent"]))


def hf_step(inputs, top_k, threads):
  """HF MixtralSparseMoeBlock forward+backward on the same weights; returns (best, median) seconds."""
  import torch
  import transformers
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  torch.set_num_threads(threads)
  e, d, f = inputs["w1"].shape
  cfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                                   num_experts_per_tok=top_k, experts_implementation="eager")
  block = MixtralSparseMoeBlock(cfg).float()
  with torch.no_grad():
    block.gate.weight.copy_(torch.as_tensor(np.array(inputs["gate"]).T))
    w13 = np.concatenate([np.asarray(inputs["w1"]), np.asarray(inputs["w3"])], axis=-1)  # [E, D, 2F]
    block.experts.gate_up_proj.copy_(torch.as_tensor(w13.transpose(0, 2, 1)))  # [E, 2F, D]
    block.experts.down_proj.copy_(torch.as_tensor(np.array(inputs["w2"]).transpose(0, 2, 1)))  # [E, D, F]
  x = torch.as_tensor(np.asarray(inputs["x"]))[None].requires_grad_(True)
  cot = torch.as_tensor(np.asarray(inputs["cotangent"]))[None]

  def step():
    block.zero_grad(set_to_none=True)
    x.grad = None
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.sum(out * cot).backward()
    return out

  out = step()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return min(times), float(np.median(times)), out.detach().numpy()[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--ffn", type=int, default=1792)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skew", type=float, default=0.0,
                      help="router tilt (make_inputs); 0.5 gives max/mean load ~2 at E=8")
  parser.add_argument("--no-hf", dest="hf", action="store_false")
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--name", default="bench_moe", help="results file stem")
  args = parser.parse_args()

  n, d, f, e, k = args.tokens, args.dim, args.ffn, args.experts, args.top_k
  load_before = os.getloadavg()
  inputs = make_inputs(n, d, f, e, skew=args.skew)
  active = 3 * (2 * n * d * e + 3 * 2 * n * k * d * f)  # forward + backward = 3x forward
  peak = matmul_peak(args.repeats)
  block = default_block_size(n * k, e)
  # One Execution per arm: the strategies compared on purpose (everything else is this backend's
  # training default, execution.resolve). dropless with blocks runs per-expert buffers when every load
  # fits FAST_CAPACITY x the mean (random routers do), else padded blocks; the blocks-only arms measure
  # that fallback for overflowing loads. sorted_loop (the CPU prefill default) differentiates through
  # dropless' backward pass. routed_cond is left out: a decode strategy, it runs every chosen expert on
  # all N tokens (dense's FLOPs at N = 4096). An arm equal to an earlier one once resolved (dropless's
  # default grouped matmul named explicitly) runs once.
  base = Execution(capacity_factor=args.capacity_factor)
  blocks = base.replace(train_dispatch="dropless", grouped_matmul="blocks")
  loop = base.replace(train_dispatch="dropless", grouped_matmul="loop")
  arms = [(base.replace(train_dispatch="dense"), dict(repeats=min(2, args.repeats))),
          (base.replace(train_dispatch="capacity"), {}), (base.replace(train_dispatch="dropless"), {}), (loop, {}),
          (blocks, {}), (blocks, dict(fast_capacity=None)), (blocks, dict(fast_capacity=None, block_size=block // 2)),
          (base.replace(train_dispatch="sorted_loop"), {})]
  if jax.default_backend() != "cpu":  # XLA:CPU's ragged_dot is ~10x slower than an equal batched matmul
    arms.insert(4, (base.replace(train_dispatch="dropless", grouped_matmul="ragged_dot"), {}))
  logits = inputs["x"] @ inputs["gate"]
  load = np.bincount(np.asarray(topk_renormalized(logits, k).experts).ravel(), minlength=e)
  print(f"expert loads (slots): {load.tolist()}; max / mean = {load.max() / load.mean():.3f}")
  rows = []
  seen = set()
  for run, options in arms:
    run = resolve(run, purpose="train")
    if (run, tuple(sorted(options.items()))) in seen:
      continue
    seen.add((run, tuple(sorted(options.items()))))
    options = dict(options)
    repeats = options.pop("repeats", args.repeats)
    step = jax_step(run, k, **options)
    best, median = timed(step, inputs, repeats=repeats)
    (_, dropped), _ = step(inputs)
    name = run.train_dispatch
    label = name + (f" {run.grouped_matmul}" if name == "dropless" else "")
    label += f" loop_block={run.loop_block}" if name == "sorted_loop" else ""
    label += "".join(f" {key}={value}" for key, value in options.items())
    if name == "dropless" and run.grouped_matmul == "blocks" and not options:
      label += f" (auto: buffers of {FAST_CAPACITY} x mean load, else blocks of {block})"
    elif name == "dropless" and run.grouped_matmul == "blocks" and "block_size" not in options:
      label += f" (padded blocks of {block})"
    gflops = active / best / 1e9
    rows.append(dict(dispatch=label, execution=to_dict(run), best_s=best, median_s=median, active_gflops=gflops,
                     fraction_of_peak=gflops / peak, dropped_fraction=float(dropped)))
    print(f"{label:40s} {best * 1e3:8.1f} ms  {gflops:6.1f} GFLOP/s active  {gflops / peak:5.1%} of peak  "
          f"dropped {float(dropped):.3f}", flush=True)
  hf = None
  if args.hf:
    try:
      threads = len(os.sched_getaffinity(0))
      best, median, _ = hf_step(inputs, k, threads)
      hf = dict(best_s=best, median_s=median, active_gflops=active / best / 1e9, threads=threads)
      print(f"{'HF MixtralSparseMoeBlock (torch)':40s} {best * 1e3:8.1f} ms  {hf['active_gflops']:6.1f} "
            f"GFLOP/s active", flush=True)
    except ImportError as err:  # the peer is optional: torch/transformers are test-only dependencies
      print(f"HF peer skipped: {err}")
  load_after = os.getloadavg()
  result = dict(
      config=dict(tokens=n, dim=d, ffn=f, experts=e, top_k=k, capacity_factor=args.capacity_factor, skew=args.skew,
                  expert_loads=load.tolist(),
                  capacity=expert_capacity(n, e, k, args.capacity_factor), dtype="float32",
                  repeats=args.repeats, active_gflop_per_step=active / 1e9),
      machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                   jax=jax.__version__, backend=jax.default_backend(), load_before=load_before,
                   load_after=load_after),
      matmul_peak_gflops=peak, jax=rows, hf=hf)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, args.name + ".json"), "w") as fh:
    json.dump(result, fh, indent=2)
  with open(os.path.join(args.out, args.name + ".md"), "w") as fh:
    fh.write(markdown(result))
  print(f"matmul peak {peak:.1f} GFLOP/s; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")


def markdown(result) -> str:
  c, m = result["config"], result["machine"]
  peak = result["matmul_peak_gflops"]
  lines = [
      "# MoE layer forward+backward by dispatch strategy",
      "",
      f"One MoE layer, D={c['dim']}, F={c['ffn']}, E={c['experts']}, top-{c['top_k']}, {c['tokens']} tokens, "
      f"float32; value_and_grad w.r.t. input, router and expert weights. Active = router + k experts per "
      f"token, forward + backward = {c['active_gflop_per_step']:.1f} GFLOP per step. Capacity factor "
      f"{c['capacity_factor']} (C = {c['capacity']} rows per expert). Best of {c['repeats']} after warm-up "
      f"(dense: 2). Router: random N(0, 0.02) gate, tilt {c.get('skew', 0.0)} (make_inputs), expert loads "
      f"{c['expert_loads']} slots (max / mean {max(c['expert_loads']) / np.mean(c['expert_loads']):.2f}).",
      "",
      f"Machine: {m['cpus']} CPUs, {m['platform']}, jax {m['jax']} ({m['backend']}); load average "
      f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after (a shared machine). "
      f"Matmul peak measured in the same run: **{peak:.1f} GFLOP/s** (float32).",
      "",
      "| dispatch | best ms | median ms | GFLOP/s (active) | % of matmul peak | vs HF | dropped slots |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  hf = result["hf"]
  for row in result["jax"]:
    ratio = f"{hf['best_s'] / row['best_s']:.2f}x" if hf else "-"
    lines.append(f"| {row['dispatch']} | {row['best_s'] * 1e3:.1f} | {row['median_s'] * 1e3:.1f} | "
                 f"{row['active_gflops']:.1f} | {row['fraction_of_peak']:.1%} | {ratio} | "
                 f"{row['dropped_fraction']:.3f} |")
  if hf:
    lines.append(f"| HF MixtralSparseMoeBlock, torch {hf['threads']} threads | {hf['best_s'] * 1e3:.1f} | "
                 f"{hf['median_s'] * 1e3:.1f} | {hf['active_gflops']:.1f} | {hf['active_gflops'] / peak:.1%} | "
                 f"1.00x | 0 |")
  lines += ["", "`vs HF` = HF time / our time (higher is faster). Dense computes every expert on every token "
            "(E/k = 4x the active FLOPs), so its active-FLOP rate is at most a quarter of what it achieves.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
