"""Inference layout and dispatch (the unstacked layout of model.py, dispatch_decode.py), run modes, planner,
gpu_bench dry run."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_model, ours_from_hf, rel_err, tiny_config
from mixtral_jax.moe import dispatch
from mixtral_jax.moe import dispatch_decode
from mixtral_jax.inference import quant
from mixtral_jax.inference import sampling  # noqa: F401 -- registers dispatchers
from mixtral_jax.config import ConfigError
from mixtral_jax.execution import Execution, backend_defaults
from mixtral_jax.model import build, params_of, with_execution
from mixtral_jax.moe.routers import topk_renormalized

DENSE_STACKED = Execution.everywhere("dense", layout="stacked")  # the reference: every expert, scanned layers
FAST = Execution(layout="unstacked")  # per-layer, per-expert buffers; CPU's default sparse dispatch per phase

TOL = 1e-5  # float32; only the summation order differs from dense


@pytest.mark.parametrize("name", ["routed_cond", "sorted_loop"])
@pytest.mark.parametrize("n", [1, 37])
def test_sparse_dispatch_equals_dense(name, n):
  """Same outputs as the dense reference, with stacked weights and with per-expert buffers."""
  e, d, f, k = 5, 12, 20, 2
  keys = jax.random.split(jax.random.key(n), 5)
  x = jax.random.normal(keys[0], (n, d))
  w1, w3 = jax.random.normal(keys[1], (e, d, f)), jax.random.normal(keys[2], (e, d, f))
  w2 = jax.random.normal(keys[3], (e, f, d))
  route = topk_renormalized(jax.random.normal(keys[4], (n, e)) * 3, k)
  ref, _ = dispatch.dense(x, route, w1, w3, w2, dtype=jnp.float32)
  fn = dispatch.DISPATCHERS.get(name)
  parts = [dispatch_decode.ExpertList(tuple(w[j] for j in range(e))) for w in (w1, w3, w2)]
  # sorted_loop: blocks of 4 (tails of 1..4 rows), 13 (tails 3, 6, 9, 12, 13: not a multiple) and 64
  # (more than the slots: one block, tails of 16..64): whole blocks, every tail size, spills.
  for kw in [dict(loop_block=b) for b in (4, 13, 64)] if name == "sorted_loop" else [{}]:
    got, _ = jax.jit(lambda *a: fn(*a, dtype=jnp.float32, **kw))(x, route, w1, w3, w2)
    assert rel_err(got, ref) <= TOL, kw
    got, _ = jax.jit(lambda x, r, a, b, c: fn(x, r, a, b, c, dtype=jnp.float32, **kw))(x, route, *parts)
    assert rel_err(got, ref) <= TOL, kw


def test_unstacked_model_equals_stacked():
  cfg = tiny_config(num_layers=2)
  model = build(cfg, seed=3, execution=DENSE_STACKED)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  ref = model(tokens)
  fast = with_execution(model, FAST)
  defaults = backend_defaults()  # CPU: sorted_loop for prompts, routed_cond for one token per row
  assert (fast.execution.layout, fast.execution.prefill_dispatch, fast.execution.decode_dispatch) == (
      "unstacked", defaults["prefill_dispatch"], defaults["decode_dispatch"])
  assert isinstance(fast.layers[0].moe.w1[...], dispatch_decode.ExpertList)
  jax.tree.map(np.testing.assert_array_equal, params_of(fast), params_of(model))  # the same weights
  out = jax.jit(lambda m, t: m(t))(fast, tokens)
  assert rel_err(out.logits, ref.logits) <= TOL
  np.testing.assert_array_equal(out.router.experts, ref.router.experts)
  # Generation's sparse dispatch on per-expert buffers == the stacked model's own dense dispatch.
  prompts = [[1, 4, 9, 16], [1, 7]]
  dense = sampling.decode(model, sampling.prefill(model, prompts, 5))
  np.testing.assert_array_equal(sampling.generate(fast, prompts, 5), dense.tokens)


@pytest.mark.slow
def test_quantized_unstacked_decode_matches_quantized_stacked():
  cfg = tiny_config(num_layers=1, dim=48, head_dim=16, ffn_dim=64)
  q = quant.quantize_model(build(cfg, seed=4, execution=DENSE_STACKED), "q8")
  fast = with_execution(q, FAST)
  assert fast.quant == "q8" and fast.execution.prefill_dispatch == backend_defaults()["prefill_dispatch"]
  assert isinstance(fast.layers[0].moe.w2[...].parts[0], quant.QTensor)
  tokens = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
  assert rel_err(fast(tokens).logits, q(tokens).logits) <= 1e-5


def run(*args):
  return subprocess.run([sys.executable, "run.py", *args], capture_output=True, text=True)


def test_generate_mode_streams_and_reports_speed():
  out = run("--config=configs/generate.py", "--config.max_new_tokens=4", "--config.model.num_layers=1",
            "--config.prompt=Hello", "--config.quant=q4")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("Hello") and "prefill:" in out.stderr and "tok/s" in out.stderr
  # The report names the weights and how they ran: "[q4; unstacked, prefill sorted_loop, decode routed_cond]".
  d = backend_defaults()
  assert (f"[q4; {d['inference_layout']}, prefill {d['prefill_dispatch']}, decode {d['decode_dispatch']}]"
          in out.stderr), out.stderr


def test_generate_mode_errors_are_one_line(tmp_path):
  out = run("--config=configs/generate.py", f"--config.checkpoint={tmp_path}")
  assert out.returncode != 0 and "holds no checkpoint" in out.stderr and "Traceback" not in out.stderr
  out = run("--config=configs/generate.py", "--config.quant=q9", "--config.model.num_layers=1")
  assert out.returncode != 0 and "config.quant='q9'" in out.stderr and "Traceback" not in out.stderr


def test_hf_directory_loads_like_the_converter_and_bad_files_are_one_line(tmp_path):
  """config.checkpoint=HF dir: the same parameters, bit for bit, as the in-memory HF mapping; a
  truncated shard is a one-line error naming the file."""
  from configs import generate
  from mixtral_jax.inference import generate as inference
  from mixtral_jax.checkpoints import loading
  cfg = tiny_config(num_layers=2)
  hf = hf_model(cfg, seed=2)
  hf.save_pretrained(tmp_path / "fused", save_original_format=False)
  assert loading.kind_of(tmp_path / "fused") == "hf"
  got = jax.tree.map(np.asarray, params_of(loading.load(str(tmp_path / "fused"))))
  jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params_of(ours_from_hf(cfg, hf))))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text((tmp_path / "fused" / "config.json").read_text())
  data = (tmp_path / "fused" / "model.safetensors").read_bytes()
  (tmp_path / "bad" / "model.safetensors").write_bytes(data[:len(data) // 2])
  config = generate.get_config()
  config.checkpoint = str(tmp_path / "bad")
  with pytest.raises(ConfigError, match="model.safetensors is truncated") as e:
    inference.load_for_inference(config)
  assert "\n" not in str(e.value)


def test_plan_mode_8x7b():
  from configs import mixtral_8x7b
  from mixtral_jax.config import model_config_from
  from mixtral_jax.inference.planner import plan
  cfg = model_config_from(mixtral_8x7b.get_config().model)
  bf16 = plan(cfg, batch=1, context=4096, chunk=2048)
  assert round(bf16["weights"] / 1e9, 1) == 93.4  # 46.7B parameters x 2 bytes
  assert bf16["kv_cache"] == 2 * 32 * 4096 * 8 * 128 * 2
  assert bf16["fits"]["141GB (H200)"] and not bf16["fits"]["80GB (A100 / H100)"]
  q4 = plan(cfg, quant="q4", batch=1, context=4096, chunk=2048)
  assert q4["weights"] < bf16["weights"] / 3 and q4["fits"]["48GB (L40S / A6000)"]
  out = run("--config=configs/plan.py", "--config.plan.quant=q8")
  assert out.returncode == 0 and "46.70B parameters" in out.stdout and "141GB (H200)" in out.stdout


@pytest.mark.slow
def test_gpu_bench_dry_run(tmp_path):
  out = tmp_path / "gpu.json"
  proc = subprocess.run([sys.executable, "experiments/gpu_bench.py", "--dry_run", "--repeats=1", f"--out={out}"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert set(result["benches"]) == {"decode_bf16", "decode_int8", "prefill", "train_slice", "prefill_32k", "train_8k"}
  for name, bench in result["benches"].items():
    assert "error" not in bench, (name, bench)
    assert bench.get("tok_s", bench.get("tokens_per_s")) > 0
  assert 0 < result["benches"]["train_slice"]["mfu"] < 1


@pytest.mark.slow
def test_bench_inference_quick(tmp_path):
  """The CPU benchmark end to end at tiny sizes (HF on the same converted weights): every row has both
  sides, the ratio, and a floor; the batch-1 row also its expert-sized matvec floor."""
  out = tmp_path / "inference"
  proc = subprocess.run([sys.executable, "experiments/bench_inference.py", "--quick", "--repeats=1",
                         f"--out={out}"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads((tmp_path / "inference.json").read_text())
  assert [r["what"].split()[0] for r in result["rows"]] == ["prefill", "decode", "decode"]
  for r in result["rows"]:
    assert r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0
    assert abs(r["speedup_vs_hf"] - r["ours_tok_s"] / r["hf_tok_s"]) < 1e-9
  b1 = result["rows"][1]
  assert 0 < b1["ours_of_floor"] and 0 < b1["floor1_ms"] and "floor1_ms" not in result["rows"][2]
  assert "| decode B1x16 |" in (tmp_path / "inference.md").read_text()
