"""CPU attention speed: ours (the default a user gets, block-causal `xla`, `flash`) vs HF's SDPA, in one run.

    python experiments/bench_attention.py                        # T = 512, 2048, 8192; experiments/results/
    python experiments/bench_attention.py --seqs 512,2048 --repeats 5 --no-layer
    python experiments/bench_attention.py --quick --out DIR      # tiny heads, a smoke run (seconds)

Causal self-attention at Mixtral 8x7B's attention shape (H=32 query heads, K=8 kv heads, Dh=128, batch 1,
float32), forward and forward+backward (gradients w.r.t. q, k and v of <out, cotangent>), same inputs for
every arm:

  ours (default)  mixtral_jax.attention.attend(..., impl=run.attention, min_len=run.attention_min_len,
                  block=run.causal_block, flash_block=run.flash_block) with run = execution.resolve(Execution()):
                  what the model calls (model/mixtral.py attention_options). The `runs` column says which
                  implementation that resolves to at each T (keys < attention_min_len: xla).
  xla             ATTENTIONS.get("xla"): the materialised, block-causal scores (the implementation before flash).
  flash           ATTENTIONS.get("flash") with the default flash_block, forced at every T.
  HF (torch sdpa) torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) on
                  the same float32 tensors in HF's layout ([B, T, H, Dh] viewed as [B, H, T, Dh], output
                  transposed back and made contiguous): what HF Mixtral's "sdpa" attention calls with no
                  padding mask (transformers/integrations/sdpa_attention.py). torch gets os.cpu_count() threads.

Each arm's program is compiled first and its temp memory read from XLA
(`jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`); a program needing more than
--max-temp-gib (12) is not run ("skipped: N GiB temp"): xla's fwd+bwd at T=8192 keeps [32, T, T]-sized
scores and probabilities. Then one untimed warm-up call per arm (--warmup), then --repeats rounds in which
every arm runs once, the order alternating, so each ratio is taken per round on the same machine state.

FLOPs (FlashAttention's benchmark convention, benchmarks/benchmark_flash_attention.py): causal forward
= 4 * B * H * T^2 * Dh / 2 (QK^T and PV, half the square); backward = 2.5 x forward, so forward+backward
= 3.5 x forward. The % of peak is against a 2048^3 float32 matmul (roofline.matmul_gflops) measured before
and after in the same run (the best of both). Correctness: each arm's output (and gradients) against
HF's, relative Frobenius error; the default's output must be within 1e-4 (asserted after the results are
written).

The layer section (off with --no-layer) times the whole attention layer through the public model API: a
1-layer Mixtral with 8x7B attention widths (D=4096, H=32, K=8, Dh=128; a tiny MoE: F=256, vocab 512) built
from HF's random weights (`checkpoint.params.from_hf` + `model.from_params`, the default execution;
`model.with_execution(model, attention=...)` for the others), `jit(lambda x: model(x).logits)` vs HF
MixtralForCausalLM(attn_implementation="sdpa") under inference_mode: forward (prefill) only.

Writes STEM.json / STEM.md (report.write_results); STEM = --out (a directory gets bench_attention in it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import report, roofline  # noqa: E402
from mixtral_jax import hostmem  # noqa: E402
from mixtral_jax.attention import ATTENTIONS, attend  # noqa: E402
from mixtral_jax.execution import Execution, resolve, to_dict  # noqa: E402

FULL = dict(heads=32, kv_heads=8, head_dim=128, seqs=(512, 2048, 8192), peak_n=2048,
            layer=dict(vocab_size=512, dim=4096, num_heads=32, num_kv_heads=8, head_dim=128, ffn_dim=256))
QUICK = dict(heads=4, kv_heads=2, head_dim=16, seqs=(64, 2048), peak_n=256,
             layer=dict(vocab_size=128, dim=64, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=32))
ARMS = ("default", "xla", "flash", "hf")
LABELS = {"default": "ours (default)", "xla": "xla (block-causal, materialised)", "flash": "flash (forced)",
          "hf": "HF (torch sdpa)"}
MODES = ("fwd", "fwd+bwd")
FWD_BWD_FACTOR = 3.5  # FlashAttention's convention: backward = 2.5 x forward
CHECK_TOL = 1e-4


def causal_flops(b: int, h: int, t: int, dh: int, mode: str) -> float:
  fwd = 4 * b * h * t * t * dh / 2
  return fwd if mode == "fwd" else FWD_BWD_FACTOR * fwd


def resolved_impl(run: Execution, t: int) -> str:
  """The implementation `attend` picks for self-attention over t keys (api.attend's rule)."""
  return "xla" if (t == 1 or t < run.attention_min_len) else run.attention


def make_inputs(t: int, dims: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
  h, kvh, dh = dims["heads"], dims["kv_heads"], dims["head_dim"]
  return dict(q=normal(1, t, h, dh), k=normal(1, t, kvh, dh), v=normal(1, t, kvh, dh), cot=normal(1, t, h, dh),
              pos=np.arange(t, dtype=np.int32)[None], seg=np.ones((1, t), np.int32))


def our_attention(arm: str, run: Execution):
  """arm -> fn(q, k, v, pos, seg) -> out: causal self-attention, no window, as the model calls it."""
  if arm == "default":
    return lambda q, k, v, pos, seg: attend(q, k, v, pos, pos, seg, seg, window=None, causal_self=True,
                                            impl=run.attention, min_len=run.attention_min_len,
                                            block=run.causal_block, flash_block=run.flash_block)
  fn = ATTENTIONS.get(arm)
  block = run.causal_block if arm == "xla" else run.flash_block
  return lambda q, k, v, pos, seg: fn(q, k, v, pos, pos, seg, seg, window=None, causal_self=True, block=block)


def our_program(arm: str, run: Execution, mode: str):
  f = our_attention(arm, run)
  if mode == "fwd":
    return lambda x: f(x["q"], x["k"], x["v"], x["pos"], x["seg"])
  loss = lambda q, k, v, x: jnp.sum(f(q, k, v, x["pos"], x["seg"]) * x["cot"])  # noqa: E731
  grad = jax.grad(loss, argnums=(0, 1, 2))
  return lambda x: grad(x["q"], x["k"], x["v"], x)  # (dq, dk, dv)


def hf_program(inputs: dict, mode: str):
  """HF's sdpa call on the same float32 tensors -> a no-argument callable returning out or (dq, dk, dv)."""
  import torch
  import torch.nn.functional as F
  q, k, v, cot = (torch.from_numpy(inputs[n]) for n in ("q", "k", "v", "cot"))

  def attention(q, k, v):  # [B, T, N, Dh] -> HF's [B, N, T, Dh] views -> [B, T, H, Dh] contiguous
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous()

  if mode == "fwd":
    def fwd():
      with torch.no_grad():
        return attention(q, k, v)
    return fwd
  leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

  def fwd_bwd():
    for x in leaves:
      x.grad = None
    (attention(*leaves) * cot).sum().backward()
    return tuple(x.grad for x in leaves)
  return fwd_bwd


def seconds(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_numpy(x):
  if isinstance(x, tuple):
    return tuple(to_numpy(y) for y in x)
  return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def compile_ours(program, args, max_temp: float) -> dict:
  """Compiles program(*args); -> dict(call, temp_bytes, compile_s) or dict(skipped=why, temp_bytes)."""
  t0 = time.perf_counter()
  compiled = jax.jit(program).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = None if mem is None else int(mem.temp_size_in_bytes)
  if temp is not None and temp > max_temp:
    return dict(skipped=f"skipped: {temp / 2 ** 30:.1f} GiB temp", temp_bytes=temp, compile_s=compile_s)
  return dict(call=lambda: compiled(*args), temp_bytes=temp, compile_s=compile_s)


def rounds(calls: dict, repeats: int, warmup: int) -> tuple:
  """calls {arm: fn}: a first call each (kept: the outputs), `warmup` untimed calls each, then `repeats`
  rounds of every arm once, the order reversed every other round. -> (times {arm: [s]}, first outputs,
  first-call seconds)."""
  first, first_s = {}, {}
  for arm, fn in calls.items():
    t0 = time.perf_counter()
    first[arm] = jax.block_until_ready(fn())
    first_s[arm] = time.perf_counter() - t0
  for _ in range(warmup):
    for fn in calls.values():
      jax.block_until_ready(fn())
  times = {arm: [] for arm in calls}
  order = list(calls)
  for i in range(repeats):
    for arm in (order if i % 2 == 0 else order[::-1]):
      times[arm].append(seconds(calls[arm]))
  return times, first, first_s


def summarize(times: list, flops: float, peak: float) -> dict:
  med = statistics.median(times)
  return dict(times_s=times, median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
              gflops=flops / med / 1e9, of_peak=flops / med / 1e9 / peak)


def ratio_stats(num: list, den: list) -> dict:
  """Per round num_time / den_time (> 1: the denominator arm is faster)."""
  r = [a / b for a, b in zip(num, den)]
  return dict(median=statistics.median(r), min=min(r), max=max(r))


def time_arms(cell: dict, calls: dict, flops: float, args) -> tuple:
  """Runs the arms in alternating rounds; fills each arm's row with its times, GFLOP/s and its ratios to
  HF and to xla (per round). Returns (times, first outputs)."""
  times, first, first_s = rounds(calls, args.repeats, args.warmup)
  for arm, ts in times.items():
    row = cell["arms"][arm]
    row.update(summarize(ts, flops, args.peak), first_call_s=first_s[arm])
    if "hf" in times and arm != "hf":
      row["vs_hf"] = ratio_stats(times["hf"], ts)
    if "xla" in times and arm != "xla":
      row["vs_xla"] = ratio_stats(times["xla"], ts)
  return times, first


def bench_cell(t: int, mode: str, dims: dict, run: Execution, args) -> dict:
  inputs = make_inputs(t, dims)
  x = jax.device_put({k: jnp.asarray(v) for k, v in inputs.items()})
  flops = causal_flops(1, dims["heads"], t, dims["head_dim"], mode)
  cell = dict(t=t, mode=mode, flops=flops, default_runs=resolved_impl(run, t), arms={})
  calls = {}
  for arm in ARMS[:-1]:
    c = compile_ours(our_program(arm, run, mode), (x,), args.max_temp_gib * 2 ** 30)
    cell["arms"][arm] = {k: c[k] for k in ("temp_bytes", "compile_s", "skipped") if k in c}
    if "call" in c:
      calls[arm] = c["call"]
    else:
      print(f"T={t} {mode} {arm}: {c['skipped']}", flush=True)
  if args.hf:
    calls["hf"] = hf_program(inputs, mode)
    cell["arms"]["hf"] = {}
  times, first = time_arms(cell, calls, flops, args)
  ref = to_numpy(first["hf"]) if "hf" in first else None
  for arm in times:
    row = cell["arms"][arm]
    if ref is not None and arm != "hf":
      got = to_numpy(first[arm])
      if mode == "fwd":
        row["rel_err_vs_hf"] = rel_err(got, ref)
      else:
        errs = [rel_err(a, b) for a, b in zip(got, ref)]
        row["rel_err_vs_hf"] = max(errs)
        row["grad_rel_err_vs_hf"] = dict(zip(("dq", "dk", "dv"), errs))
  del first, calls
  return cell


def bench_layer(t: int, cfg, hf, models: dict, args) -> dict:
  """Forward of the 1-layer model through the public API (full logits) vs HF's, per attention setting."""
  import torch
  from flax import nnx
  from experiments.bench_inference import prefill_flops
  tokens = np.random.default_rng(t).integers(1, cfg.vocab_size, (1, t)).astype(np.int32)
  x = jnp.asarray(tokens)
  flops = prefill_flops(cfg, 1, t) + 2 * (t - 1) * cfg.dim * cfg.vocab_size  # + every position's logits
  cell = dict(t=t, flops=flops, arms={})
  calls = {}
  for arm, model in models.items():
    graphdef, state = nnx.split(model)
    program = lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x).logits  # noqa: E731
    c = compile_ours(program, (state, x), args.max_temp_gib * 2 ** 30)
    cell["arms"][arm] = {k: c[k] for k in ("temp_bytes", "compile_s", "skipped") if k in c}
    cell["arms"][arm]["runs"] = resolved_impl(model.execution, t)
    if "call" in c:
      calls[arm] = c["call"]
    else:
      print(f"layer T={t} {arm}: {c['skipped']}", flush=True)
  if hf is not None:
    tt = torch.as_tensor(tokens, dtype=torch.long)

    def hf_forward():
      with torch.inference_mode():
        return hf(tt).logits
    calls["hf"] = hf_forward
    cell["arms"]["hf"] = {}
  times, first = time_arms(cell, calls, flops, args)
  ref = to_numpy(first["hf"]) if "hf" in first else None
  for arm in times:
    if ref is not None and arm != "hf":
      cell["arms"][arm]["rel_err_vs_hf"] = rel_err(to_numpy(first[arm]), ref)
  return cell


def layer_models(dims: dict, max_t: int, use_hf: bool):
  """(cfg, HF model or None, {arm: our model}) on the same random weights (HF's when HF is there)."""
  from mixtral_jax.config import ModelConfig
  from mixtral_jax.model import build, from_params, with_execution
  cfg = ModelConfig(**dims, num_layers=1, num_experts=8, top_k=2, max_positions=max(max_t, 128)).replace()
  hf = None
  if use_hf:
    import torch
    import transformers
    from mixtral_jax.checkpoints.params import config_to_hf, from_hf
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **config_to_hf(cfg), attn_implementation="sdpa")).eval()
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    ours = from_params(cfg, from_hf(state.__getitem__, list(state), cfg))  # the default execution
    del state
  else:
    ours = build(cfg, seed=0)
  models = {"default": ours, "xla": with_execution(ours, attention="xla"),
            "flash": with_execution(ours, attention="flash", attention_min_len=1)}
  return cfg, hf, models


