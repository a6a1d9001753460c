"""Converts released Mixtral checkpoints to Orbax (parameters + model config) and back to HF, and upcycles
dense Mistral checkpoints into Mixtrals.

  python -m mixtral_jax.convert SRC DST [--dtype float32|bfloat16] [--overwrite] [--format auto|hf|mistral]
  python -m mixtral_jax.convert --to-hf ORBAX_DIR HF_DIR [--dtype ...] [--overwrite] [--max-shard-size 5GB]
  python -m mixtral_jax.convert --upcycle --num-experts E [--top-k K] DENSE_SRC DST [--noise STD]
      [--router-init normal|zero] [--router-std S] [--seed N] [--dtype ...] [--overwrite] [--format ...]

SRC is an HF directory (config.json + model.safetensors or sharded shards with an index; legacy
per-expert or transformers-v5 fused experts) or an original Mistral release (params.json +
consolidated.*.pth or consolidated.safetensors, including the early stacked-experts variant); see
mixtral_jax/checkpoints/sources.py. Both directions stream: one layer of attention, one expert or one block of the
embedding is in memory at a time. Errors the user can cause are one line `error: ...` on stderr, exit
status 2, and leave nothing at the destination.

--upcycle (sparse upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055; mixtral_jax/checkpoints/upcycle.py):
DENSE_SRC is a dense Mistral -- an HF MistralForCausalLM directory (single file or sharded), an original
Mistral release (params.json without 'moe' + consolidated.*), or a mixtral_jax checkpoint / trainer workdir
of a model with num_experts=1 -- and DST a Mixtral (router mixtral_topk) with E experts per layer, each an
exact copy of the dense FFN, top-K routing (default min(2, E)) and a router initialised N(0, S^2) with
S = sqrt(0.1 / dim) (Switch Transformer's router scale; --router-init zero is allowed but leaves every
token on experts 0..K-1 with no router gradient while the experts are identical: see upcycle.py). Because
Mixtral renormalises the top-K weights to sum to 1, the upcycled model computes exactly the dense model's
function, for any router. --noise STD adds Gaussian noise of std STD x std(W) to every copy of each matrix
W except expert 0's, to break the experts' symmetry; the model is then no longer function preserving.
Upcycling streams too: one dense FFN matrix is in memory at a time, read once and re-yielded per expert.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.checkpoints import formats
from mixtral_jax.checkpoints import params
from mixtral_jax.checkpoints import sources
from mixtral_jax.checkpoints import upcycle as upcycling
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.checkpoints.formats import CheckpointError

DTYPE_CHOICES = ("float32", "bfloat16")
READS_IN_FLIGHT = 3  # --to-hf: tensors being read (decompressed) ahead of the one being written


def convert(src, dst, *, dtype: Optional[str] = None, overwrite: bool = False, fmt: str = "auto",
            progress: Optional[Callable[[int], None]] = None) -> dict:
  """SRC (any supported layout) -> Orbax checkpoint at DST. dtype None keeps the source's.
  Returns a summary dict (layout, dtype, bytes written, seconds)."""
  start = time.perf_counter()
  source = sources.open_source(src, fmt)
  try:
    out = np.dtype(formats.FLOAT_DTYPES[dtype]) if dtype else source.dtype
    tree = sources.stream_tree(source, out)
    nbytes = _write(dst, tree, source.config.replace(param_dtype=formats.dtype_name(out)), overwrite, progress,
                    dict(path=str(Path(src).absolute()), layout=source.layout, dtype=formats.dtype_name(source.dtype)))
  finally:
    source.close()
  return dict(layout=source.layout, dtype=formats.dtype_name(out), bytes=nbytes, seconds=time.perf_counter() - start)


def upcycle(src, dst, *, num_experts: int, top_k: Optional[int] = None, noise: float = 0.0,
            router_init: str = "normal", router_std: Optional[float] = None, seed: int = 0,
            dtype: Optional[str] = None, overwrite: bool = False, fmt: str = "auto",
            progress: Optional[Callable[[int], None]] = None) -> dict:
  """Dense Mistral at SRC -> Orbax Mixtral at DST with `num_experts` copies of each FFN, routing top_k
  (None: min(2, E)); see mixtral_jax/checkpoints/upcycle.py for the router and noise options. Everything
  is validated before a byte is written. Returns a summary dict (layout, dtype, bytes, seconds, experts)."""
  start = time.perf_counter()
  plan = upcycling.Upcycling(num_experts, top_k, noise, router_init, router_std, seed).check()
  dense = upcycling.open_dense(src, fmt)
  try:
    out = np.dtype(formats.FLOAT_DTYPES[dtype]) if dtype else dense.dtype
    cfg = upcycling.upcycled_config(dense.config, plan).replace(param_dtype=formats.dtype_name(out))
    tree = upcycling.upcycled_tree(dense.tree(out), dense.config, plan)
    nbytes = _write(dst, tree, cfg, overwrite, progress, dict(
        path=str(Path(src).absolute()), layout=dense.layout, dtype=formats.dtype_name(dense.dtype),
        upcycle=plan.resolved(cfg.dim)))
  finally:
    dense.close()
  return dict(layout=dense.layout, dtype=formats.dtype_name(out), bytes=nbytes, seconds=time.perf_counter() - start,
              experts=cfg.num_experts, top_k=cfg.top_k)


def _write(dst, tree, cfg: ModelConfig, overwrite: bool, progress, source: dict) -> int:
  """Writes the Streamed `tree` as a checkpoint at DST; returns the bytes of parameters written."""
  if progress is not None:
    tree = _with_progress(tree, progress)
  checkpoint.write_tree(dst, tree, cfg, overwrite=overwrite, source=source)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in _leaves(tree))


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


def _with_progress(tree, report):
  if isinstance(tree, dict):
    return {k: _with_progress(v, report) for k, v in tree.items()}

  def blocks(inner=tree.blocks):
    for index, block in inner():
      yield index, block
      report(block.size * tree.dtype.itemsize)
  return sources.Streamed(tree.shape, tree.dtype, tree.chunks, blocks)


def hf_plan(cfg: ModelConfig, arrays, dtype) -> List[Tuple[str, Tuple[int, ...], Callable, Callable]]:
  """(HF legacy name, shape, start, finish) for every MixtralForCausalLM tensor: start() issues the
  TensorStore read of one layer (attention, norms, router) or one expert of our stored arrays, finish()
  turns the array it returns into HF's layout and `dtype`."""
  d, h, k, dh = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f, e, v = cfg.ffn_dim, cfg.num_experts, cfg.vocab_size
  read = lambda name, *index: lambda: arrays[name][index].read()  # noqa: E731
  t = lambda a: formats.transposed(a, dtype)  # noqa: E731
  keep = lambda a: np.asarray(a, dtype)  # noqa: E731
  plan = [("model.embed_tokens.weight", (v, d), read("embed"), keep)]
  for i in range(cfg.num_layers):
    p, moe = f"model.layers.{i}.", f"model.layers.{i}.block_sparse_moe."
    plan += [
        (p + "self_attn.q_proj.weight", (h * dh, d), read("layers.attn.wq", i), lambda a: t(a.reshape(d, h * dh))),
        (p + "self_attn.k_proj.weight", (k * dh, d), read("layers.attn.wk", i), lambda a: t(a.reshape(d, k * dh))),
        (p + "self_attn.v_proj.weight", (k * dh, d), read("layers.attn.wv", i), lambda a: t(a.reshape(d, k * dh))),
        (p + "self_attn.o_proj.weight", (d, h * dh), read("layers.attn.wo", i), lambda a: t(a.reshape(h * dh, d))),
        (p + "input_layernorm.weight", (d,), read("layers.attn_norm.scale", i), keep),
        (p + "post_attention_layernorm.weight", (d,), read("layers.ffn_norm.scale", i), keep),
        (moe + "gate.weight", (e, d), read("layers.moe.router.kernel", i), t),
    ]
    for j in range(e):
      plan += [(f"{moe}experts.{j}.w1.weight", (f, d), read("layers.moe.w1", i, j), t),
               (f"{moe}experts.{j}.w2.weight", (d, f), read("layers.moe.w2", i, j), t),
               (f"{moe}experts.{j}.w3.weight", (f, d), read("layers.moe.w3", i, j), t)]
  plan += [("model.norm.weight", (d,), read("final_norm.scale"), keep),
           ("lm_head.weight", (v, d), read("lm_head"), t)]
  return plan


