"""The public API a new user calls, timed side by side with HF transformers on the same weights, in one run.

    python experiments/bench_public_api.py                      # the issue's config; experiments/results/
    python experiments/bench_public_api.py --quick --out DIR    # small dims, < 1 min: a smoke run

Measure what the user calls, never a private function. Model: an HF-written random MixtralForCausalLM
(D=512, F=1792, 8 layers, 8 experts top-2, 8 heads / 2 KV heads, head_dim 64, vocab 32000, float32, torch
seed 0), `save_pretrained` to a directory, converted with `python -m mixtral_jax.convert HF_DIR OUR_DIR`,
then loaded the way each README shows it: `checkpoint.load_model(OUR_DIR)` and
`MixtralForCausalLM.from_pretrained(HF_DIR)`. Timed, each after a first call reported apart as compile
(ours) / first-call (HF) time:

  forward      f = nnx.jit(lambda m, x: m(x).logits); f(model, x)   vs  hf(x).logits under inference_mode
  generate b1  sampling.generate(model, prompts, 128)               vs  hf.generate(x, max_new_tokens=128,
  generate b8  the same, 8 prompts x 64 new tokens                       min_new_tokens=128, do_sample=False)
  eval         python run.py --config=configs/eval.py --config.checkpoint=OUR_DIR (task perplexity)

Both sides get WARMUP untimed calls after the first (steady state, what an eval loop sees); each repeat
times ours and HF back to back (the order alternates), so a ratio is taken per repeat pair and
its range shows how much the shared machine moved. The eval mode's tokens/s is its own report (eval.json:
every position of the batches after the first, which compiles), one subprocess per repeat.

Flags: --repeats N (3), --host-memory retain|default (hostmem.apply once, before JAX or torch start threads;
passed on to the eval process), --out DIR, --quick (vocab 4000, D=128, F=256, 2 layers, small counts, and
the byte tokenizer for eval: Mixtral's 32000 pieces do not fit a 4000-token vocabulary). torch gets one
thread per core the process may run on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import report, roofline  # noqa: E402
from experiments.bench_inference import prefill_flops  # noqa: E402
from mixtral_jax import hostmem  # noqa: E402

FULL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_local_experts=8,
            num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=4096, rope_theta=1e6)
QUICK = dict(FULL, vocab_size=4000, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
# forward (B, T); generate {name: (B, prompt, new)}; eval (seq_len, batch_size, max_batches).
# A forward call and an eval batch hold the same number of tokens.
SIZES = {"full": dict(forward=(4, 512), generate={"generate_b1": (1, 32, 128), "generate_b8": (8, 32, 64)},
                      eval=(256, 8, 8)),
         "quick": dict(forward=(4, 128), generate={"generate_b1": (1, 8, 16), "generate_b8": (8, 8, 8)},
                       eval=(64, 8, 8))}
# Minimum median ratio; forward/generate: ours / HF tokens/s; eval: eval tokens/s / our forward tokens/s.
# Untimed calls of each side after the first: ours ran 1.9-2.8 s per forward for its first three timed
# calls and 0.96-1.06 s after (host memory still being faulted in), HF 1.75-1.88 s throughout.
WARMUP = 2
GOALS = {"forward": 1.2, "generate_b1": 3.0, "generate_b8": 3.0, "eval": 1.0}


def seconds(fn) -> float:
  """Wall time of one call, JAX results waited for (torch tensors are ready when fn returns). Not
  roofline.best_time: that keeps only the best, and the per-repeat pairs are the point here."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def spread(times: list, work: float) -> dict:
  """Seconds per call over repeats -> tokens/s: best (min time), median and range."""
  return dict(seconds=times, tok_s_best=work / min(times), tok_s_median=work / statistics.median(times),
              tok_s_range=[work / max(times), work / min(times)])


def side_by_side(ours, hf, work: float, repeats: int) -> tuple:
  """First call of each (compile / warm-up), then `repeats` timed pairs, alternating who goes first.
  -> (the row, ours' first output, HF's first output)."""
  t0 = time.perf_counter()
  ours_first = jax.block_until_ready(ours())
  ours_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  hf_first = hf()
  hf_first_s = time.perf_counter() - t0
  for _ in range(WARMUP):  # untimed: the first calls after compile still fault in fresh host memory
    jax.block_until_ready(ours())
    hf()
  ours_s, hf_s = [], []
  for i in range(repeats):
    for name in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
      (ours_s if name == "ours" else hf_s).append(seconds(ours if name == "ours" else hf))
  ratios = [h / o for o, h in zip(ours_s, hf_s)]  # ours tok/s / HF tok/s of the same pair
  row = dict(ours=spread(ours_s, work), hf=spread(hf_s, work), ours_compile_s=ours_compile,
             hf_first_call_s=hf_first_s, work_tokens=work, ratio_per_repeat=ratios,
             ratio_median=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)])
  return row, ours_first, hf_first


