"""Host memory policy: keep freed memory in the process instead of handing it back to the OS.

Why: XLA:CPU (and PyTorch on CPU) allocate each execution's large buffers afresh, and glibc serves every
allocation above 32 MB with its own mmap and unmaps it on free. Each step then page-faults its whole
working set again, the kernel zeroing every page first. Measured on 2 cores for the issue-6 train step
(B8 x T256, D512, 8 layers, 8 experts): 1.2 M minor faults, 3.6 s of kernel time and 8.8-9.1 s per step;
with `retain_freed_memory()` 0 faults and 6.7-7.4 s. HF transformers + torch AdamW in the same process
gains about as much (7.8 -> 6.2 s). Prefill gains a few percent.

The cost: the process keeps its high-water mark. Freed memory is reused, never returned to the OS, so
the resident size stays near the peak; for that train step 11-15 GB instead of 7.4 GB between steps.
Not for decoding: its steps allocate little, and with one shared arena batch-1 decode measured 5-10%
slower per token (13.2-13.8 vs 12.5-12.6 ms, best of 4, two runs each): configs/generate.py keeps the
default.

How: glibc's mallopt, set to one arena (threads share the main heap, which can grow to any size), no
mmap-served chunks and no trimming. It must run before JAX starts its CPU threads (the first computation);
a thread that has already picked an arena keeps it. Other C libraries are left alone. The same effect from
outside Python: GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
18446744073709551615, or a caching allocator such as jemalloc / tcmalloc through LD_PRELOAD.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's malloc.h parameter numbers.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
POLICIES = ("retain", "default")

_applied = False


def _glibc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def retain_freed_memory() -> bool:
  """Applies the policy (idempotent). Returns whether it is in effect: False off glibc."""
  global _applied
  if _applied:
    return True
  libc = _glibc()
  if libc is None:
    return False
  # mallopt returns 1 on success. A trim threshold of -1 is SIZE_MAX: never trim.
  ok = all(libc.mallopt(param, value) == 1
           for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _applied = ok
  return ok


def apply(policy: str) -> str:
  """`policy` from config.host_memory: 'retain' (retain_freed_memory) or 'default' (glibc as it is).
  Returns the policy in effect afterwards ('default' where 'retain' is not available)."""
  if policy not in POLICIES:
    from mixtral_jax.config import ConfigError
    raise ConfigError(f"config.host_memory={policy!r} is not one of {', '.join(POLICIES)}")
  if policy == "retain" and retain_freed_memory():
    return "retain"
  return "retain" if _applied else "default"
