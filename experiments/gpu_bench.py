"""One prepared GPU benchmark (~6 min on one H200, then long-context cells within --budget_s): 8x7B, random weights.

    python experiments/gpu_bench.py                 # on the GPU machine; writes experiments/results/gpu_bench.json
    python experiments/gpu_bench.py --dry_run       # CPU, tiny dimensions: checks the script end to end
    python experiments/gpu_bench.py --only=prefill_32k,train_8k   # the long-context attention cells alone

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
  prefill_32k   long-context prefill, B1 x T32768, of a 2-layer model at full 8x7B width (random bf16
                weights, `model.build`, then `model.with_execution(model, attention=NAME, attention_min_len=1)`
                per attention, `nnx.jit(lambda m, x: m(x).logits[:, -1])`): tokens/s, TFLOP/s, % of the
                measured peak, for "flash" and the kernels ATTENTIONS has ("cudnn", "pallas_gpu"); the
                result records which attention the built default runs at that length.
  train_8k      forward + backward (value_and_grad of the next-token loss w.r.t. the bf16 parameters, remat
                "full", train=True) of the same 2-layer model at B1 x T8192, per attention: step time and
                MFU = 6 x active parameters (the embedding lookup excluded) x tokens / time / 989.4 TFLOP/s
                (the H100/H200 SXM dense bf16 spec; None on other devices), also against the measured peak
                and with attention's 12 x L x H x Dh x T per token (bench_train.model_flops_per_token).
  Each (bench, attention) cell is guarded apart: an error is one line in the result; a cell is skipped
  ("skipped: time budget") once the run is within --cell_reserve_s of --budget_s (540 s: the device
  call's limit is 600 s), so the long-context cells never cost the earlier benches' numbers.

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


# --- long context: the attention implementations at full width (issue: attention kernels) ----------------

LONG_ATTENTIONS = ("flash", "cudnn", "pallas_gpu")  # timed where ATTENTIONS has them
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4}  # dense bf16 spec (SXM); MFU of train_8k is against it
_SLICE = {}  # the 2-layer model, built once for prefill_32k and train_8k (train_8k drops it)


def _over_budget(args) -> bool:
  return time.perf_counter() - args.start > args.budget_s - args.cell_reserve_s


def _slice_model(cfg):
  """2 layers at the config's width (8x7B on the GPU), random weights, the backend's default execution."""
  if "model" not in _SLICE:
    _SLICE["model"] = build(cfg.replace(num_layers=2), seed=0)
  return _SLICE["model"]


def _attention_names():
  from mixtral_jax.attention import ATTENTIONS
  return [name for name in LONG_ATTENTIONS if name in ATTENTIONS]


def _attention_in_use(run, t: int) -> str:
  """What mixtral_jax.attention.attend runs for self-attention over t keys under `run` (its own rule)."""
  return "xla" if t == 1 or t < run.attention_min_len else run.attention


def _one_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _cells(args, names, cell):
  """{name: cell(name)} with each cell's exception kept as one line and the time budget enforced."""
  out = {}
  for name in names:
    if _over_budget(args):
      out[name] = {"skipped": f"time budget ({time.perf_counter() - args.start:.0f} s of {args.budget_s:.0f} s)"}
    else:
      try:
        out[name] = cell(name)
      except Exception as e:  # keep the other attentions' numbers
        out[name] = {"error": _one_line(e)}
      gc.collect()
    print(f"  {name}: {out[name]}", flush=True)
  return out


def prefill_32k(args, cfg, peak) -> dict:
  from flax import nnx as nnx_
  model = _slice_model(cfg)
  mcfg = model.config
  t = 32768 if not args.dry_run else 256
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, mcfg.vocab_size, (1, t)).astype(np.int32))
  d, l = mcfg.dim, mcfg.num_layers
  per_token = l * (d * mcfg.head_dim * (2 * mcfg.num_heads + 2 * mcfg.num_kv_heads) + mcfg.top_k * 3 * d * mcfg.ffn_dim)
  flops = 2 * per_token * t + l * 4 * mcfg.num_heads * mcfg.head_dim * t * (t + 1) / 2 + 2 * d * mcfg.vocab_size
  f = nnx_.jit(lambda m, x: m(x).logits[:, -1])  # the last position's logits: what a prefill needs

  def cell(name):
    m = with_execution(model, attention=name, attention_min_len=1)  # same layout: the same weights
    t0 = time.perf_counter()
    jax.block_until_ready(f(m, tokens))
    first = time.perf_counter() - t0
    secs = best_time(f, m, tokens, repeats=args.repeats)
    return {"tok_s": t / secs, "seconds": secs, "tflops": flops / secs / 1e12,
            "of_peak": flops / secs / 1e12 / peak["matmul_tflops"], "compile_and_first_s": first,
            "attention": _attention_in_use(m.execution, t)}

  cells = _cells(args, _attention_names(), cell)
  best = max((c["tok_s"] for c in cells.values() if "tok_s" in c), default=0.0)
  return {"tok_s": best, "tokens": t, "layers": l, "default_attention": _attention_in_use(model.execution, t),
          "execution": to_dict(model.execution), "attentions": cells,
          "flops": "2 x active weights per token + causal attention 4 H Dh T(T+1)/2 per layer + one LM-head row"}


