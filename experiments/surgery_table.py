"""Adaptive compute and expert surgery on the default run's model: held-out perplexity and decode tokens/s.

    python run.py --workdir=workdir/default                          # the default run (3 min, 2 cores)
    python experiments/surgery_table.py --checkpoint workdir/default

Settings, all through the public API a user calls: the trained top-2 model as it is; top-k changed at
inference (`checkpoint.load_model(path, execution=Execution(top_k=k))`, what `--config.run.top_k=k` does);
the threshold (top-p) routing of Huang et al. 2024 (`Execution(top_p=p)`); experts pruned and merged per
layer on calibration text (`python -m mixtral_jax.surgery prune|merge SRC DST --experts N`, the standard
library's sources: the default corpus, calibrated on the training split's files, never the held-out ones).
Perplexity is `evaluate.perplexity` on the run's own held-out documents; decode is `sampling.generate(model,
[prompt], N)` at batch 1, greedy, timed over repeats after a warm-up call (the range is reported). Writes
OUT/surgery.md and OUT/surgery.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from experiments.routing_analysis import heldout_batches  # noqa: E402


def calibration_files(seed: int = 0, eval_fraction: float = 0.05, limit: int = 40) -> str:
  """Comma-separated training-split files of the default corpus (no held-out file), for --calibration."""
  from mixtral_jax.training import data
  paths = data.resolve_paths("stdlib")
  docs = data.read_documents("stdlib")
  train, _ = data.split_heldout(docs, eval_fraction, seed)
  groups = sorted({d.group >> 32 for d in train})
  rng = np.random.default_rng(seed)
  return ",".join(paths[i] for i in sorted(rng.choice(groups, size=min(limit, len(groups)), replace=False)))


def surgery(kind: str, src: str, dst: str, experts: int, calibration: str, log: str, extra=()) -> float:
  if os.path.exists(dst):
    return 0.0
  start = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax.surgery", kind, src, dst, "--experts", str(experts),
                           "--calibration", calibration, *extra], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    sys.exit(f"error: surgery {kind} failed; see {log}")
  return time.perf_counter() - start


def experts_per_token(model, batch) -> float:
  """Mean used routing slots per real token, over layers (adaptive routers vary it)."""
  out = jax.jit(lambda m, b: m(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]).router)(
      model, {k: jnp.asarray(v) for k, v in batch.items()})
  mask = jnp.asarray(batch["segment_ids"] > 0, jnp.float32)  # [B, T]
  used = jnp.sum((out.weights != 0).astype(jnp.float32), axis=-1)  # [L, B, T]
  return float(jnp.sum(used * mask[None]) / (jnp.sum(mask) * used.shape[0]))


def decode_tok_s(models: list, prompt, new_tokens: int, repeats: int) -> list:
  """Per model, `repeats` decode rates of sampling.generate(model, [prompt], new_tokens); every model is
  compiled first, then the repeats are interleaved (one call of each model per round), so drift in the
  machine's speed spreads over all settings instead of favouring the first ones."""
  from mixtral_jax.inference import sampling
  for model in models:
    jax.block_until_ready(sampling.generate(model, [prompt], new_tokens))  # compiles
  rates = [[] for _ in models]
  for _ in range(repeats):
    for i, model in enumerate(models):
      t0 = time.perf_counter()
      jax.block_until_ready(sampling.generate(model, [prompt], new_tokens))
      rates[i].append(new_tokens / (time.perf_counter() - t0))
  return rates


WIDE = dict(vocab_size=32000, dim=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128, ffn_dim=3584,
            num_experts=8, top_k=2)  # experts are 82% of the weights (8x7B: 96%; the tiny model: 27%)


def expert_share(c: dict) -> float:
  """The experts' share of a model's parameters."""
  experts = c["num_layers"] * c["num_experts"] * 3 * c["dim"] * c["ffn_dim"]
  attn = c["num_layers"] * (c["dim"] * (c["num_heads"] + 2 * c["num_kv_heads"]) * c["head_dim"] +
                            c["num_heads"] * c["head_dim"] * c["dim"])
  return experts / (experts + attn + 2 * c["vocab_size"] * c["dim"])


