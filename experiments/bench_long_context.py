"""Long context on CPU: compiled attention memory (xla vs flash) and decode steps against a long cache.

    python experiments/bench_long_context.py            # -> experiments/results/long_context.{md,json}
    python experiments/bench_long_context.py --quick    # small sizes, results under a temp dir

1. Memory: XLA's compiled temp allocation (memory_analysis; nothing is run) of a forward and of a
   forward+backward of a width-64, 2-layer model over one sequence, at 4k and 32k tokens, with the
   attention materialised (`xla`, the implementation before flash) and with the default (`flash` from
   2048 keys). The growth from 4k to 32k is the number to read: 8x the tokens.
2. Decode: ms per step of the public model call `model(token, cache=cache)` (a jitted loop of steps, as
   sampling runs them) against a cache of S slots, with the per-layer cache buffers sampling uses for the
   unstacked layout, one stacked [L, ...] cache array, and the stacked (scanned) layout; the bytes of
   cache a step must read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.execution import Execution  # noqa: E402
from mixtral_jax.model import KVCache, build  # noqa: E402
from mixtral_jax.training.plan import compiled_temp_bytes  # noqa: E402

MiB = 2 ** 20


def temp_mib(cfg, run, t: int, backward: bool) -> float:
  return compiled_temp_bytes(cfg, run, 1, t, backward=backward) / MiB


def memory_rows(lengths):
  cfg = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    ffn_dim=128, num_experts=4, top_k=2, rope_theta=1e4, max_positions=max(lengths)).replace()
  rows = []
  for name, run in [("xla (materialised)", Execution(layout="stacked", attention="xla")),
                    ("default (flash from 2048 keys)", Execution(layout="stacked"))]:
    for backward in (False, True):
      mib = [temp_mib(cfg, run, t, backward) for t in lengths]
      rows.append(dict(attention=name, passes="fwd+bwd" if backward else "fwd", mib=mib,
                       growth=mib[-1] / mib[0]))
      print(rows[-1], flush=True)
  return rows


def decode_rows(slots: int, steps: int, repeats: int):
  cfg = ModelConfig(vocab_size=256, dim=256, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                    ffn_dim=256, num_experts=4, top_k=2, rope_theta=1e4, max_positions=2 * slots).replace()
  cache_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * slots * cfg.head_dim * 4
  rows = []
  for name, layout, per_layer in [("unstacked layout, per-layer buffers (sampling's choice)", "unstacked", True),
                                  ("unstacked layout, one stacked [L, ...] array", "unstacked", False),
                                  ("stacked layout (scan; the cache in its carry)", "stacked", False)]:
    graphdef, state = nnx.split(build(cfg, 0, Execution(layout=layout)))

    def loop(state, cache, graphdef=graphdef):
      def body(i, c):
        return nnx.merge(graphdef, state)(jnp.zeros((1, 1), jnp.int32), cache=c).cache
      return jax.lax.fori_loop(0, steps, body, cache)

    step = jax.jit(loop, donate_argnums=(1,))
    cache = KVCache.init(cfg, 1, slots, per_layer=per_layer).replace(fresh=False)  # both forms, on purpose
    cache = step(state, cache)
    jax.block_until_ready(cache)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      cache = step(state, cache)
      jax.block_until_ready(cache)
      times.append((time.perf_counter() - t0) / steps * 1e3)
    ms = float(np.median(times))
    rows.append(dict(cache=name, slots=slots, ms=ms, min=min(times), max=max(times),
                     cache_mib=cache_bytes / MiB, read_gb_s=cache_bytes / (ms / 1e3) / 1e9))
    print(rows[-1], flush=True)
  return rows, cfg


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  lengths = (1024, 4096) if args.quick else (4096, 32768)
  slots, steps, repeats = (2048, 4, 2) if args.quick else (32768, 16, 5)
  mem = memory_rows(lengths)
  dec, cfg = decode_rows(slots, steps, repeats)
  out = args.out or (tempfile.mkdtemp() if args.quick else os.path.join(os.path.dirname(__file__), "results"))
  os.makedirs(out, exist_ok=True)
  lines = ["# Long context on CPU: attention memory and decode against a long cache", "",
           f"jax {jax.__version__}, {os.cpu_count()} cores. `python experiments/bench_long_context.py`.", "",
           "## Compiled temp memory (MiB), width-64 2-layer model, one sequence", "",
           f"| attention | pass | T={lengths[0]} | T={lengths[1]} | growth ({lengths[1] // lengths[0]}x tokens) |",
           "| --- | --- | ---: | ---: | ---: |"]
  lines += [f"| {r['attention']} | {r['passes']} | {r['mib'][0]:.1f} | {r['mib'][1]:.1f} | {r['growth']:.1f}x |"
            for r in mem]
  lines += ["", f"## Decode step against a cache of {slots} slots (D={cfg.dim}, {cfg.num_layers} layers, "
            f"{cfg.num_kv_heads} KV heads x {cfg.head_dim}, float32; median of {repeats} loops of {steps} steps)", "",
            "| cache | ms per step (min-max) | cache MiB | cache read rate if read once |",
            "| --- | ---: | ---: | ---: |"]
  lines += [f"| {r['cache']} | {r['ms']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {r['cache_mib']:.0f} | "
            f"{r['read_gb_s']:.1f} GB/s |" for r in dec]
  with open(os.path.join(out, "long_context.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "long_context.json"), "w") as f:
    json.dump(dict(memory=mem, decode=dec), f, indent=1)
  print("\n".join(lines))
  print(f"wrote {out}/long_context.md")


if __name__ == "__main__":
  main()