def _read_ahead(plan, depth: int = READS_IN_FLIGHT):
  """Yields each tensor of `plan` in HF layout, with the next `depth` reads already running (TensorStore
  decompresses them in its threads while this one transposes and writes)."""
  pending, items = collections.deque(), iter(plan)
  while True:
    while len(pending) < depth and (item := next(items, None)) is not None:
      pending.append((item, item[2]()))
    if not pending:
      return
    item, future = pending.popleft()
    yield item[3](future.result())


_HF_PARAMS = {"embed", "lm_head", "final_norm.scale", "layers.attn.wq", "layers.attn.wk", "layers.attn.wv",
              "layers.attn.wo", "layers.attn_norm.scale", "layers.ffn_norm.scale", "layers.moe.router.kernel",
              "layers.moe.w1", "layers.moe.w2", "layers.moe.w3"}


def to_hf(orbax_dir, hf_dir, *, dtype: Optional[str] = None, overwrite: bool = False,
          max_shard_bytes: int = 5 * 10**9) -> dict:
  """Orbax checkpoint -> HF directory: config.json, model-XXXXX-of-YYYYY.safetensors shards with legacy
  per-expert names (what the Hub, transformers and vLLM read), and model.safetensors.index.json."""
  start = time.perf_counter()
  cfg = checkpoint.load_config(orbax_dir)
  if cfg.router != "mixtral_topk":
    raise CheckpointError(f"{orbax_dir}: router {cfg.router!r} has no MixtralForCausalLM equivalent")
  arrays = checkpoint.open_arrays(orbax_dir)
  extra = sorted(set(arrays) - _HF_PARAMS)
  if extra:
    raise CheckpointError(f"{orbax_dir}: parameter {extra[0]} has no MixtralForCausalLM counterpart")
  out = np.dtype(formats.FLOAT_DTYPES[dtype or cfg.param_dtype])
  plan = hf_plan(cfg, arrays, out)
  specs = [(name, shape, out) for name, shape, _, _ in plan]
  shards = formats.plan_shards(specs, max_shard_bytes)
  weight_map, total, tensors = {}, 0, _read_ahead(plan)
  with checkpoint.atomic_dir(hf_dir, overwrite) as tmp:
    tmp.mkdir()
    for n, members in enumerate(shards):  # shards are consecutive runs of the plan
      file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      formats.write_safetensors(tmp / file, [specs[i] for i in members], itertools.islice(tensors, len(members)),
                                metadata={"format": "pt"})
      for i in members:
        weight_map[specs[i][0]] = file
        total += int(np.prod(specs[i][1])) * out.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_config = dict(params.config_to_hf(cfg), dtype=formats.dtype_name(out), torch_dtype=formats.dtype_name(out))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return dict(dtype=formats.dtype_name(out), bytes=total, shards=len(shards), seconds=time.perf_counter() - start)


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '2GiB' / '1000' -> bytes."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
  if not m:
    raise CheckpointError(f"--max-shard-size={text!r} is not a size like 5GB or 500MB")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # argparse's default prints usage over several lines
    raise CheckpointError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m mixtral_jax.convert", description=__doc__.split("\n\n")[0],
              epilog=__doc__[__doc__.index("--upcycle (sparse"):].strip(),
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="source checkpoint directory (with --to-hf: the Orbax checkpoint)")
  p.add_argument("dst", help="output directory (with --to-hf: the HF directory); must not exist")
  p.add_argument("--to-hf", action="store_true", help="convert an Orbax checkpoint to an HF directory")
  p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="output dtype (default: as stored)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace DST if it exists (only once the new one is complete)")
  p.add_argument("--format", default="auto", choices=("auto", "hf", "mistral"), help="SRC format (default: detect)")
  p.add_argument("--max-shard-size", default="5GB", help="--to-hf: largest safetensors shard (default 5GB)")
  up = p.add_argument_group("sparse upcycling (SRC a dense Mistral: HF MistralForCausalLM dir, Mistral release, "
                            "or a mixtral_jax checkpoint / workdir with num_experts=1)")
  up.add_argument("--upcycle", action="store_true",
                  help="make a Mixtral whose experts are all exact copies of SRC's FFN (function preserving)")
  up.add_argument("--num-experts", type=int, metavar="E", help="experts per layer (required with --upcycle)")
  up.add_argument("--top-k", type=int, metavar="K", help="experts per token (default: min(2, E))")
  up.add_argument("--noise", type=float, metavar="STD",
                  help="add N(0, (STD*std(W))^2) to each copy of every expert matrix W except expert 0's, to break "
                       "the symmetry; the model is then NOT function preserving (default 0: exact copies)")
  up.add_argument("--router-init", choices=upcycling.ROUTER_INITS,
                  help="normal (default): N(0, S^2); zero: ties every logit, so all tokens go to experts "
                       "0..K-1 and, while experts are identical, the router never gets a gradient")
  up.add_argument("--router-std", type=float, metavar="S", help="std of the normal router init (default "
                  "sqrt(0.1/dim), Switch Transformer's router scale: logits ~0.3x the input rms)")
  up.add_argument("--seed", type=int, metavar="N", help="seed of the router init and the noise (default 0)")
  return p