def wide_decode(args, prompt) -> list:
  """Decode tokens/s of the same settings on a random model whose experts dominate the bytes a step reads
  (a tiny-model decode step reads its 32000 x 128 LM head, 5x the bytes of its two active experts, and is
  mostly per-step overhead). Speed only: its
  perplexity means nothing."""
  from mixtral_jax.config import ModelConfig
  from mixtral_jax.execution import Execution
  from mixtral_jax.model import build, with_execution
  from mixtral_jax.moe import surgery
  model = build(ModelConfig(**WIDE), seed=0)
  settings = [("top-2 (as built)", model), ("top-1", with_execution(model, top_k=1)),
              ("top-3", with_execution(model, top_k=3)), ("top-p 0.5", with_execution(model, top_p=0.5))]
  if not args.quick:
    from mixtral_jax.model import from_params, params_of
    keep = np.tile(np.arange(4), (model.config.num_layers, 1))  # [L, 4]: which 4 is immaterial for speed
    params, cfg = surgery.prune(params_of(model), model.config, keep)
    settings.append(("4 experts (pruned)", from_params(cfg, params, Execution())))
  batch = dict(tokens=np.asarray([prompt], np.int32), positions=np.arange(len(prompt), dtype=np.int32)[None],
               segment_ids=np.ones((1, len(prompt)), np.int32))
  rates = decode_tok_s([m for _, m in settings], prompt, 8 if args.quick else args.wide_tokens,
                       1 if args.quick else args.repeats)
  rows = [dict(setting=name, experts=m.config.num_experts, experts_per_token=experts_per_token(m, batch),
               decode_tok_s=r) for (name, m), r in zip(settings, rates)]
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="the default run's workdir (or a checkpoint)")
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "surgery"))
  p.add_argument("--work", default=os.path.join(ROOT, "workdir", "surgery"), help="pruned / merged checkpoints")
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--wide-tokens", type=int, default=64, help="decode tokens per repeat of the wide model")
  p.add_argument("--quick", action="store_true", help="two settings, one batch (tests)")
  args = p.parse_args(argv)
  from mixtral_jax.checkpoints import store
  from mixtral_jax.execution import Execution
  from mixtral_jax.inference.evaluate import perplexity
  from mixtral_jax.model import param_count
  from mixtral_jax.training import data
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.work, exist_ok=True)
  tokenizer = data.load_tokenizer("mixtral")
  held, batches = heldout_batches(tokenizer, num_batches=1 if args.quick else args.batches)
  prompt = tokenizer.encode(held[0].text[:200], bos=True)[:32]
  cfg = store.load_model(args.checkpoint).config
  calibration = calibration_files(limit=4 if args.quick else 40)
  settings = [("as trained (top-2)", args.checkpoint, Execution(), "")]
  settings += [(f"top-{k} at inference", args.checkpoint, Execution(top_k=k), "") for k in (1, 3)
               if k <= cfg.num_experts]
  settings += [(f"top-p {t}", args.checkpoint, Execution(top_p=t), "") for t in (0.5, 0.7, 0.9)]
  seconds = {}
  for kind, n in [("prune", n) for n in (6, 4)] + [("merge", n) for n in (6, 4)]:
    dst = os.path.join(args.work, f"{kind}{n}")
    seconds[f"{kind}{n}"] = surgery(kind, args.checkpoint, dst, n, calibration, dst + ".log")
    settings.append((f"{kind}d to {n} experts", dst, Execution(), f"`python -m mixtral_jax.surgery {kind} SRC DST "
                     f"--experts {n}`"))
  if args.quick:
    settings = settings[:2] + settings[-1:]
  models = [store.load_model(path, execution=run) for _, path, run, _ in settings]
  all_rates = decode_tok_s(models, prompt, 8 if args.quick else args.new_tokens, 1 if args.quick else args.repeats)
  rows = []
  for (name, path, run, how), model, rates in zip(settings, models, all_rates):
    ppl = perplexity(model, batches)
    rows.append(dict(setting=name, checkpoint=path, execution={k: getattr(run, k) for k in ("top_k", "top_p")},
                     experts=model.config.num_experts, experts_per_token=experts_per_token(model, batches[0]),
                     perplexity=ppl["perplexity"], nll=ppl["nll"], tokens=ppl["tokens"], decode_tok_s=rates,
                     parameters=param_count(model), how=how))
    print(f"{name:24s} ppl {ppl['perplexity']:9.1f}  decode {np.median(rates):7.1f} tok/s", flush=True)
  del models
  wide = wide_decode(args, prompt)
  record = dict(checkpoint=args.checkpoint, rows=rows, wide=wide, calibration=calibration.split(","), surgery_seconds=seconds,
                machine=dict(devices=str(jax.devices()), jax=jax.__version__), quick=args.quick)
  report.write_results(os.path.join(args.out, "surgery"), record, table_lines(record, args))


def table_lines(record: dict, args) -> list:
  rows = record["rows"]
  base = rows[0]
  base_rate = float(np.median(base["decode_tok_s"]))
  lines = [f"# Adaptive compute and expert surgery: {record['checkpoint']}", "",
           f"Held-out perplexity on {base['tokens']:,} tokens of the default run's held-out documents; decode = "
           f"`sampling.generate(model, [prompt], {args.new_tokens})`, batch 1, greedy, median of {args.repeats} "
           f"interleaved rounds (range), this backend's default execution (CPU: routed_cond decode). Calibration for "
           f"pruning and merging: {len(record['calibration'])} training-split files.", "",
           "| setting | experts | parameters | experts / token | held-out ppl | vs top-2 | decode tok/s | vs top-2 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    rates = r["decode_tok_s"]
    med = float(np.median(rates))
    lines.append(f"| {r['setting']} | {r['experts']} | {r['parameters'] / 1e6:.2f}M | {r['experts_per_token']:.2f} | "
                 f"{r['perplexity']:,.1f} | "
                 f"{r['perplexity'] / base['perplexity']:.2f}x | {med:.1f} ({min(rates):.1f}–{max(rates):.1f}) | "
                 f"{med / base_rate:.2f}x |")
  wide = record["wide"]
  base_rate = float(np.median(wide[0]["decode_tok_s"]))
  lines += ["", f"Decode of the same settings on a random model whose experts are {expert_share(WIDE):.0%} of its weights ({WIDE}; "
            f"speed only), batch 1, {args.wide_tokens} tokens, median of {args.repeats} interleaved rounds (range):", "",
            "| setting | experts | experts / token | decode tok/s | vs top-2 |", "|---|---:|---:|---:|---:|"]
  for r in wide:
    rates = r["decode_tok_s"]
    med = float(np.median(rates))
    lines.append(f"| {r['setting']} | {r['experts']} | {r['experts_per_token']:.2f} | {med:.1f} "
                 f"({min(rates):.1f}–{max(rates):.1f}) | {med / base_rate:.2f}x |")
  return lines


if __name__ == "__main__":
  main()
