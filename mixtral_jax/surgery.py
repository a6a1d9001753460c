"""Expert surgery: prune or merge a checkpoint's experts, measured on calibration text, into a smaller checkpoint.

  python -m mixtral_jax.surgery prune SRC DST --experts N [--by frequency|weight]
  python -m mixtral_jax.surgery merge SRC DST --experts N [--by frequency|weight] [--no-align]
      common: [--calibration stdlib|FILES] [--tokens 65536] [--seq-len 256] [--batch-size 8]
              [--tokenizer mixtral|bytes|PATH] [--seed 0] [--perplexity] [--overwrite]

SRC is anything checkpoint.load_model reads (a converted checkpoint, a trainer workdir, an HF directory, a
Mistral release); DST is a mixtral_jax checkpoint with N experts per layer. Calibration runs the model's
prefill (no training) over packed batches of the calibration text (documents shuffled with --seed, so the
default corpus, the Python standard library, is sampled across its files rather than its first ones) and
accumulates how each layer uses its experts (mixtral_jax/moe/surgery.py). `prune` keeps the N most used
experts of each layer; `merge` folds the others into them (MC-SMoE). DST's stored `source` records what was
done: kept experts or groups per layer, the criterion, the calibration tokens and the measured frequencies.
Errors the user can cause are one line `error: ...` on stderr, exit status 2, and leave nothing at DST.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.checkpoints import formats
from mixtral_jax.checkpoints import loading
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.checkpoints.formats import CheckpointError
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.moe import surgery


def calibration_batches(docs: list, tokenizer, *, tokens: int, seq_len: int, batch_size: int, seed: int = 0) -> list:
  """Packed batches (mixtral_jax.training.data.eval_batches' layout) holding about `tokens` tokens of `docs`
  (data.read_documents), shuffled with `seed` (every batch full except possibly the last)."""
  from mixtral_jax.training import data
  docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
  return data.eval_batches(docs, tokenizer, seq_len=seq_len, batch_size=batch_size,
                           num_batches=max(1, math.ceil(tokens / (seq_len * batch_size))))


@jax.jit
def _usage_of(model, batch):
  """One calibration forward's usage sums (module level: repeated runs in one process reuse its compile)."""
  out = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  return surgery.expert_usage(out.router, batch["segment_ids"] > 0)


def calibrate(model, batches) -> surgery.ExpertUsage:
  """Usage of `model`'s experts over `batches` (prefill forwards; padding excluded), summed in float64."""
  total = None
  for batch in batches:
    usage = _usage_of(model, {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")})
    usage = jax.tree.map(lambda a: np.asarray(a, np.float64), usage)
    total = usage if total is None else total + usage
  if total is None or float(total.tokens) == 0:
    raise ConfigError("the calibration text produced no tokens")
  return total


def _nbytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _model(cfg: ModelConfig, state):
  """A model over `state` without copying it: the stacked layout holds the canonical arrays as they are."""
  from mixtral_jax.execution import Execution, resolve
  from mixtral_jax.model import abstract_model, with_state
  run = resolve(Execution(layout="stacked"), purpose="inference", param_dtype=cfg.param_dtype)
  return with_state(abstract_model(cfg, run), state)


def _check_args(args) -> None:
  for flag, value in (("--experts", args.experts), ("--tokens", args.tokens), ("--seq-len", args.seq_len),
                      ("--batch-size", args.batch_size)):
    if value < 1:
      raise ConfigError(f"{flag} must be >= 1, got {value}")
  dst = Path(args.dst).absolute()
  if dst.exists() and not args.overwrite:
    raise CheckpointError(f"{dst} already exists (pass --overwrite to replace it)")
  if not dst.parent.is_dir():
    raise CheckpointError(f"{dst.parent} does not exist (the parent of the output directory)")


def _tokenizer(name: str):
  from mixtral_jax.training import data
  try:
    return data.load_tokenizer(name)
  except (ValueError, FileNotFoundError) as e:  # a file that is not a SentencePiece model, a missing default
    raise ConfigError(f"--tokenizer={name}: {e}") from None


def _check_source(cfg: ModelConfig, args, tokenizer) -> None:
  surgery.check_router(cfg)
  if args.experts >= cfg.num_experts:
    raise ConfigError(f"--experts={args.experts} removes nothing: {args.src} has {cfg.num_experts} experts per layer")
  if args.seq_len > cfg.max_positions:
    raise ConfigError(f"--seq-len={args.seq_len} exceeds the model's max_positions={cfg.max_positions}")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"--tokenizer={args.tokenizer} has {tokenizer.vocab_size} pieces but the model's vocab_size "
                      f"is {cfg.vocab_size}")


def run_surgery(args) -> dict:
  """The CLI's work, from parsed arguments; returns a summary dict. Everything that can be checked without
  the weights (arguments, DST, tokenizer, calibration text, a converted checkpoint's config) is, first."""
  _check_args(args)
  kind = loading.kind_of(args.src)
  tokenizer = _tokenizer(args.tokenizer)
  if kind == "mixtral_jax":
    _check_source(checkpoint.load_config(args.src), args, tokenizer)
  from mixtral_jax.training import data
  docs = data.read_documents(args.calibration)
  cfg, state, quant = loading.read(args.src, dtype=None)
  if quant:
    raise CheckpointError(f"{args.src} is quantized ({quant}): prune or merge the float checkpoint, then quantize")
  _check_source(cfg, args, tokenizer)
  batches = calibration_batches(docs, tokenizer, tokens=args.tokens, seq_len=args.seq_len,
                                batch_size=args.batch_size, seed=args.seed)
  model = _model(cfg, state)
  usage = calibrate(model, batches)
  with warnings.catch_warnings(record=True) as notes:
    warnings.simplefilter("always")
    if args.command == "prune":
      keep = surgery.choose_pruned(usage, args.experts, by=args.by)
      tree, new_cfg = surgery.prune(state, cfg, keep)
      record = {"kept": keep.tolist()}
    else:
      weights = surgery.scores(usage, args.by)
      groups = surgery.choose_groups(usage, args.experts, by=args.by)
      tree, new_cfg = surgery.merge(state, cfg, groups, weights, align=args.align)
      record = {"groups": groups, "leaders": surgery.group_leaders(groups, weights), "aligned": args.align}
  summary = dict(command=args.command, experts=(cfg.num_experts, new_cfg.num_experts),
                 top_k=(cfg.top_k, new_cfg.top_k), tokens=int(usage.tokens), notes=[str(n.message) for n in notes],
                 bytes=(_nbytes(state), _nbytes(tree)))
  if args.perplexity:
    from mixtral_jax.inference.evaluate import perplexity
    summary["perplexity"] = (perplexity(model, batches)["perplexity"],
                             perplexity(_model(new_cfg, tree), batches)["perplexity"])
  parent = checkpoint.load_metadata(args.src).get("source") if kind == "mixtral_jax" else None
  source = {
      "surgery": args.command, "path": str(Path(args.src).absolute()), "kind": kind, "criterion": args.by,
      "num_experts": list(summary["experts"]), "top_k": list(summary["top_k"]), **record,
      "calibration": {"data": args.calibration, "tokens": summary["tokens"], "seq_len": args.seq_len,
                      "batch_size": args.batch_size, "tokenizer": args.tokenizer, "seed": args.seed},
      "frequency": np.round(usage.frequency, 6).tolist(), "weight_mass": np.round(usage.weight_mass, 6).tolist(),
  }
  if "perplexity" in summary:
    source["perplexity"] = list(summary["perplexity"])
  if parent:
    source["parent"] = parent
  checkpoint.write_tree(args.dst, tree, new_cfg, overwrite=args.overwrite, source=source)
  return summary


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # argparse's default prints usage over several lines
    raise ConfigError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
  common = _Parser(add_help=False)
  common.add_argument("src", help="source checkpoint (anything checkpoint.load_model reads)")
  common.add_argument("dst", help="output checkpoint directory; must not exist unless --overwrite")
  common.add_argument("--experts", type=int, required=True, help="experts per layer to keep (N < E)")
  common.add_argument("--by", choices=sorted(surgery.CRITERIA), default="frequency",
                      help="importance: frequency (share of routing slots) or weight (combine weight per token)")
  common.add_argument("--calibration", default="stdlib",
                      help="'stdlib' (the Python standard library sources) or comma-separated files/dirs/globs")
  common.add_argument("--tokens", type=int, default=65536, help="calibration tokens (about; whole batches)")
  common.add_argument("--seq-len", type=int, default=256, help="calibration row length")
  common.add_argument("--batch-size", type=int, default=8, help="calibration rows per forward")
  common.add_argument("--tokenizer", default="mixtral", help="mixtral | bytes | a SentencePiece .model path")
  common.add_argument("--seed", type=int, default=0, help="order in which calibration documents are read")
  common.add_argument("--perplexity", action="store_true",
                      help="also report the calibration text's perplexity before and after (two more passes)")
  common.add_argument("--overwrite", action="store_true",
                      help="replace DST if it exists (only once the new one is complete)")
  p = _Parser(prog="python -m mixtral_jax.surgery", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="{prune,merge}")
  sub.add_parser("prune", parents=[common], help="keep the N most important experts of each layer")
  merge = sub.add_parser("merge", parents=[common], help="merge every layer's experts into N groups (MC-SMoE)")
  merge.add_argument("--no-align", dest="align", action="store_false",
                     help="average members without first permuting their hidden units onto the leader's")
  return p


def main(argv: Optional[list] = None) -> int:
  checkpoint._quiet_orbax(logging.CRITICAL)  # Orbax logs a failing write before re-raising it: keep one line
  try:
    args = _parser().parse_args(argv)
    summary = run_surgery(args)
  except (CheckpointError, ConfigError, OSError) as e:
    print(formats.error_line(e), file=sys.stderr)
    return 2
  for note in summary["notes"]:
    print(f"note: {note}")
  (e_from, e_to), (b_from, b_to) = summary["experts"], summary["bytes"]
  line = (f"wrote {args.dst}: {summary['command']} {e_from} -> {e_to} experts per layer by {args.by} over "
          f"{summary['tokens']} calibration tokens, {b_from / 1e6:.3f} MB -> {b_to / 1e6:.3f} MB")
  if "perplexity" in summary:
    line += ", calibration perplexity {:.3f} -> {:.3f}".format(*summary["perplexity"])
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
