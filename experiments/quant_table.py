"""Per quant level: weight bytes and perplexity change vs float32 on held-out text, for a trained checkpoint.

    python run.py --workdir=WORKDIR                              # the default run (issue 6)
    python experiments/quant_table.py --checkpoint=WORKDIR       # its held-out documents
    python experiments/quant_table.py --checkpoint=CKPT --text=heldout.txt
    -> experiments/results/quant_perplexity.{json,md}

--checkpoint is anything `checkpoint.load_model` reads (mixtral_jax.checkpoints.loading): a training workdir (its latest
weights), a mixtral_jax checkpoint (converted or saved), an HF directory or a Mistral release; it is loaded
as a user loads it, in the backend's default execution, and every level is `quant.quantize_model` of it.
Held-out text: by default the documents the default run held out (config.data of configs/tiny.py:
the standard library's sources, split by eval_fraction and seed exactly as training split them), packed
into batches as the trainer evaluates; or --text, tokenized with Mixtral's tokenizer and cut into
`--seq_len` windows (BOS first). Perplexity is mixtral_jax.inference.evaluate.perplexity on the same batches for
float32 and every level.
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
from mixtral_jax.training import data
from mixtral_jax.inference import quant  # noqa: E402
from mixtral_jax.inference.evaluate import perplexity  # noqa: E402
from mixtral_jax.inference.tokenizer import Tokenizer  # noqa: E402


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
  ap.add_argument("--checkpoint", required=True, help="training workdir, mixtral_jax checkpoint or HF directory")
  ap.add_argument("--text", default="", help="held-out text file; default: the default run's held-out documents")
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--max_windows", type=int, default=64, help="held-out windows (batches x batch rows)")
  ap.add_argument("--levels", default=",".join(quant.LEVELS))
  ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_perplexity"))
  args = ap.parse_args(argv)
  from mixtral_jax.checkpoints.store import load_model
  from mixtral_jax.checkpoints.formats import CheckpointError
  try:
    model = load_model(args.checkpoint, dtype="float32")
  except CheckpointError as e:
    sys.exit(f"error: {e}")
  if getattr(model, "quant", None):
    sys.exit(f"error: {args.checkpoint} is already quantized ({model.quant}); the table starts from float weights")
  tokenizer = Tokenizer()
  if args.text:
    with open(args.text) as f:
      ids = tokenizer.encode(f.read(), bos=False)
    if len(ids) < args.seq_len:
      sys.exit(f"error: {args.text} has {len(ids)} tokens, fewer than --seq_len={args.seq_len}")
    batches = list(windows(ids, args.seq_len, args.batch, args.max_windows))
    source = os.path.basename(args.text)
  else:
    from configs import tiny
    config = tiny.get_config()
    docs = data.read_documents(config.data.paths, config.data.chunk_chars)
    _, held = data.split_heldout(docs, config.data.eval_fraction, config.seed)
    batches = data.eval_batches(held, tokenizer, seq_len=args.seq_len, batch_size=args.batch,
                                num_batches=max(1, args.max_windows // args.batch))
    source = f"the default run's {len(held)} held-out documents ({config.data.paths})"
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
           f"{base['tokens']:.0f} held-out tokens from {source}, windows of {args.seq_len}.", "",
           "| level | attention + expert bytes | all weights | vs float32 | perplexity | change |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['level']} | {r['quantized_bytes'] / 1e6:.2f} MB | {r['total_bytes'] / 1e6:.2f} MB | "
                 f"{r['bytes_vs_float32']:.2f}x | {r['perplexity']:.3f} | {r['ppl_change']:+.2%} |")
  report.write_results(args.out, dict(checkpoint=os.path.abspath(args.checkpoint), text=args.text or source,
                                      seq_len=args.seq_len, rows=rows), lines)


if __name__ == "__main__":
  main()
