"""One prepared GPU benchmark (fits ~6 minutes on one H200): full Mixtral 8x7B dimensions, random weights.

    python experiments/gpu_bench.py                 # on the GPU machine; writes experiments/results/gpu_bench.json
    python experiments/gpu_bench.py --dry_run       # CPU, tiny dimensions: checks the script end to end

Benches (each guarded: one failing does not lose the others' numbers; results are written after each):
  roofline      bf16 matmul TFLOP/s (8192^3) and HBM read GB/s (a large bf16 matrix-vector product)
  decode_bf16   batch-1 greedy decode, bf16 weights: tok/s and % of the bandwidth floor
                (bytes of weights a token must read / measured read bandwidth). Goal >= 140 tok/s.
  decode_int8   the same with q8 (int8 per-channel) attention and expert weights. Goal >= 230 tok/s.
  prefill       B1 x T2048 prefill in the backend's default execution: MFU vs the measured bf16 matmul peak.
                Goal >= 60%. Also timed: sorted_loop with loop_block=1024 (big expert matmuls), the CPU
                prefill default, through model.with_execution on the same weights (`sorted_loop` in the
                result), so the default can follow whichever is faster here (execution.BACKENDS).
  train_slice   issue 6: one training step (forward + backward + AdamW, float32 master weights, bf16
                compute) of 4 full-width layers (D4096/F14336, 8 experts top-2, vocab 32000), batch
                4 x 2048, through train_step.make_train_step (bench_train's gpu_slice preset): MFU (6 x active
                parameters + attention, per token) vs the measured bf16 matmul peak. Goal >= 45%.

Every model comes from the public calls a user makes: `model.build(cfg, seed)` (the backend's fastest
exact inference execution; on GPU the stacked layout), `quant.quantize_model(model, "q8", consume=True)`
for int8, and `sampling.prefill` / `sampling.decode`; each result records the `execution` that ran. The
int8 model is built after the bf16 one is freed. Memory: consume=True frees each bf16 weight once its int8
one exists, and stacked [L, E, ...] leaves are quantized one layer at a time (lax.map), so the peak is the
bf16 model (93 GB) plus one layer's float32 working copy, never both whole models.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.roofline import best_time  # noqa: E402
from mixtral_jax.inference import quant as quant_lib
from mixtral_jax.inference import sampling  # noqa: E402
from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.execution import Execution, to_dict  # noqa: E402
from mixtral_jax.model import build, with_execution  # noqa: E402

FULL = dict()  # ModelConfig defaults are Mixtral 8x7B
DRY = dict(vocab_size=512, dim=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=96)
GOALS = {"decode_bf16": ("tok_s", 140), "decode_int8": ("tok_s", 230), "prefill": ("mfu", 0.60),
         "train_slice": ("mfu", 0.45)}


def roofline(args) -> dict:
  n = 8192 if not args.dry_run else 256
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  t = best_time(mm, a, repeats=3)
  rows = 65536 if not args.dry_run else 1024
  w = jax.random.normal(jax.random.key(0), (rows, 8192 if not args.dry_run else 256), jnp.bfloat16)
  x = jnp.ones((w.shape[1],), jnp.bfloat16)
  mv = jax.jit(lambda w, x: w @ x)
  t_mv = best_time(mv, w, x, repeats=5)
  return {"matmul_tflops": 2 * n ** 3 / t / 1e12, "read_gbps": w.size * 2 / t_mv / 1e9}


def decode_bytes(cfg: ModelConfig, weight_bytes: float, context: int, kv_bytes: int = 2) -> float:
  """Bytes one batch-1 step reads: attention + top-k experts + router + LM head (at weight_bytes per
  weight for the quantized groups, 2 for the rest) and the KV cache."""
  d, l = cfg.dim, cfg.num_layers
  attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  experts = cfg.top_k * 3 * d * cfg.ffn_dim
  kv = 2 * context * cfg.num_kv_heads * cfg.head_dim * kv_bytes
  return l * ((attn + experts) * weight_bytes + 2 * d * cfg.num_experts + kv) + 2 * d * cfg.vocab_size


def decode(args, cfg, quant, peak) -> dict:
  t0 = time.perf_counter()
  model = build(cfg, seed=0)
  if quant:
    model = quant_lib.quantize_model(model, quant, consume=True)  # frees each bf16 weight as it goes
  jax.block_until_ready(nnx.state(model))
  built = time.perf_counter() - t0
  execution = to_dict(model.execution)
  prompt, new = (128, 128) if not args.dry_run else (8, 8)
  tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (1, prompt)).astype(np.int32)
  t0 = time.perf_counter()
  state = sampling.prefill(model, tokens, new)
  sampling.decode(model, state).tokens.block_until_ready()
  compiled = time.perf_counter() - t0

  def run():
    s = sampling.prefill(model, tokens, new)
    jax.block_until_ready(s)
    t = time.perf_counter()
    sampling.decode(model, s).tokens.block_until_ready()
    return time.perf_counter() - t

  step = min(run() for _ in range(args.repeats)) / (new - 1)
  floor = decode_bytes(cfg, 1 if quant == "q8" else 2, prompt + new) / (peak["read_gbps"] * 1e9)
  del model
  gc.collect()
  return {"tok_s": 1 / step, "ms_per_token": step * 1e3, "floor_ms": floor * 1e3, "of_floor": floor / step,
          "build_s": built, "compile_and_first_s": compiled, "execution": execution}


def prefill(args, cfg, peak) -> dict:
  model = build(cfg, seed=0)
  b, t = (1, 2048) if not args.dry_run else (1, 32)
  tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
  d, l = cfg.dim, cfg.num_layers
  per_token = l * (d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.top_k * 3 * d * cfg.ffn_dim)
  flops = 2 * per_token * b * t + l * 4 * cfg.num_heads * cfg.head_dim * b * t * (t + 1) / 2 + 2 * b * d * cfg.vocab_size

  def timed(m):
    secs = best_time(sampling.prefill, m, tokens, 1, repeats=args.repeats)
    return {"tok_s": b * t / secs, "seconds": secs, "tflops": flops / secs / 1e12,
            "mfu": flops / secs / 1e12 / peak["matmul_tflops"], "execution": to_dict(m.execution)}

  out = timed(model)  # the default: what sampling.generate runs for a user
  # The alternative, on the same weights (the same layout: nothing is copied): big expert matmuls.
  loop_block = 1024 if not args.dry_run else 16
  try:
    out["sorted_loop"] = timed(with_execution(model, prefill_dispatch="sorted_loop", loop_block=loop_block))
  except Exception as e:  # keep the default's numbers
    out["sorted_loop"] = {"error": f"{type(e).__name__}: {e}"}
  del model
  gc.collect()
  return out


def train_slice(args, cfg, peak) -> dict:
  from experiments import bench_train
  from mixtral_jax.config import model_config_from
  if args.dry_run:  # the dry run's tiny dimensions, batch 2 x 32
    slice_cfg, batch_size, seq_len = cfg.replace(param_dtype="float32"), 2, 32
  else:
    preset = bench_train.PRESETS["gpu_slice"]
    slice_cfg = model_config_from({**preset["model"], "max_positions": max(4096, preset["seq_len"])})
    batch_size, seq_len = preset["batch"], preset["seq_len"]
  batch = bench_train.make_batch(slice_cfg, batch_size, seq_len)
  run = Execution(**bench_train.PRESETS["gpu_slice"]["run"])  # bf16 compute, float32 master weights
  result = bench_train.jax_run(slice_cfg, None, batch, steps=max(2, args.repeats), run=run)  # build_setup's init
  gc.collect()
  step = float(np.median(result["times"]))
  tokens = batch_size * seq_len
  flops = bench_train.model_flops_per_token(slice_cfg, seq_len) * tokens
  return {"tokens_per_s": tokens / step, "step_s": step, "tflops": flops / step / 1e12,
          "mfu": flops / step / 1e12 / peak["matmul_tflops"], "compile_and_first_s": result["compile_s"],
          "layers": slice_cfg.num_layers, "batch": f"{batch_size}x{seq_len}", "execution": result["execution"]}


BENCHES = {
    "decode_bf16": lambda args, cfg, peak: decode(args, cfg, None, peak),
    "decode_int8": lambda args, cfg, peak: decode(args, cfg, "q8", peak),
    "prefill": prefill,
    "train_slice": train_slice,
}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--dry_run", action="store_true", help="tiny dims on whatever device is there (CPU test)")
  ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_bench.json"))
  args = ap.parse_args(argv)
  cfg = ModelConfig(**(DRY if args.dry_run else FULL), param_dtype="bfloat16")  # compute dtype follows
  result = {"device": str(jax.devices()[0].device_kind), "dry_run": args.dry_run,
            "config": {k: getattr(cfg, k) for k in ("dim", "num_layers", "ffn_dim", "num_experts", "vocab_size")},
            "benches": {}}
  start = time.perf_counter()

  def save():
    result["wall_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  result["roofline"] = peak = roofline(args)
  print("roofline", peak, flush=True)
  save()
  for name in args.only.split(","):
    try:
      out = BENCHES[name](args, cfg, peak)
      if name in GOALS and not args.dry_run:
        key, goal = GOALS[name]
        out["goal"], out["meets_goal"] = f"{key} >= {goal}", bool(out[key] >= goal)
    except Exception as e:  # keep the other benches' numbers
      out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    result["benches"][name] = out
    print(name, {k: v for k, v in out.items() if k != "traceback"}, flush=True)
    save()
  return result


if __name__ == "__main__":
  main()
