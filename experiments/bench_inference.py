"""CPU inference benchmark, side by side with HF transformers on the same weights, in one run.

    python experiments/bench_inference.py            # the issue's config; writes experiments/results/
    python experiments/bench_inference.py --quick    # small dims, a smoke run

Model: an HF-written random MixtralForCausalLM (D=512, F=1792, 8 layers, 8 experts top-2, 8 heads /
2 KV heads, vocab 32000, float32), saved with save_pretrained, converted with `python -m mixtral_jax.convert`
and loaded the way a user loads it, `checkpoint.load_model(dir)`: the backend's fastest exact execution
by default (on CPU per-layer buffers, sorted_loop prefill, routed_cond decode; the results record it as
`execution`; --layout / --prefill_dispatch / --decode_dispatch ask for another). Measured through the
public `sampling.prefill` / `sampling.decode`: prefill B4 x T512 (the forward that yields the first new
token: HF with logits_to_keep=1), greedy decode B1 x 128 and B8 x 64 new tokens after a 32-token prompt
(HF: generate(N) - generate(1), ours: the jitted decode loop alone). Against the machine in the same
run: matmul GFLOP/s (MFU) and read bandwidths (roofline.py): the batch-1 floor = weight bytes a token
must read / a large matrix-vector product's bandwidth; the batch-8 floor = bytes a step must read / the
bandwidth of [8, D] @ [D, F] products, which XLA:CPU streams at about half the matrix-vector rate.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import report, roofline  # noqa: E402
from experiments.roofline import best_time  # noqa: E402
from mixtral_jax import hostmem
from mixtral_jax.inference import sampling  # noqa: E402
from mixtral_jax.execution import to_dict  # noqa: E402
from mixtral_jax.checkpoints.params import config_to_hf  # noqa: E402

FULL = dict(vocab_size=32000, dim=512, ffn_dim=1792, num_layers=8, num_experts=8, top_k=2, num_heads=8,
            num_kv_heads=2, head_dim=64, max_positions=4096, rope_theta=1e6)
QUICK = dict(FULL, vocab_size=4000, dim=128, ffn_dim=256, num_layers=2)


def decode_bytes_per_step(cfg, context: int, batch: int = 1) -> float:
  """Bytes one decode step of `batch` rows must read (float32): attention weights, router, norms, LM head,
  each row's KV cache, and the experts the step's slots choose -- for batch 1 its top_k, for a batch the
  expected number of distinct experts under uniform routing, E (1 - (1 - k/E)^B) per layer (7.2 of 8 at
  B8, k=2)."""
  d, l, e, k = cfg.dim, cfg.num_layers, cfg.num_experts, cfg.top_k
  attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  experts = (k if batch == 1 else e * (1 - (1 - k / e) ** batch)) * 3 * d * cfg.ffn_dim
  per_layer = attn + experts + d * cfg.num_experts + 2 * d
  kv = 2 * context * cfg.num_kv_heads * cfg.head_dim * batch
  return 4 * (l * (per_layer + kv) + d * cfg.vocab_size + d)


def prefill_flops(cfg, batch: int, t: int) -> float:
  """Matmul FLOPs of a prefill: 2 x active weights per token (no embedding lookup) + causal attention."""
  d, l = cfg.dim, cfg.num_layers
  attn_w = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  per_token = l * (attn_w + cfg.top_k * 3 * d * cfg.ffn_dim + d * cfg.num_experts)
  attention = l * 2 * 2 * cfg.num_heads * cfg.head_dim * t * (t + 1) / 2  # QK^T and PV, causal half
  return 2 * per_token * batch * t + attention * batch + 2 * batch * d * cfg.vocab_size


def load_ours(path: str, execution=None):
  """The HF directory converted with our CLI and loaded as a user loads it: `checkpoint.load_model(dir)`
  (execution None = the backend's default; the --layout / --*_dispatch flags ask for another)."""
  from mixtral_jax.checkpoints import store as checkpoint
  out = path + "_converted"
  subprocess.run([sys.executable, "-m", "mixtral_jax.convert", path, out], check=True,
                 cwd=os.path.dirname(HERE), stdout=subprocess.DEVNULL)
  model = checkpoint.load_model(out, dtype="float32", execution=execution)
  return model, "python -m mixtral_jax.convert + checkpoint.load_model"


def requested_execution(args):
  """None (load_model's default) unless a flag asks for something else: then only those fields."""
  from mixtral_jax.execution import Execution
  fields = {name: value for name, value in (("layout", args.layout), ("prefill_dispatch", args.prefill_dispatch),
                                            ("decode_dispatch", args.decode_dispatch)) if value != "auto"}
  return Execution(**fields) if fields else None


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--repeats", type=int, default=3)
  # How ours runs: "auto" = what checkpoint.load_model picks for this backend (the public default).
  ap.add_argument("--layout", default="auto", choices=["auto", "unstacked", "stacked"])
  ap.add_argument("--host-memory", default="retain", choices=hostmem.POLICIES,
                  help="malloc policy for the whole process, so for HF and ours alike (mixtral_jax/hostmem.py)")
  ap.add_argument("--prefill_dispatch", default="auto")
  ap.add_argument("--decode_dispatch", default="auto")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "inference_cpu"))
  args = ap.parse_args()
  host_memory = hostmem.apply(args.host_memory)  # the policy in effect
  import torch
  import transformers
  from mixtral_jax.config import ModelConfig
  dims = QUICK if args.quick else FULL
  cfg = ModelConfig(**dims).replace()
  prefill_shape, decode_runs, prompt = ((4, 512), [(1, 128), (8, 64)], 32)
  if args.quick:
    prefill_shape, decode_runs, prompt = (2, 64), [(1, 16), (4, 8)], 8

  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(**config_to_hf(cfg))
  hf = transformers.MixtralForCausalLM(hf_cfg).eval()
  tmp = tempfile.mkdtemp(prefix="bench_inference_")
  hf.save_pretrained(tmp)
  hf = transformers.MixtralForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
  ours, how = load_ours(tmp, requested_execution(args))
  run = ours.execution  # what load_model resolved: the record says what was timed
  dispatch = f"{run.layout} layout, prefill {run.prefill_dispatch}, decode {run.decode_dispatch}"
  print(f"loaded ours via {how}; {dispatch}", flush=True)

  load_before = os.getloadavg()
  # The machine is shared: every figure (ours, HF and the roofline) is the best of several measurements
  # spread over the run, so a burst of someone else's load does not pick the winner.
  peaks = [roofline.measure(quick=args.quick)]
  peak = dict(peaks[0])

  def remeasure():
    peaks.append(roofline.measure(quick=args.quick))
    for key in ("matmul_gflops", "read_gbps", "read1_gbps", "read8_gbps"):
      peak[key] = max(p[key] for p in peaks)
    print(f"roofline so far: {peak['matmul_gflops']:.1f} GFLOP/s matmul, {peak['read_gbps']:.1f} GB/s read",
          flush=True)

  rows = []
  rng = np.random.default_rng(0)

  # Prefill.
  b, t = prefill_shape
  tokens = rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
  ours_s = best_time(lambda: sampling.prefill(ours, tokens, 1),
                     repeats=args.repeats)
  hf_s = float("nan")
  if not args.skip_hf:
    tt = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
      hf_s = best_time(lambda: hf(tt, use_cache=True, logits_to_keep=1), repeats=args.repeats)
  remeasure()
  flops = prefill_flops(cfg, b, t)
  rows.append(dict(what=f"prefill B{b}xT{t}", ours_tok_s=b * t / ours_s, hf_tok_s=b * t / hf_s,
                   flops=flops, tokens=b * t,
                   ours_mfu=flops / ours_s / 1e9 / peak["matmul_gflops"],
                   hf_mfu=flops / hf_s / 1e9 / peak["matmul_gflops"]))

  # Greedy decode.
  for b, n in decode_runs:
    prompts = rng.integers(1, cfg.vocab_size, (b, prompt)).astype(np.int32)

    def ours_decode():
      state = sampling.prefill(ours, prompts, n)
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      sampling.decode(ours, state).tokens.block_until_ready()
      return time.perf_counter() - t0

    ours_decode()
    ours_step = min(ours_decode() for _ in range(args.repeats + 1)) / (n - 1)
    hf_step = float("nan")
    if not args.skip_hf:
      tt = torch.as_tensor(prompts, dtype=torch.long)
      gen = lambda k: hf.generate(tt, max_new_tokens=k, min_new_tokens=k, do_sample=False,  # noqa: E731
                                  pad_token_id=0)
      with torch.no_grad():
        hf_step = (best_time(gen, n, repeats=args.repeats) - best_time(gen, 1, repeats=args.repeats)) / (n - 1)
    remeasure()
    row = dict(what=f"decode B{b}x{n}", ours_tok_s=b / ours_step, hf_tok_s=b / hf_step,
               ours_ms_per_step=ours_step * 1e3, hf_ms_per_step=hf_step * 1e3)
    # The floor: bytes the step must read / the read bandwidth of a matmul of the same batch size.
    row.update(floor_bytes=decode_bytes_per_step(cfg, prompt + n, b),
               floor_bw="read_gbps" if b == 1 else "read8_gbps")
    rows.append(row)
    print(row, flush=True)

  remeasure()
  for r in rows:  # MFU and floor against the best roofline of the whole run
    r["speedup_vs_hf"] = r["ours_tok_s"] / r["hf_tok_s"]
    if "ours_mfu" in r:
      r["ours_mfu"], r["hf_mfu"] = r["flops"] * r["ours_tok_s"] / r["tokens"] / 1e9 / peak["matmul_gflops"], \
          r["flops"] * r["hf_tok_s"] / r["tokens"] / 1e9 / peak["matmul_gflops"]
    if "floor_bytes" in r:
      r["floor_ms"] = r["floor_bytes"] / (peak[r["floor_bw"]] * 1e9) * 1e3
      r["ours_of_floor"] = r["floor_ms"] / r["ours_ms_per_step"]
      r["hf_of_floor"] = r["floor_ms"] / r["hf_ms_per_step"]
      if r["floor_bw"] == "read_gbps":  # context: the same bytes at the expert-sized matvec rate
        r["floor1_ms"] = r["floor_bytes"] / (peak["read1_gbps"] * 1e9) * 1e3
        r["ours_of_floor1"] = r["floor1_ms"] / r["ours_ms_per_step"]
  result = dict(config=dims, roofline=peak, roofline_samples=peaks, load_avg_before=load_before, load_avg_after=os.getloadavg(),
                ours_loaded_via=how, dispatch=dispatch, execution=to_dict(run), torch_threads=torch.get_num_threads(),
                host_memory=host_memory,
                rows=rows)
  lines = [f"# CPU inference vs HF transformers ({'quick' if args.quick else 'issue config'})", "",
           f"roofline in this run (best of {len(peaks)}): {peak['matmul_gflops']:.1f} GFLOP/s float32 matmul, "
           f"{peak['read_gbps']:.1f} GB/s read by a matrix-vector product, {peak['read8_gbps']:.1f} GB/s by "
           f"[8, D] @ [D, F] products (the batch-8 floor's bandwidth); 2 shared cores, load average {load_before[0]:.1f} before, "
           f"{os.getloadavg()[0]:.1f} after; ours loaded via {how}; {dispatch}; host memory policy for the whole "
           f"process (HF and ours alike): {host_memory}", "",
           "| run | ours tok/s | HF tok/s | ours / HF | MFU ours / HF | ms per step ours / HF | % of BW floor ours / HF |",
           "| --- | ---: | ---: | ---: | --- | --- | --- |"]
  for r in rows:
    mfu = f"{r['ours_mfu']:.0%} / {r['hf_mfu']:.0%}" if "ours_mfu" in r else ""
    ms = f"{r['ours_ms_per_step']:.1f} / {r['hf_ms_per_step']:.1f}" if "ours_ms_per_step" in r else ""
    fl = (f"{r['ours_of_floor']:.0%} / {r['hf_of_floor']:.0%} (floor {r['floor_ms']:.1f} ms)"
          if "floor_ms" in r else "")
    lines.append(f"| {r['what']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['speedup_vs_hf']:.2f}x | "
                 f"{mfu} | {ms} | {fl} |")
  for r in rows:
    if "floor1_ms" in r:
      lines += ["", f"{r['what']}: at the {peak['read1_gbps']:.1f} GB/s that [1, D] @ [D, F] products of one "
                f"expert's size reach in this run, the same bytes take {r['floor1_ms']:.1f} ms: ours is at "
                f"{r['ours_of_floor1']:.0%} of that."]
  report.write_results(args.out, result, lines)


if __name__ == "__main__":
  main()
