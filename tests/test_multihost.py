"""Two processes on localhost (jax.distributed, gloo CPU collectives) train 3 steps on one global mesh and
end where a single-process, single-device run ends."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE

_HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  import mesh_checks
  out = tmp_path / "params.npz"
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MIXTRAL_COORDINATOR=f"127.0.0.1:{port}",
               MIXTRAL_NUM_PROCESSES="2", MIXTRAL_PROCESS_ID=str(pid), MESH_CHECKS_OUT=str(out),
               XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
    procs.append(subprocess.Popen([sys.executable, os.path.join(_HERE, "mesh_checks.py"), "train3"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:  # a process left waiting for its peer would otherwise hang until jax's own timeout
      if p.poll() is None:
        p.kill()
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  import json
  results = [json.loads(next(l for l in stdout.splitlines() if l.startswith('{"check"')))["result"]
             for stdout, _ in outputs]
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["processes"] == 2 and r["local_devices"] == 2 and r["distributed"] for r in results)

  losses, params = mesh_checks.train_steps()  # this process: one device, no mesh
  # float32; three AdamW steps amplify reduction-order differences of ~1e-7 in the gradients a little.
  np.testing.assert_allclose(results[0]["losses"], losses, rtol=1e-5)
  assert results[0]["losses"] == results[1]["losses"]
  got = np.load(out)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(got.files) == len(flat)
  for path, value in flat:
    np.testing.assert_allclose(got[jax.tree_util.keystr(path)], value, atol=2e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
