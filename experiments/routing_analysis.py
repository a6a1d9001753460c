"""The Mixtral paper's routing analysis (Jiang et al. 2024, arXiv:2401.04088, section 5) on a model trained here.

    python run.py --workdir=workdir/default                       # the default run (3 min, 2 cores)
    python experiments/routing_analysis.py --checkpoint workdir/default

On held-out text of the default corpus (the run's own held-out split), per layer: how often consecutive
tokens get the same first-choice expert and share an expert among their top-k, against the random
baselines the paper gives (1/E and 1 - C(E-k, k) / C(E, k)); routing entropy; expert co-activation. The
same statistics for the same architecture at its initial (random) weights say what training changed.
Writes OUT/routing_analysis.md (+ .json), OUT/coactivation.png (per layer) and OUT/token_colouring.png
(a held-out snippet, each token coloured by its first-choice expert, for the first, a middle and the last
layer: the paper's figure 8). notebooks/04_routing_analysis.ipynb runs these same functions.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from mixtral_jax.moe import analysis  # noqa: E402


def heldout_batches(tokenizer, *, seq_len: int = 256, batch_size: int = 8, num_batches: int = 8, seed: int = 0,
                    paths: str = "stdlib", eval_fraction: float = 0.05, chunk_chars: int = 4000):
  """The held-out documents of the default run's split (configs/base.py data_config, seed 0), packed."""
  from mixtral_jax.training import data
  docs = data.read_documents(paths, chunk_chars)
  _, held = data.split_heldout(docs, eval_fraction, seed)
  return held, data.eval_batches(held, tokenizer, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)