def fmt_ratio(r: dict) -> str:
  return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else "-"


def table_rows(cell: dict, arms: tuple, runs_of) -> list:
  lines = []
  for arm in arms:
    row = cell["arms"].get(arm)
    if row is None:
      continue
    temp = "-" if row.get("temp_bytes") is None else f"{row['temp_bytes'] / 2 ** 20:.0f}"
    if "skipped" in row:
      lines.append(f"| {cell['t']} | {cell.get('mode', 'fwd')} | {LABELS[arm]} | {runs_of(arm)} | {row['skipped']} "
                   f"| | | | | | {temp} | |")
      continue
    err = row.get("rel_err_vs_hf")
    lines.append(
        f"| {cell['t']} | {cell.get('mode', 'fwd')} | {LABELS[arm]} | {runs_of(arm)} | {row['median_ms']:.1f} | "
        f"{row['min_ms']:.1f}-{row['max_ms']:.1f} | {row['gflops']:.1f} | {row['of_peak']:.0%} | "
        f"{fmt_ratio(row.get('vs_hf'))} | {fmt_ratio(row.get('vs_xla'))} | {temp} | "
        f"{'-' if err is None else f'{err:.1e}'} |")
  return lines


HEADER = ["| T | pass | implementation | runs | median ms | min-max ms | GFLOP/s | % of peak | vs HF | vs xla | "
          "temp MiB | rel err vs HF |",
          "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]


def markdown(record: dict) -> list:
  d, m = record["dims"], record["machine"]
  run = record["execution"]
  lines = [
      f"# Causal self-attention on CPU: ours vs HF's SDPA ({record['mode']})", "",
      f"Shape: batch 1, H={d['heads']} query heads, K={d['kv_heads']} kv heads, Dh={d['head_dim']}, float32, "
      f"T in {', '.join(map(str, record['seqs']))}. Default execution (execution.resolve(Execution())): "
      f"attention={run['attention']!r}, attention_min_len={run['attention_min_len']}, "
      f"flash_block={run['flash_block']}, causal_block={run['causal_block']}.", "",
      f"Machine: {m['device']} ({m['backend']}), {m['cpu_count']} cores, torch threads {record['torch_threads']}, "
      f"jax {m['jax']}; host memory policy {record['host_memory']}; load average {record['load_avg_before']:.2f} "
      f"before, {record['load_avg_after']:.2f} after. Matmul peak in this run: **{record['peak_gflops']:.1f} "
      f"GFLOP/s** float32 ({record['peak_n']}^3, best of {len(record['peak_samples'])} samples: "
      f"{', '.join(f'{p:.1f}' for p in record['peak_samples'])}).", "",
      f"Times: median of {record['repeats']} rounds (min-max) after a first call and {record['warmup']} untimed "
      f"warm-up call(s); every arm runs once per round, order alternating. `vs HF` / `vs xla`: that arm's time / "
      f"this arm's, per round, median (range); > 1 = this arm is faster. GFLOP/s on causal FLOPs "
      f"(FlashAttention's convention): forward 4*B*H*T^2*Dh/2, forward+backward {FWD_BWD_FACTOR} x that. `temp "
      f"MiB`: XLA's compiled temp allocation (memory_analysis); programs above {record['max_temp_gib']:g} GiB "
      f"are not run. `rel err vs HF`: ||ours - HF|| / ||HF|| of the output (fwd) or the worst of dq, dk, dv "
      f"(fwd+bwd). `runs`: the implementation the arm executes at that T.", "",
  ] + HEADER
  for cell in record["cells"]:
    lines += table_rows(cell, ARMS, lambda arm, c=cell: c["default_runs"] if arm == "default" else
                        ("torch sdpa" if arm == "hf" else arm))
  check = record["check"]
  lines += ["", f"Check: ours (default) output vs HF's, worst relative error over T: "
            f"{check['default_fwd_rel_err']:.1e} "
            f"(tolerance {CHECK_TOL:g}: {'ok' if check['ok'] else 'FAILED'}); gradients, worst: "
            f"{check['default_grad_rel_err']:.1e}."]
  if record.get("layer"):
    lc = record["layer"]
    lines += ["", "## The attention layer through the public model API (forward, full logits)", "",
              f"A 1-layer Mixtral, {lc['config']}, HF's random weights in both (`from_hf` + `from_params`; "
              f"`with_execution(model, attention=...)`), `jit(lambda x: model(x).logits)` vs "
              f"HF `MixtralForCausalLM(attn_implementation=\"sdpa\")(x).logits` under inference_mode. GFLOP/s "
              f"on the layer's matmul FLOPs (projections, router, top-2 experts, causal attention, LM head on "
              f"every position). `temp MiB`: the whole program's. HF: attention `{lc['hf_attention']}`, experts "
              f"`{lc['hf_experts']}`.", ""] + HEADER
    for cell in lc["cells"]:
      lines += table_rows(cell, ARMS, lambda arm, c=cell: ("torch sdpa" if arm == "hf" else
                                                          c["arms"][arm].get("runs", arm)))
  return lines


def out_stem(args) -> str:
  if args.out is None:
    base = tempfile.mkdtemp(prefix="bench_attention_") if args.quick else os.path.join(HERE, "results")
    return os.path.join(base, "bench_attention")
  if os.path.isdir(args.out) or args.out.endswith(os.sep):
    return os.path.join(args.out, "bench_attention")
  return args.out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 512,2048,8192; "
                  "--quick: 64,2048: both sides of the CPU default's attention_min_len)")
  ap.add_argument("--repeats", type=int, default=3, help="timed rounds per cell (after a first call)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed calls per arm after the first")
  ap.add_argument("--quick", action="store_true", help="H=4, K=2, Dh=16 and short sequences: a smoke run")
  ap.add_argument("--out", default=None, help="results stem (STEM.json, STEM.md) or a directory; default "
                  "experiments/results/bench_attention, with --quick a temporary directory")
  ap.add_argument("--max-temp-gib", type=float, default=12.0, help="skip programs whose XLA temp memory exceeds this")
  ap.add_argument("--modes", default=",".join(MODES), help="fwd and/or fwd+bwd")
  ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip the torch peer (and the check)")
  ap.add_argument("--no-layer", dest="layer", action="store_false", help="skip the model-API layer section")
  ap.add_argument("--host-memory", default="retain", choices=hostmem.POLICIES,
                  help="malloc policy for the whole process, HF and ours alike (mixtral_jax/hostmem.py)")
  args = ap.parse_args(argv)
  if args.repeats < 1:
    sys.exit("error: --repeats must be >= 1")
  host_memory = hostmem.apply(args.host_memory)  # before JAX or torch start threads
  dims = QUICK if args.quick else FULL
  seqs = tuple(int(s) for s in args.seqs.split(",")) if args.seqs else dims["seqs"]
  modes = tuple(args.modes.split(","))
  assert set(modes) <= set(MODES), modes
  stem = out_stem(args)
  torch_threads = None
  if args.hf:
    import torch
    torch.set_num_threads(os.cpu_count())
    torch_threads = torch.get_num_threads()
  run = resolve(Execution())
  load_before = os.getloadavg()[0]
  peaks = [roofline.matmul_gflops(dims["peak_n"])]
  args.peak = peaks[0]
  print(f"matmul peak {args.peak:.1f} GFLOP/s; default execution: attention={run.attention} from "
        f"{run.attention_min_len} keys, flash_block={run.flash_block}, causal_block={run.causal_block}", flush=True)
  cells = []
  for t in seqs:
    for mode in modes:
      cell = bench_cell(t, mode, dims, run, args)
      cells.append(cell)
      print(f"T={t} {mode}: " + "; ".join(
          f"{arm} {r['median_ms']:.1f} ms" + (f" ({r['vs_hf']['median']:.2f}x HF)" if "vs_hf" in r else "")
          for arm, r in cell["arms"].items() if "median_ms" in r), flush=True)
  layer = None
  if args.layer:
    cfg, hf, models = layer_models(dims["layer"], max(seqs), args.hf)
    layer = dict(config=f"D={cfg.dim}, H={cfg.num_heads}, K={cfg.num_kv_heads}, Dh={cfg.head_dim}, "
                        f"F={cfg.ffn_dim}, E={cfg.num_experts} top-{cfg.top_k}, vocab {cfg.vocab_size}, float32",
                 execution=to_dict(models["default"].execution), cells=[],
                 hf_attention=None if hf is None else hf.config._attn_implementation,
                 hf_experts=None if hf is None else getattr(hf.config, "_experts_implementation", None))
    for t in seqs:
      cell = bench_layer(t, cfg, hf, models, args)
      layer["cells"].append(cell)
      print(f"layer T={t}: " + "; ".join(f"{arm} {r['median_ms']:.1f} ms" for arm, r in cell["arms"].items()
                                         if "median_ms" in r), flush=True)
    del hf, models
  peaks.append(roofline.matmul_gflops(dims["peak_n"]))
  peak = max(peaks)
  for section in [cells] + ([layer["cells"]] if layer else []):  # % of peak against the run's best sample
    for cell in section:
      for row in cell["arms"].values():
        if "gflops" in row:
          row["of_peak"] = row["gflops"] / peak
  fwd_errs = [c["arms"]["default"]["rel_err_vs_hf"] for c in cells
              if c["mode"] == "fwd" and "rel_err_vs_hf" in c["arms"]["default"]]
  grad_errs = [c["arms"]["default"]["rel_err_vs_hf"] for c in cells
               if c["mode"] == "fwd+bwd" and "rel_err_vs_hf" in c["arms"]["default"]]
  check = dict(default_fwd_rel_err=max(fwd_errs, default=float("nan")),
               default_grad_rel_err=max(grad_errs, default=float("nan")), tolerance=CHECK_TOL,
               ok=all(e <= CHECK_TOL for e in fwd_errs))
  record = dict(mode="quick" if args.quick else "full", dims={k: dims[k] for k in ("heads", "kv_heads", "head_dim")},
                seqs=list(seqs), modes=list(modes), repeats=args.repeats, warmup=args.warmup,
                execution=to_dict(run), machine=roofline.describe(), torch_threads=torch_threads,
                host_memory=host_memory, load_avg_before=load_before, load_avg_after=os.getloadavg()[0],
                peak_gflops=peak, peak_samples=peaks, peak_n=dims["peak_n"], max_temp_gib=args.max_temp_gib,
                flops_convention=f"causal forward 4*B*H*T^2*Dh/2; forward+backward {FWD_BWD_FACTOR}x (FlashAttention)",
                check=check, cells=cells, layer=layer)
  report.write_results(stem, record, markdown(record))
  print(f"wrote {stem}.json and {stem}.md")
  if fwd_errs:
    assert check["ok"], (f"ours (default) differs from HF's sdpa: rel err {check['default_fwd_rel_err']:.2e} > "
                         f"{CHECK_TOL}")
  return record


if __name__ == "__main__":
  main()