_UPCYCLE_FLAGS = ("num_experts", "top_k", "noise", "router_init", "router_std", "seed")


def _upcycle_kwargs(args) -> dict:
  """The upcycle() keyword arguments of the command line; checks the flags that need --upcycle."""
  given = {name: getattr(args, name) for name in _UPCYCLE_FLAGS if getattr(args, name) is not None}
  if not args.upcycle:
    if given:
      raise CheckpointError(f"--{next(iter(given)).replace('_', '-')} needs --upcycle")
    return {}
  if args.to_hf:
    raise CheckpointError("--upcycle and --to-hf cannot be combined (upcycle to Orbax first, then --to-hf that)")
  if args.num_experts is None:
    raise CheckpointError("--upcycle needs --num-experts E (the experts per layer of the Mixtral to make)")
  return given


def main(argv=None) -> int:
  # Orbax logs a failing background write before re-raising it here: the error must stay one line.
  checkpoint._quiet_orbax(logging.CRITICAL)
  try:
    args = _parser().parse_args(argv)
    upcycle_kwargs = _upcycle_kwargs(args)
    tty = sys.stdout.isatty()
    if args.to_hf:
      summary = to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                      max_shard_bytes=parse_size(args.max_shard_size))
      what = f"{summary['shards']} safetensors shard(s)"
    else:
      done = [0]

      def progress(nbytes):
        done[0] += nbytes
        print(f"\r{done[0] / 1e9:.2f} GB written", end="", flush=True)

      common = dict(dtype=args.dtype, overwrite=args.overwrite, fmt=args.format, progress=progress if tty else None)
      if args.upcycle:
        summary = upcycle(args.src, args.dst, **upcycle_kwargs, **common)
        what = (f"a Mixtral with {summary['experts']} experts (top-{summary['top_k']}) upcycled from the "
                f"{summary['layout']} layout")
      else:
        summary = convert(args.src, args.dst, **common)
        what = f"an Orbax checkpoint from the {summary['layout']} layout"
      if tty:
        print()
  except (CheckpointError, ConfigError, OSError) as e:
    print(formats.error_line(e), file=sys.stderr)
    return 2
  gb, s = summary["bytes"] / 1e9, summary["seconds"]
  print(f"wrote {args.dst}: {what}, {gb:.3f} GB {summary['dtype']} in {s:.1f} s ({gb * 1e3 / max(s, 1e-9):.0f} MB/s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
