"""Weight-only quantization: packing, per-level error bounds, model integration, checkpoints, planner."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from mixtral_jax.inference import quant
from mixtral_jax.execution import Execution
from mixtral_jax.model import build, params_of

# Relative (Frobenius) error bounds for N(0, 1) weights. A uniform quantizer with step s has RMS error
# s / sqrt(12); a group of 32 Gaussians spans ~4 sigma, so s ~ 4 / (2^b - 1) and the error is
# ~1.15 / (2^b - 1): q6 0.018, q5 0.037, q4 0.077, q3 0.165, q2 0.385. q8 (per channel over 256 rows,
# range ~ +-3 sigma): ~0.007. Bounds leave ~25% margin.
REL_BOUND = {"q8": 0.009, "q6": 0.023, "q5": 0.047, "q4": 0.095, "q3": 0.2, "q2": 0.48}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
def test_pack_unpack_round_trip(bits):
  codes = jax.random.randint(jax.random.key(bits), (2, 64, 5), 0, 1 << bits).astype(jnp.uint8)
  packed = quant.pack(codes, bits)
  assert sum(p.shape[-2] for p in packed) * 8 == 64 * bits  # bits per code, not bytes
  np.testing.assert_array_equal(quant.unpack(packed, bits), codes)


@pytest.mark.parametrize("level", sorted(quant.LEVELS))
def test_error_bounds_per_level(level):
  w = jax.random.normal(jax.random.key(0), (4, 256, 96))  # [E, D, F]: contraction over D
  q = quant.quantize(w, level, 2, 1)
  deq = q.astype(jnp.float32)
  assert deq.shape == w.shape and q.shape == w.shape
  err = np.abs(np.asarray(deq - w))
  bits, group = quant.LEVELS[level]
  if group == 0:
    step = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127  # [E, 1, F]
  else:
    g = np.asarray(w).reshape(4, 256 // group, group, 96)
    step = np.repeat((g.max(2) - g.min(2)) / ((1 << bits) - 1), group, axis=1)  # [E, D, F]
  # Every weight is within half a step (plus float16 rounding of the stored scale and minimum).
  assert (err <= 0.5 * step * (1 + 2e-3) + 2e-3 * np.abs(np.asarray(w)) + 1e-6).all()
  assert rel_err(deq, w) <= REL_BOUND[level]
  assert abs(q.nbytes * 8 / w.size - quant.bits_per_weight(level, rows=256)) < 1e-9


def test_levels_are_ordered_by_error_and_bytes():
  w = jax.random.normal(jax.random.key(1), (128, 64)) * 0.02
  order = ["q8", "q6", "q5", "q4", "q3", "q2"]
  errs = [rel_err(quant.quantize(w, lvl, 2, 1).astype(jnp.float32), w) for lvl in order]
  sizes = [quant.quantize(w, lvl, 2, 1).nbytes for lvl in order]
  assert errs == sorted(errs) and sizes == sorted(sizes, reverse=True)


@pytest.mark.slow
def test_quantized_model_runs_everywhere_the_float_one_does():
  """Odd sizes (D=40, Dh=12: padded groups) through the forward pass and byte accounting (generation
  with quantized weights: test_inference.py)."""
  cfg = tiny_config(num_layers=1)
  tokens = jnp.asarray([[1, 5, 7, 9, 11, 13]], jnp.int32)
  forward = jax.jit(lambda m, t: m(t).logits)
  for layout in ("stacked", "unstacked"):  # scanned [L, E, ...] weights; per-layer, per-expert buffers
    model = build(cfg, seed=1, execution=Execution(layout=layout))
    ref = forward(model, tokens)
    errs = {}
    for level in ("q8", "q2"):
      qm = quant.quantize_model(model, level)
      assert qm.quant == level and qm.execution == model.execution
      params = params_of(qm)
      assert isinstance(params["layers"]["moe"]["w1"], quant.QTensor), layout
      assert isinstance(params["layers"]["attn"]["wq"], quant.QTensor), layout
      assert not isinstance(params["embed"], quant.QTensor)
      w1 = qm.layers.moe.w1[...] if layout == "stacked" else qm.layers[0].moe.w1[...].parts[0]
      assert isinstance(w1, quant.QTensor), layout  # the weights the forward reads are the quantized ones
      errs[level] = rel_err(forward(qm, tokens), ref)
    assert errs["q8"] < 0.02 and errs["q8"] < errs["q2"] < 1.0, (layout, errs)
    assert quant.weight_bytes(qm)["quantized"] < quant.weight_bytes(model)["quantized"] / 4, layout


def test_quantized_checkpoint_round_trip(tmp_path):
  cfg = tiny_config(num_layers=2, param_dtype="bfloat16")  # computes in bfloat16 too (execution dtype auto)
  qm = quant.quantize_model(build(cfg, seed=2), "q5")
  assert qm.execution.dtype == "bfloat16"
  quant.save_quantized(str(tmp_path / "q5"), qm)
  assert quant.is_quantized_checkpoint(str(tmp_path / "q5"))
  loaded = quant.load_quantized(str(tmp_path / "q5"))
  assert loaded.quant == "q5" and loaded.config == cfg and loaded.execution == qm.execution
  tokens = jnp.asarray([[1, 4, 2, 8]], jnp.int32)
  forward = jax.jit(lambda m, t: m(t).logits)
  np.testing.assert_array_equal(forward(loaded, tokens), forward(qm, tokens))
  with pytest.raises(quant.QuantError, match="is not a quantized checkpoint"):
    quant.load_quantized(str(tmp_path))


def test_unknown_level_is_an_error():
  with pytest.raises(quant.QuantError, match="quant level 'q7' is unknown"):
    quant.quantize(jnp.ones((8, 8)), "q7", 2, 1)


@pytest.mark.slow
def test_quant_table_reports_bytes_and_perplexity_per_level(tmp_path):
  """experiments/quant_table.py on a saved checkpoint and a text file: one row per level, float32 first,
  fewer bytes at every lower level, and perplexity from the same held-out windows (q8 within 1%)."""
  import json
  from experiments import quant_table
  from mixtral_jax.checkpoints.store import save_model
  cfg = tiny_config(vocab_size=32000, dim=32, num_heads=2, num_kv_heads=1, head_dim=16, ffn_dim=64,
                    num_layers=1, max_positions=64)
  save_model(str(tmp_path / "ckpt"), build(cfg, seed=4))
  (tmp_path / "text.txt").write_text("def f(x):\n    return x * 2  # twice\n" * 40)
  quant_table.main(["--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "text.txt"),
                    "--seq_len", "32", "--batch", "2", "--max_windows", "4", "--levels", "q8,q4,q2",
                    "--out", str(tmp_path / "table")])
  rows = json.load(open(tmp_path / "table.json"))["rows"]
  assert [r["level"] for r in rows] == ["float32", "q8", "q4", "q2"]
  assert all(a["quantized_bytes"] > b["quantized_bytes"] for a, b in zip(rows, rows[1:]))
  assert rows[0]["ppl_change"] == 0 and abs(rows[1]["ppl_change"]) < 0.01 and rows[0]["tokens"] == 4 * 31
  assert "| q4 |" in (tmp_path / "table.md").read_text()


def test_quantize_by_layer_and_consume_give_the_same_model():
  """Stacked [L, E, ...] leaves are quantized one layer at a time (bounded float32 working copy); with
  consume=True each float weight is freed once quantized, and the result is the same."""
  from mixtral_jax.model import STACKED, build, params_of
  cfg = tiny_config()
  keep = quant.quantize_model(build(cfg, 0, STACKED), "q4")
  victim = build(cfg, 0, STACKED)
  w1 = victim.layers.moe.w1[...]
  eaten = quant.quantize_model(victim, "q4", consume=True)
  assert w1.is_deleted()
  a, b = params_of(keep), params_of(eaten)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
  whole = quant.quantize(params_of(build(cfg, 0, STACKED))["layers"]["moe"]["w1"], "q4", 2, 1)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), whole, a["layers"]["moe"]["w1"]))