def train_8k(args, cfg, peak) -> dict:
  from mixtral_jax.execution import resolve
  from mixtral_jax.model import active_param_count
  from experiments.bench_train import model_flops_per_token
  from mixtral_jax.training.step import next_token_loss
  model = _slice_model(cfg)
  _SLICE.clear()  # the last user: the model goes when this bench ends
  mcfg = model.config
  t = 8192 if not args.dry_run else 128
  rng = np.random.default_rng(1)
  ids = rng.integers(1, mcfg.vocab_size, (1, t + 1)).astype(np.int32)
  tokens, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
  mask = jnp.ones((1, t), jnp.float32)
  active = active_param_count(mcfg) - mcfg.vocab_size * mcfg.dim  # the embedding is a lookup, not a matmul
  flops = 6 * active * t
  flops_attn = model_flops_per_token(mcfg, t) * t
  spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in result_device()), None)

  def cell(name):
    run = resolve(Execution(remat="full", attention=name, attention_min_len=1), purpose="train",
                  param_dtype=mcfg.param_dtype)  # the training execution (stacked layers), bf16
    m = with_execution(model, run)  # GPU: the inference layout is stacked too, so the same weights
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params, rest, tokens, targets):
      logits = nnx.merge(graphdef, params, rest)(tokens, train=True).logits
      return next_token_loss(logits, targets, mask)[0] / t

    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, rest, tokens, targets))
    first = time.perf_counter() - t0
    secs = best_time(step, params, rest, tokens, targets, repeats=args.repeats)
    del m, params, rest
    return {"step_s": secs, "tokens_per_s": t / secs, "tflops": flops / secs / 1e12,
            "mfu": None if spec is None else flops / secs / 1e12 / spec,
            "of_measured_peak": flops / secs / 1e12 / peak["matmul_tflops"],
            "of_measured_peak_with_attention": flops_attn / secs / 1e12 / peak["matmul_tflops"],
            "compile_and_first_s": first, "attention": _attention_in_use(run, t), "remat": run.remat}

  cells = _cells(args, _attention_names(), cell)
  model = None  # the last reference: freed before the result is saved
  gc.collect()
  ok = [c for c in cells.values() if "step_s" in c]
  best = min(ok, key=lambda c: c["step_s"]) if ok else {}
  return {"tokens_per_s": best.get("tokens_per_s", 0.0), "mfu": best.get("mfu"), "tokens": t,
          "layers": mcfg.num_layers, "active_params": active, "attentions": cells,
          "mfu_convention": f"6 x {active / 1e9:.3g}B active parameters x tokens / step time / "
                            f"{spec} TFLOP/s dense bf16 spec ({result_device()})"}


def result_device() -> str:
  return str(jax.devices()[0].device_kind)


BENCHES = {
    "decode_bf16": lambda args, cfg, peak: decode(args, cfg, None, peak),
    "decode_int8": lambda args, cfg, peak: decode(args, cfg, "q8", peak),
    "prefill": prefill,
    "train_slice": train_slice,
    "prefill_32k": prefill_32k,
    "train_8k": train_8k,
}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--dry_run", action="store_true", help="tiny dims on whatever device is there (CPU test)")
  ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_bench.json"))
  ap.add_argument("--budget_s", type=float, default=540.0,
                  help="wall-clock budget: prefill_32k / train_8k cells start only while there is time left")
  ap.add_argument("--cell_reserve_s", type=float, default=60.0, help="the time one long-context cell may take")
  args = ap.parse_args(argv)
  cfg = ModelConfig(**(DRY if args.dry_run else FULL), param_dtype="bfloat16")  # compute dtype follows
  result = {"device": str(jax.devices()[0].device_kind), "dry_run": args.dry_run,
            "config": {k: getattr(cfg, k) for k in ("dim", "num_layers", "ffn_dim", "num_experts", "vocab_size")},
            "benches": {}}
  start = args.start = time.perf_counter()

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