def route(model, batches):
  """(RouterOutput with leaves [L, B_total, T, ...], mask [B_total, T], segment ids) over all batches."""
  forward = jax.jit(lambda m, b: m(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]).router)
  outs = [forward(model, {k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
  router = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *outs)
  segments = jnp.asarray(np.concatenate([b["segment_ids"] for b in batches]))
  return router, (segments > 0).astype(jnp.int32), segments


def statistics(model, batches) -> dict:
  """Per-layer routing statistics (lists, JSON-friendly) of `model` on `batches`."""
  router, mask, segments = route(model, batches)
  e, k = model.config.num_experts, model.config.top_k
  repeats = analysis.consecutive_repeats(router, mask, segments)
  entropy = analysis.routing_entropy(router, mask)
  both = analysis.coactivation(router, mask)  # [L, E, E]
  tolist = lambda x: np.asarray(x).tolist()  # noqa: E731
  return {"baselines": analysis.random_baselines(e, k), "pairs": int(repeats["pairs"]),
          "tokens": int(jnp.sum(mask)), "first_choice": tolist(repeats["first_choice"]),
          "top_k_overlap": tolist(repeats["top_k_overlap"]), "entropy": tolist(entropy["normalized"]),
          "load_entropy": tolist(entropy["load_entropy"]), "coactivation": tolist(both)}


def table(trained: dict, initial: dict, num_experts: int, top_k: int) -> list:
  base = trained["baselines"]
  lines = [f"Consecutive held-out token pairs: {trained['pairs']:,} ({trained['tokens']:,} tokens). Random "
           f"baselines: same first choice {base['first_choice']:.1%}, a shared expert among top-{top_k} "
           f"{base['top_k_overlap']:.1%} ({num_experts} experts).", "",
           "| layer | same first choice: trained (initial) | shared top-k expert: trained (initial) | "
           "router entropy / log E: trained (initial) | load entropy / log E |",
           "|---:|---:|---:|---:|---:|"]
  for i in range(len(trained["first_choice"])):
    lines.append(f"| {i} | {trained['first_choice'][i]:.1%} ({initial['first_choice'][i]:.1%}) | "
                 f"{trained['top_k_overlap'][i]:.1%} ({initial['top_k_overlap'][i]:.1%}) | "
                 f"{trained['entropy'][i]:.3f} ({initial['entropy'][i]:.3f}) | {trained['load_entropy'][i]:.3f} |")
  return lines


def plot_coactivation(both, path: str):
  """Heatmaps of the [L, E, E] co-activation (share of tokens choosing both experts), one per layer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  both = np.asarray(both)
  fig, axes = plt.subplots(1, len(both), figsize=(3.2 * len(both), 3.2), squeeze=False)
  for i, ax in enumerate(axes[0]):
    im = ax.imshow(both[i], cmap="viridis", vmin=0)
    ax.set_title(f"layer {i}")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle("share of tokens routed to both experts (diagonal: to the expert)")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def colour_tokens(model, tokenizer, text: str, path: str, layers=None, max_tokens: int = 300):
  """A PNG of `text`'s tokens, each on the colour of its first-choice expert, one panel per layer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ids = tokenizer.encode(text, bos=True)[:max_tokens + 1]
  router = jax.jit(lambda m, t: m(t).router)(model, jnp.asarray([ids], jnp.int32))
  first = np.asarray(analysis.first_choice(router))[:, 0, 1:]  # [L, T-1] (BOS dropped)
  pieces = [_readable(p) for p in tokenizer.pieces(ids[1:])] if hasattr(tokenizer, "pieces") \
      else [tokenizer.decode([i]) for i in ids[1:]]
  num_layers, e = first.shape[0], model.config.num_experts
  layers = layers if layers is not None else sorted({0, num_layers // 2, num_layers - 1})
  colours = plt.get_cmap("tab10" if e <= 10 else "tab20")
  # Characters per line: a 7-point monospace character is ~0.6 x 7 points wide, the figure ~820 points.
  width, line_h = 190, 1.0
  rows = _layout(pieces, width)
  fig, axes = plt.subplots(len(layers), 1, figsize=(12, 0.22 * (max(r for r, _, _ in rows) + 3) * len(layers)),
                           squeeze=False)
  for ax, layer in zip(axes[:, 0], layers):
    for (row, col, piece), expert in zip(rows, first[layer]):
      shown = piece.replace("\n", "\u21b5").replace("\t", "    ")
      if not shown.strip():
        shown = shown.replace(" ", "\u00b7")  # a space-only token stays visible
      ax.text(col, -row * line_h, shown, family="monospace", fontsize=7, va="top",
              bbox=dict(boxstyle="square,pad=0.05", facecolor=colours(int(expert) % 20), alpha=0.55, linewidth=0))
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(-(max(r for r, _, _ in rows) + 1.5) * line_h, 0.5)
    ax.set_axis_off()
    ax.set_title(f"layer {layer}: colour = first-choice expert", fontsize=9, loc="left")
  handles = [plt.Rectangle((0, 0), 1, 1, color=colours(j % 20), alpha=0.55) for j in range(e)]
  fig.legend(handles, [f"expert {j}" for j in range(e)], loc="lower center", ncol=e, fontsize=7)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _readable(piece: str) -> str:
  """A SentencePiece piece as text: the word-start mark as a space, byte-fallback pieces (<0x0A>) decoded."""
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    return bytes([int(piece[3:5], 16)]).decode("latin-1")
  return piece.replace("\u2581", " ")


def _layout(pieces, width: int):
  """(row, column, piece) of every token piece in a monospace grid of `width` characters."""
  out, row, col = [], 0, 0
  for piece in pieces:
    n = max(1, len(piece.replace("\t", "    ")))
    if col + n > width:
      row, col = row + 1, 0
    out.append((row, col, piece))
    col += n
    if "\n" in piece:
      row, col = row + piece.count("\n"), 0
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a trained model: run.py workdir or a checkpoint")
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "routing_analysis"))
  p.add_argument("--tokenizer", default="mixtral")
  p.add_argument("--batches", type=int, default=8)
  args = p.parse_args(argv)
  from mixtral_jax.checkpoints import store
  from mixtral_jax.model import build
  from mixtral_jax.training import data
  os.makedirs(args.out, exist_ok=True)
  tokenizer = data.load_tokenizer(args.tokenizer)
  model = store.load_model(args.checkpoint, dtype="float32")
  held, batches = heldout_batches(tokenizer, num_batches=args.batches)
  trained = statistics(model, batches)
  initial = statistics(build(model.config, seed=0), batches)
  cfg = model.config
  lines = [f"# Routing analysis: {args.checkpoint} ({cfg.num_layers} layers, {cfg.num_experts} experts, "
           f"top-{cfg.top_k}), held-out default corpus", "", *table(trained, initial, cfg.num_experts, cfg.top_k),
           "", "Initial = the same architecture at its random initial weights (seed 0), on the same tokens."]
  report.write_results(os.path.join(args.out, "routing_analysis"),
                       {"checkpoint": args.checkpoint, "trained": trained, "initial": initial}, lines)
  plot_coactivation(trained["coactivation"], os.path.join(args.out, "coactivation.png"))
  text = next((d.text for d in held if len(d.text) >= 1500), held[0].text)
  colour_tokens(model, tokenizer, text[:1500], os.path.join(args.out, "token_colouring.png"))


if __name__ == "__main__":
  main()
