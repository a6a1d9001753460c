"""How fast can batch-1 decode be on this machine? The weight reads of one decode step, and nothing else.

    python experiments/decode_matvec_loop.py       # ~1 min; writes experiments/results/decode_matvec_loop.{json,md}

A jitted loop of 128 "tokens", each running the matrix-vector products of the issue-5 bench model
(D=512, F=1792, 8 layers, 8 experts top-2, 2 KV heads, vocab 32000, float32) on separate buffers, as
the CPU inference layout holds them (Execution(layout="unstacked"), the default there: per-layer modules,
per-expert buffers): q/k/v/o, the router, 2 experts' w1/w3/w2 per layer, the LM head. No attention,
norms, cache or sampling. Variants:
  fixed   always experts 0 and 1 (no control flow): the pure weight-streaming time;
  cond    one `lax.cond` per expert on the router's top-2 (what `routed_cond` does);
  switch  one `lax.switch` per routing slot.
Compared with the bench model's real decode step (bench_inference.py) this bounds what a dispatch change
alone could gain; compared with roofline.read_gbps it shows what expert-sized matvecs reach.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from experiments import report, roofline  # noqa: E402
from mixtral_jax.moe.dispatch_decode import swiglu  # noqa: E402

D, F, E, K, L, V, KV = 512, 1792, 8, 2, 8, 32000, 128
TOKENS = 128


def make_weights(seed: int = 0, *, dim=D, ffn=F, layers=L, vocab=V, kv=KV):
  rng = np.random.default_rng(seed)

  def w(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
  stack = [dict(q=w(dim, dim), k=w(dim, kv), v=w(dim, kv), o=w(dim, dim), router=w(dim, E),
                w1=[w(dim, ffn) for _ in range(E)], w3=[w(dim, ffn) for _ in range(E)],
                w2=[w(ffn, dim) for _ in range(E)]) for _ in range(layers)]
  return stack, w(dim, vocab)


def step_bytes(layers, head) -> int:
  """Bytes one token reads: every non-expert matrix, K of the E experts, the LM head."""
  per_layer = sum(layers[0][n].nbytes for n in ("q", "k", "v", "o", "router"))
  per_layer += K * sum(layers[0][n][0].nbytes for n in ("w1", "w3", "w2"))
  return len(layers) * per_layer + head.nbytes


def decode_loop(variant: str, tokens: int = TOKENS):
  def expert(lw, j):
    return lambda x: swiglu(x, lw["w1"][j], lw["w3"][j], lw["w2"][j], jnp.float32)  # [1, D], as routed_cond

  def token(_, carry):
    x, layers, head = carry  # x [1, D]
    for lw in layers:
      kv = x @ lw["k"] + x @ lw["v"]  # [1, KV]
      x = x + (x @ lw["q"] + jnp.pad(kv, ((0, 0), (0, x.shape[1] - kv.shape[1])))) @ lw["o"]  # [1, D]
      chosen = jax.lax.top_k((x @ lw["router"])[0], K)[1]  # [K]
      y = jnp.zeros_like(x)
      if variant == "fixed":
        for j in range(K):
          y = y + expert(lw, j)(x)
      elif variant == "cond":
        for j in range(E):
          y = y + jax.lax.cond(jnp.any(chosen == j), expert(lw, j), jnp.zeros_like, x)
      elif variant == "switch":
        for s in range(K):
          y = y + jax.lax.switch(chosen[s], [expert(lw, j) for j in range(E)], x)
      x = x + 1e-3 * y
    logits = x @ head  # [1, V]
    return x + 1e-6 * logits[:, :x.shape[1]], layers, head

  return jax.jit(lambda x, layers, head: jax.lax.fori_loop(0, tokens, token, (x, layers, head))[0])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_matvec_loop"))
  args = ap.parse_args(argv)
  sizes = dict(dim=64, ffn=96, layers=2, vocab=512, kv=16) if args.quick else {}
  tokens = 8 if args.quick else TOKENS
  layers, head = make_weights(**sizes)
  nbytes = step_bytes(layers, head)
  x = jnp.ones((1, head.shape[0]), jnp.float32)
  peak = roofline.measure(quick=args.quick)
  rows = []
  for variant in ("fixed", "cond", "switch"):
    secs = roofline.best_time(decode_loop(variant, tokens), x, layers, head, repeats=args.repeats)
    ms = secs / tokens * 1e3
    rows.append(dict(variant=variant, ms_per_token=ms, gbps=nbytes / (ms / 1e3) / 1e9))
    print(rows[-1], flush=True)
  record = dict(step_bytes=nbytes, tokens=tokens, roofline=peak, rows=rows, quick=args.quick)
  lines = ["# Batch-1 decode's weight reads alone (experiments/decode_matvec_loop.py)", "",
           f"{nbytes / 1e6:.1f} MB of weights per token (the issue-5 bench model: attention, router, top-{K} "
           f"experts, LM head), {tokens} tokens in one jitted loop, best of {args.repeats}. Roofline in this run: "
           f"{peak['read_gbps']:.1f} GB/s one large matvec, {peak['read1_gbps']:.1f} GB/s expert-sized "
           f"[1, D] @ [D, F]; load average {peak['load_avg_1m']:.1f}.", "",
           "| variant | ms per token | GB/s |", "| --- | ---: | ---: |"]
  lines += [f"| {r['variant']} | {r['ms_per_token']:.2f} | {r['gbps']:.1f} |" for r in rows]
  report.write_results(args.out, record, lines)


if __name__ == "__main__":
  main()
