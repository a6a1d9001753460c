"""Per quant level: weight bytes and perplexity change vs float32 on held-out text, for a trained checkpoint.

    python experiments/quant_table.py --checkpoint=WORKDIR/ckpt --text=heldout.txt
    -> experiments/results/quant_perplexity.{json,md}

The checkpoint is a mixtral_jax checkpoint (the default run of issue 6 writes one; any converted model
works too). The text is tokenized with Mixtral's tokenizer and cut into `--seq_len` windows (BOS first);
perplexity is mixtral_jax.evaluate.perplexity on the same windows for float32 and every level.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from experiments import report  # noqa: E402
from mixtral_jax import quant  # noqa: E402
from mixtral_jax.evaluate import perplexity  # noqa: E402
from mixtral_jax.tokenizer import Tokenizer  # noqa: E402


def windows(ids, seq_len: int, batch: int, limit: int):
  """Token ids -> evaluate.perplexity batches: windows of BOS + seq_len - 1 ids, predicting the next id."""
  step = seq_len - 1
  rows = [[1] + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)][:limit]
  for i in range(0, len(rows), batch):
    tokens = np.asarray(rows[i:i + batch], np.int32)  # [B, T]
    yield {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True, help="mixtral_jax checkpoint directory")
  ap.add_argument("--text", required=True, help="held-out text file (not seen in training)")
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--max_windows", type=int, default=64)
  ap.add_argument("--levels", default=",".join(quant.LEVELS))
  ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_perplexity"))
  args = ap.parse_args(argv)
  from mixtral_jax import checkpoint
  model = checkpoint.load_model(args.checkpoint, dtype="float32")
  with open(args.text) as f:
    ids = Tokenizer().encode(f.read(), bos=False)
  if len(ids) < args.seq_len:
    sys.exit(f"error: {args.text} has {len(ids)} tokens, fewer than --seq_len={args.seq_len}")
  batches = list(windows(ids, args.seq_len, args.batch, args.max_windows))
  rows = []
  for level in ["float32"] + args.levels.split(","):
    m = model if level == "float32" else quant.quantize_model(model, level)
    t0 = time.perf_counter()
    ppl = perplexity(m, batches)
    b = quant.weight_bytes(m)
    rows.append(dict(level=level, quantized_bytes=b["quantized"], total_bytes=b["total"],
                     perplexity=ppl["perplexity"], nll=ppl["nll"], tokens=ppl["tokens"],
                     seconds=time.perf_counter() - t0))
    print(rows[-1], flush=True)
  base = rows[0]
  for r in rows:
    r["ppl_change"] = r["perplexity"] / base["perplexity"] - 1
    r["bytes_vs_float32"] = r["total_bytes"] / base["total_bytes"]
  lines = [f"# Quantization: weight bytes and held-out perplexity ({args.checkpoint})", "",
           f"{base['tokens']} held-out tokens from {os.path.basename(args.text)}, windows of {args.seq_len}.", "",
           "| level | attention + expert bytes | all weights | vs float32 | perplexity | change |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['level']} | {r['quantized_bytes'] / 1e6:.2f} MB | {r['total_bytes'] / 1e6:.2f} MB | "
                 f"{r['bytes_vs_float32']:.2f}x | {r['perplexity']:.3f} | {r['ppl_change']:+.2%} |")
  report.write_results(args.out, dict(checkpoint=os.path.abspath(args.checkpoint), text=args.text,
                                      seq_len=args.seq_len, rows=rows), lines)


if __name__ == "__main__":
  main()
