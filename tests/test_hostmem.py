"""Host memory policy (hostmem.py): freed memory is reused without page faults, and a bad policy is a
one-line config error."""
import platform
import subprocess
import sys

import pytest

# A process that frees and re-allocates a 200 MB buffer (what XLA:CPU does with each execution's
# temporaries) and prints the page faults of the re-allocations. numpy's transparent-hugepage hint is
# switched off so that the default policy's faults are one per 4 KB page.
_CHILD = """
import resource, sys
import numpy as np
np._core.multiarray._set_madvise_hugepage(False)
from mixtral_jax import hostmem
in_effect = hostmem.apply(sys.argv[1])
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(50_000_000, np.float32); del a
before = faults()
for _ in range(3):
  a = np.ones(50_000_000, np.float32); del a
print(in_effect, faults() - before)
"""


def _faults(policy):
  out = subprocess.run([sys.executable, "-c", _CHILD, policy], capture_output=True, text=True, check=True)
  in_effect, faults = out.stdout.split()
  return in_effect, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
  in_effect, retained = _faults("retain")
  assert in_effect == "retain"
  in_effect, default = _faults("default")
  assert in_effect == "default"
  pages = 3 * 200e6 / 4096
  assert retained < 0.01 * pages, retained  # the freed buffer is reused in place
  # glibc unmaps the freed buffer and every page faults again: one fault per 4 KB page here, one per
  # 2 MB where transparent huge pages are always on (then ~300 in all).
  assert default > max(100, 20 * retained), (default, retained)


def test_run_py_bad_host_memory_is_one_line_error():
  out = subprocess.run([sys.executable, "run.py", "--config.host_memory=keep"], capture_output=True, text=True)
  assert out.returncode != 0
  assert "config.host_memory='keep' is not one of retain, default" in out.stderr
  assert "Traceback" not in out.stderr