def agreement(ours_new: np.ndarray, hf_new: np.ndarray) -> dict:
  """Greedy tokens [B, N] of both: fraction equal, and the shortest common prefix over rows."""
  equal = ours_new == hf_new
  prefix = np.where(equal.all(1), equal.shape[1], (~equal).argmax(1))
  return dict(fraction_equal=float(equal.mean()), min_common_prefix=int(prefix.min()), new_tokens=equal.shape[1])


def run_eval(our_dir: str, workdir: str, sizes, max_batches: int, tokenizer: str, host_memory: str):
  """The eval mode as a user runs it; -> (wall seconds, its eval.json)."""
  seq_len, batch, _ = sizes
  cmd = [sys.executable, "run.py", "--config=configs/eval.py", f"--config.checkpoint={our_dir}",
         f"--workdir={workdir}", f"--config.eval.seq_len={seq_len}", f"--config.eval.batch_size={batch}",
         f"--config.eval.max_batches={max_batches}", f"--config.data.tokenizer={tokenizer}",
         f"--config.host_memory={host_memory}"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    sys.exit(f"error: the eval mode failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "eval.json")) as f:
    return wall, json.load(f)


def measure_eval(our_dir, tmp, sizes, tokenizer, host_memory, repeats, forward_tok_s) -> dict:
  """The eval mode's own throughput (eval.json `tokens_per_s`: every position of every batch after the
  first, which compiles), one subprocess per repeat."""
  seq_len, batch, max_batches = sizes
  runs = []
  for i in range(repeats):
    wall, result = run_eval(our_dir, os.path.join(tmp, f"eval_{i}"), sizes, max_batches, tokenizer, host_memory)
    runs.append(dict(wall_s=wall, tokens=result["tokens"], perplexity=result["perplexity"],
                     tok_s=result["tokens_per_s"], first_batch_s=result["first_batch_s"],
                     end_to_end_tok_s=result["tokens"] / wall))
  tok_s = [r["tok_s"] for r in runs]
  ratios = [t / forward_tok_s for t in tok_s]
  return dict(runs=runs, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch, max_batches=max_batches,
              tok_s_best=max(tok_s), tok_s_median=statistics.median(tok_s), tok_s_range=[min(tok_s), max(tok_s)],
              wall_s_median=statistics.median(r["wall_s"] for r in runs),
              vs_forward_tok_s=forward_tok_s, ratio_per_repeat=ratios, ratio_median=statistics.median(ratios),
              ratio_range=[min(ratios), max(ratios)],
              method="tokens/s as the eval mode reports it (eval.json tokens_per_s: every position of the "
                     "batches after the first, which compiles)")


def machine_facts(host_memory: str, torch) -> dict:
  import flax
  import transformers

  def git(*args):
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None
  status = git("status", "--porcelain")
  return dict(roofline.describe(), torch=torch.__version__, transformers=transformers.__version__,
              flax=flax.__version__, python=platform.python_version(), torch_threads=torch.get_num_threads(),
              host_memory=host_memory, xla_flags=os.environ.get("XLA_FLAGS", ""),
              git_commit=git("rev-parse", "HEAD") or "unknown (not a git checkout)",
              git_changed_files=None if status is None else len(status.splitlines()))


def fmt_tok_s(side: dict) -> str:
  lo, hi = side["tok_s_range"]
  return f"{side['tok_s_median']:.1f} tok/s (best {side['tok_s_best']:.1f}; {lo:.1f}-{hi:.1f})"


def goal_cell(name: str, row: dict) -> str:
  met = "met" if row["ratio_median"] >= GOALS[name] else "not met"
  what = "x our forward tok/s" if name == "eval" else "x HF"
  return f">= {GOALS[name]:g}{what}: {met}"


def markdown(record: dict) -> list:
  m, facts = record["measurements"], record["machine"]
  f, e = m["forward"], m["eval"]
  b, t = record["sizes"]["forward"]
  calls = {"forward": f"`f(model, x)`, `f = nnx.jit(lambda m, x: m(x).logits)`, x int32 [{b}, {t}]",
           "eval": f"`python run.py --config=configs/eval.py --config.checkpoint=DIR` "
                   f"({e['batch_size']} x {e['seq_len']} x {e['max_batches']} tokens)"}
  hf_calls = {"forward": "`hf(x).logits` (inference_mode)"}
  for name, (gb, prompt, n) in record["sizes"]["generate"].items():
    calls[name] = f"`sampling.generate(model, prompts, {n})`, {gb} x {prompt}-token prompts"
    hf_calls[name] = f"`hf.generate(x, max_new_tokens={n}, min_new_tokens={n}, do_sample=False)`"
  code = ("code version unknown (not a git checkout)" if facts["git_changed_files"] is None else
          f"code at {facts['git_commit'][:12]} with {facts['git_changed_files']} uncommitted file(s)")
  lines = [f"# The public API vs HF transformers ({record['mode']})", "",
           f"Machine: {facts['device']} ({facts['backend']}), {facts['cpu_count']} cores, torch threads "
           f"{facts['torch_threads']}, host memory policy for the whole process and the eval subprocess "
           f"(HF and ours alike): {facts['host_memory']}; load average {record['load_avg_before'][0]:.1f} before, "
           f"{record['load_avg_after'][0]:.1f} after; roofline {record['roofline']['matmul_gflops']:.1f} GFLOP/s "
           f"float32 matmul (best of the run's samples); jax {facts['jax']}, flax {facts['flax']}, torch "
           f"{facts['torch']}, transformers {facts['transformers']}; {code}; {record['repeats']} repeat(s).", "",
           "Tokens/s: median over repeats (best; range). Ratio: ours / HF per repeat pair, median (range).", "",
           "| what the user calls | ours | HF | ratio (range) | goal |", "| --- | --- | --- | --- | --- |"]
  for name in ("forward", "generate_b1", "generate_b8"):
    r = m[name]
    lo, hi = r["ratio_range"]
    lines.append(f"| {calls[name]} | {fmt_tok_s(r['ours'])} | {hf_calls[name]}: {fmt_tok_s(r['hf'])} | "
                 f"{r['ratio_median']:.2f}x ({lo:.2f}-{hi:.2f}) | {goal_cell(name, r)} |")
  lo, hi = e["ratio_range"]
  elo, ehi = e["tok_s_range"]
  lines.append(f"| {calls['eval']} | {e['tok_s_median']:.1f} tok/s (best {e['tok_s_best']:.1f}; {elo:.1f}-{ehi:.1f}; "
               f"as the mode reports it) "
               f"| none (compared with our forward: {e['vs_forward_tok_s']:.1f} tok/s, median) | "
               f"{e['ratio_median']:.2f}x ({lo:.2f}-{hi:.2f}) of our forward | {goal_cell('eval', e)} |")
  lines += ["", f"- forward: MFU ours {f['ours_mfu']:.1%} / HF {f['hf_mfu']:.1%} (best times, "
            f"{f['flops'] / 1e9:.1f} GFLOP per call with full logits); logits max relative difference "
            f"ours vs HF {f['logits_rel_err']:.1e}."]
  lines.append("- compile (ours) / first call (HF), seconds: " + "; ".join(
      f"{n} {m[n]['ours_compile_s']:.1f} / {m[n]['hf_first_call_s']:.1f}"
      for n in ("forward", "generate_b1", "generate_b8")))
  for name in ("generate_b1", "generate_b8"):
    a = m[name]["agreement"]
    lines.append(f"- {name}: greedy tokens equal to HF's {a['fraction_equal']:.1%} of {a['new_tokens']} new per "
                 f"row; shortest common prefix {a['min_common_prefix']} (random weights: reported, not asserted).")
  lines.append(f"- eval: {e['method']}. Whole eval run: {e['wall_s_median']:.1f} s wall (median), "
               f"{e['runs'][0]['tokens']} tokens scored, end to end {e['runs'][0]['end_to_end_tok_s']:.1f} tok/s; "
               f"tokenizer {e['tokenizer']}.")
  lines.append(f"- ours converted with `python -m mixtral_jax.convert` in {record['convert_s']:.1f} s and loaded with "
               f"`checkpoint.load_model` in {record['load_s']:.1f} s; HF attention `{record['hf_attn']}`.")
  return lines


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small dims and counts (a smoke run, < 1 min)")
  ap.add_argument("--repeats", type=int, default=3, help="timed pairs per measurement (after a first call)")
  ap.add_argument("--out", default=None, help="directory for bench_public_api.{json,md} (default: "
                  "experiments/results for full runs, a temporary directory with --quick)")
  ap.add_argument("--host-memory", default="retain", choices=hostmem.POLICIES,
                  help="malloc policy for the whole process and the eval subprocess (mixtral_jax/hostmem.py)")
  args = ap.parse_args(argv)
  if args.repeats < 1:
    sys.exit("error: --repeats must be >= 1")
  host_memory = hostmem.apply(args.host_memory)  # before JAX or torch start threads; the policy in effect
  import torch
  import transformers
  from flax import nnx
  from mixtral_jax.checkpoints import store as checkpoint
  from mixtral_jax.inference import sampling
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  mode = "quick" if args.quick else "full"
  dims, sizes = (QUICK if args.quick else FULL), SIZES[mode]
  out_dir = args.out or (tempfile.mkdtemp(prefix="bench_public_api_") if args.quick else os.path.join(HERE, "results"))

  tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_public_api_")
  tmp = tmp_ctx.name
  hf_dir, our_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "ours")
  torch.manual_seed(0)
  transformers.MixtralForCausalLM(transformers.MixtralConfig(**dims, dtype="float32")).save_pretrained(hf_dir)
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "mixtral_jax.convert", hf_dir, our_dir], cwd=ROOT,
                        capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"error: python -m mixtral_jax.convert {hf_dir} {our_dir} failed:\n{proc.stderr[-3000:]}")
  convert_s = time.perf_counter() - t0
  hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  t0 = time.perf_counter()
  model = checkpoint.load_model(our_dir)
  load_s = time.perf_counter() - t0
  cfg = model.config

  load_before = os.getloadavg()
  peaks = [roofline.measure(quick=args.quick)]
  rng = np.random.default_rng(0)
  results = {}

  # 1. forward, full logits on both sides.
  b, t = sizes["forward"]
  tokens = rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
  x, tx = jnp.asarray(tokens), torch.as_tensor(tokens, dtype=torch.long)
  f = nnx.jit(lambda m, x: m(x).logits)

  def hf_forward():
    with torch.inference_mode():
      return hf(tx).logits

  row, ours_logits, hf_logits = side_by_side(lambda: f(model, x), hf_forward, b * t, args.repeats)
  ours_logits, hf_logits = np.asarray(ours_logits, np.float64), hf_logits.double().numpy()
  row["logits_rel_err"] = float(np.abs(ours_logits - hf_logits).max() / np.abs(hf_logits).max())
  row["flops"] = prefill_flops(cfg, b, t) + 2 * b * (t - 1) * cfg.dim * cfg.vocab_size  # + the other logits
  results["forward"] = row
  print("forward", {k: row[k] for k in ("ratio_median", "ratio_range")}, flush=True)

  # 2-3. greedy generation, exactly n new tokens on both sides (ours: no eos_id; HF: min_new_tokens).
  for name, (gb, prompt, n) in sizes["generate"].items():
    ids = rng.integers(1, cfg.vocab_size, (gb, prompt))
    prompts, tp = ids.tolist(), torch.as_tensor(ids, dtype=torch.long)
    row, ours_out, hf_out = side_by_side(
        lambda: sampling.generate(model, prompts, n),
        lambda: hf.generate(tp, max_new_tokens=n, min_new_tokens=n, do_sample=False), gb * n, args.repeats)
    ours_out, hf_out = np.asarray(ours_out), hf_out.numpy()
    assert ours_out.shape == hf_out.shape == (gb, prompt + n), (ours_out.shape, hf_out.shape)
    row["agreement"] = agreement(ours_out[:, prompt:], hf_out[:, prompt:])
    results[name] = row
    print(name, {k: row[k] for k in ("ratio_median", "ratio_range", "agreement")}, flush=True)

  peaks.append(roofline.measure(quick=args.quick))
  peak = max(p["matmul_gflops"] for p in peaks)
  fw = results["forward"]
  for side in ("ours", "hf"):
    fw[f"{side}_mfu"] = fw["flops"] * fw[side]["tok_s_best"] / fw["work_tokens"] / 1e9 / peak

  # 4. the eval mode, against our forward's tokens/s. The byte tokenizer for --quick: its 259 ids fit a
  # 4000-token vocabulary, Mixtral's 32000 pieces do not.
  results["eval"] = measure_eval(our_dir, tmp, sizes["eval"], "bytes" if args.quick else "mixtral", host_memory,
                           args.repeats, fw["ours"]["tok_s_median"])
  print("eval", {k: results["eval"][k] for k in ("tok_s_median", "ratio_median")}, flush=True)

  record = dict(mode=mode, hf_config=dims, sizes=sizes, repeats=args.repeats, goals=GOALS,
                machine=machine_facts(host_memory, torch), roofline=dict(peaks[-1], matmul_gflops=peak),
                roofline_samples=peaks, load_avg_before=load_before, load_avg_after=os.getloadavg(),
                convert_s=convert_s, load_s=load_s, hf_attn=hf.config._attn_implementation, measurements=results)
  report.write_results(os.path.join(out_dir, "bench_public_api"), record, markdown(record))
  print(f"wrote {os.path.join(out_dir, 'bench_public_api')}.{{json,md}}")
  tmp_ctx.cleanup()
  return record


if __name__ == "__main__":
  main()
