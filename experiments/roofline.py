"""The machine's own roofline, measured with JAX in the calling process: every benchmark reports against it.

    from experiments.roofline import measure
    peak = measure()   # {'matmul_gflops': ..., 'read_gbps': ..., 'device': ..., 'load': ...}

matmul_gflops: best of several float32 square matmuls (the compute ceiling XLA reaches here).
read_gbps: a large float32 matrix-vector product (reads the matrix once): the weight-streaming ceiling
that batch-1 decode lives under.
read8_gbps: the same bytes streamed by [8, D] @ [D, F] products over expert-sized weights (64 separate
[512, 1792] float32 buffers, 235 MB, far beyond the 32 MB L3): what batch-8 decode lives under. On
XLA:CPU a skinny matmul reads its weights at about half the matrix-vector rate (measured on 2 cores:
28 GB/s for M=1, 15 / 14 / 7 GB/s for M=2 / 8 / 32).
read1_gbps: the same with [1, D] @ [D, F]: what batch-1 decode's expert-sized matvecs reach, below the one
large matrix-vector product of read_gbps (shorter streams, one op each).
"""
from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, repeats: int = 5) -> float:
  """The fastest of `repeats` timed calls fn(*args), after one untimed call (compile, warm-up). JAX
  results are waited for; anything else (torch tensors) is taken as ready when fn returns. The best, not
  the mean: on shared cores other jobs only ever add time."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_gflops(n: int = 2048, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  t = best_time(jax.jit(jnp.matmul), a, b)
  return 2 * n ** 3 / t / 1e9


def read_gbps(rows: int = 8192, cols: int = 8192) -> float:
  w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)  # 256 MiB: far beyond cache
  x = jnp.ones((cols,), jnp.float32)
  t = best_time(jax.jit(jnp.matmul), w, x)
  return w.size * 4 / t / 1e9


def batched_read_gbps(m: int = 8, dim: int = 512, ffn: int = 1792, count: int = 64) -> float:
  ws = [jax.random.normal(jax.random.key(i), (dim, ffn), jnp.float32) for i in range(count)]
  x = jnp.ones((m, dim), jnp.float32)
  t = best_time(jax.jit(lambda x, ws: sum(x @ w for w in ws)), x, ws)
  return count * dim * ffn * 4 / t / 1e9


def describe() -> dict:
  return {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
          "load_avg_1m": os.getloadavg()[0]}


def measure(quick: bool = False) -> dict:
  """Measures the roofline now (a few seconds; `quick` uses smaller sizes for tests)."""
  n, rows = (512, 1024) if quick else (2048, 8192)
  out = describe()
  out["matmul_gflops"] = max(matmul_gflops(n), matmul_gflops(n // 2))
  out["read_gbps"] = read_gbps(rows, rows)
  sizes = (128, 256, 16) if quick else (512, 1792, 64)
  out["read1_gbps"] = batched_read_gbps(1, *sizes)
  out["read8_gbps"] = batched_read_gbps(8, *sizes)
  return out


if __name__ == "__main__":
  print(json.dumps(measure(), indent=2))
