"""mixtral_jax.convert: every released layout -> Orbax -> load_model equals HF; --to-hf reloads in transformers
with identical logits; every bad input is one line on stderr, exit status 2, and nothing left behind.

Fixtures are written by HF itself (save_pretrained: legacy, fused, sharded) or built here from an HF-written
model (the Mistral layouts, with the inverse rotary permutation), so no file layout is guessed twice.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, hf_model, rel_err, tiny_config
from mixtral_jax import convert
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.checkpoints import params
from mixtral_jax.model import params_of

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # float32 end to end: the converter moves bits, the only differences are summation order

CONFIGS = {
    "base": dict(num_layers=2),  # 5 heads / 1 kv head, head_dim 12 != 40 / 5, 7 experts, top-2
    "top1": dict(num_layers=2, top_k=1, num_heads=4, num_kv_heads=2, head_dim=10),
    "top3": dict(num_layers=2, top_k=3, num_experts=5, ffn_dim=22),
    "window": dict(num_layers=2, sliding_window=5, rope_theta=1e6),
}
TOKENS = np.random.default_rng(0).integers(0, 257, (2, 13))  # 13 > the window of 5


@pytest.fixture(scope="module")
def hf_models():
  return {name: hf_model(tiny_config(**overrides), seed=i) for i, (name, overrides) in enumerate(CONFIGS.items())}


def read_safetensors(path):
  from safetensors.numpy import load_file
  return load_file(str(path))


def write_layout(model, layout: str, root: Path) -> Path:
  """Writes `model` in `layout` under root/layout; returns the directory."""
  out = root / layout
  if layout == "legacy":
    model.save_pretrained(out)
  elif layout == "fused":
    model.save_pretrained(out, save_original_format=False)
  elif layout == "sharded":
    model.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
  else:  # Mistral layouts, built from the HF legacy file
    legacy = root / "legacy" if (root / "legacy").is_dir() else write_layout(model, "legacy", root)
    cfg = params.config_from_hf(json.loads((legacy / "config.json").read_text()))
    state = mistral_state(read_safetensors(legacy / "model.safetensors"), cfg, stacked=layout.endswith("stacked"))
    out.mkdir()
    (out / "params.json").write_text(json.dumps(params.config_to_mistral(cfg)))
    if layout == "mistral_safetensors":
      from safetensors.numpy import save_file
      save_file(state, str(out / "consolidated.safetensors"))
    else:  # .pth, split over two files like the original release
      dtype = torch.bfloat16 if layout.endswith("bf16") else torch.float32
      names = sorted(state)
      for n, part in enumerate((names[::2], names[1::2])):
        torch.save({k: torch.from_numpy(state[k]).to(dtype) for k in part}, out / f"consolidated.0{n}.pth")
  return out


def mistral_state(hf: dict, cfg, stacked: bool = False) -> dict:
  """HF legacy tensors -> the Mistral release's names, q/k rows back in interleaved rotary pairs."""
  out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
         "output.weight": hf["lm_head.weight"]}
  for i in range(cfg.num_layers):
    p, q = f"model.layers.{i}.", f"layers.{i}."
    out[q + "attention.wq.weight"] = params.half_to_interleaved(hf[p + "self_attn.q_proj.weight"], cfg.num_heads)
    out[q + "attention.wk.weight"] = params.half_to_interleaved(hf[p + "self_attn.k_proj.weight"], cfg.num_kv_heads)
    out[q + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
    out[q + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
    out[q + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
    out[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    expert = lambda j, w: hf[f"{p}block_sparse_moe.experts.{j}.{w}.weight"]  # noqa: E731
    experts = range(cfg.num_experts)
    if stacked:  # the early release: [E*F, D] per weight, w2 stored transposed ([F, D] per expert)
      out[q + "block_sparse_moe.gate.weight"] = hf[p + "block_sparse_moe.gate.weight"]
      out[q + "block_sparse_moe.w1"] = np.concatenate([expert(j, "w1") for j in experts])
      out[q + "block_sparse_moe.w2"] = np.concatenate([expert(j, "w2").T for j in experts])
      out[q + "block_sparse_moe.w3"] = np.concatenate([expert(j, "w3") for j in experts])
    else:
      out[q + "feed_forward.gate.weight"] = hf[p + "block_sparse_moe.gate.weight"]
      for j in experts:
        for w in ("w1", "w2", "w3"):
          out[f"{q}feed_forward.experts.{j}.{w}.weight"] = expert(j, w)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


_forward = jax.jit(lambda model, tokens: model(tokens).logits)  # compiled once per config, reused


def ours_logits(path, dtype="float32"):
  model = checkpoint.load_model(path, dtype=dtype)
  return np.asarray(_forward(model, jnp.asarray(TOKENS, jnp.int32)))


def run(argv, capsys):
  capsys.readouterr()  # drop what fixtures printed (HF's progress bars)
  rc = convert.main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


LAYOUT_CASES = [("base", "legacy"), ("base", "fused"), ("base", "sharded"), ("base", "mistral_pth"),
                ("base", "mistral_safetensors"), ("base", "mistral_stacked"), ("top1", "fused"),
                ("top3", "mistral_pth"), ("window", "sharded"), ("top3", "mistral_stacked")]


@pytest.mark.parametrize("config,layout", LAYOUT_CASES)
def test_convert_matches_hf(config, layout, hf_models, tmp_path, capsys):
  hf = hf_models[config]
  src = write_layout(hf, layout, tmp_path)
  rc, out, err = run([src, tmp_path / "ckpt"], capsys)
  assert rc == 0, err
  assert "wrote" in out
  expected = {"sharded": "legacy", "mistral_pth": "mistral", "mistral_safetensors": "mistral"}.get(layout, layout)
  assert checkpoint.load_metadata(tmp_path / "ckpt")["source"]["layout"] == expected
  assert rel_err(ours_logits(tmp_path / "ckpt"), hf_logits(hf, TOKENS)) <= TOL


@pytest.mark.parametrize("config", ["base", "top3", "window"])
def test_to_hf_reloads_with_identical_logits(config, hf_models, tmp_path, capsys):
  hf = hf_models[config]
  src = write_layout(hf, "fused", tmp_path)
  assert run([src, tmp_path / "ckpt"], capsys)[0] == 0
  rc, _, err = run(["--to-hf", tmp_path / "ckpt", tmp_path / "hf", "--max-shard-size", "30KB"], capsys)
  assert rc == 0, err
  files = sorted(p.name for p in (tmp_path / "hf").iterdir())
  assert "config.json" in files and "model.safetensors.index.json" in files
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all(s in files for s in shards)
  assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in index["weight_map"]  # legacy names
  reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                            experts_implementation="eager")
  np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(hf, TOKENS))


def rounded_bf16_logits(hf):
  """HF float32 logits of `hf` with every weight rounded to bfloat16 (what a bf16 checkpoint holds)."""
  import copy
  rounded = copy.deepcopy(hf).to(torch.bfloat16).to(torch.float32)
  return hf_logits(rounded, TOKENS)


@pytest.mark.parametrize("case", ["dtype_flag", "bf16_hf_source", "bf16_pth_source"])
def test_bfloat16(case, hf_models, tmp_path, capsys):
  hf = hf_models["base"]
  if case == "dtype_flag":
    src, flags = write_layout(hf, "legacy", tmp_path), ["--dtype", "bfloat16"]
  elif case == "bf16_hf_source":
    src, flags = tmp_path / "bf16", []
    import copy
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(src)
  else:
    src, flags = write_layout(hf, "mistral_pth_bf16", tmp_path), []
  assert run([src, tmp_path / "ckpt", *flags], capsys)[0] == 0
  stored = checkpoint.stored_arrays(tmp_path / "ckpt")
  assert {str(m.dtype) for m in stored.values()} == {"bfloat16"}
  assert checkpoint.load_config(tmp_path / "ckpt").param_dtype == "bfloat16"
  # Loaded in float32, the bf16 weights are exact, so the logits equal HF's on the same rounded weights.
  assert rel_err(ours_logits(tmp_path / "ckpt"), rounded_bf16_logits(hf)) <= TOL
  model = checkpoint.load_model(tmp_path / "ckpt", dtype="bfloat16")
  assert params_of(model)["layers"]["moe"]["w1"].dtype == jnp.bfloat16


def test_float32_from_bf16_and_back_to_hf_bf16(hf_models, tmp_path, capsys):
  """--dtype float32 widens exactly; --to-hf --dtype bfloat16 narrows back to the same bits."""
  hf = hf_models["top1"]
  src = write_layout(hf, "legacy", tmp_path)
  assert run([src, tmp_path / "b", "--dtype", "bfloat16"], capsys)[0] == 0
  assert run(["--to-hf", tmp_path / "b", tmp_path / "hf16"], capsys)[0] == 0
  assert run([tmp_path / "hf16", tmp_path / "f", "--dtype", "float32"], capsys)[0] == 0
  assert run(["--to-hf", tmp_path / "f", tmp_path / "hf32", "--dtype", "bfloat16"], capsys)[0] == 0
  for name in ("model-00001-of-00001.safetensors",):
    a, b = read_safetensors(tmp_path / "hf16" / name), read_safetensors(tmp_path / "hf32" / name)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


# --- bad input --------------------------------------------------------------------------------------

def _rewrite_safetensors(path: Path, change):
  tensors = read_safetensors(path)
  change(tensors)
  from safetensors.numpy import save_file
  save_file(tensors, str(path), metadata={"format": "pt"})


_DROP = object()


def _edit_json(path: Path, **fields):
  data = json.loads(path.read_text())
  data.update(fields)
  path.write_text(json.dumps({k: v for k, v in data.items() if v is not _DROP}))


def _corrupt_header(path: Path):
  data = bytearray(path.read_bytes())
  data[8:20] = b"\x00garbage!!\xff\x01"
  path.write_bytes(bytes(data))


class _Evil:
  def __reduce__(self):
    return (os.system, (f"touch {_Evil.marker}",))


def _evil_pth(src: Path):
  _Evil.marker = src / "PWNED"
  for old in src.glob("*.pth"):
    old.unlink()
  torch.save({"tok_embeddings.weight": _Evil()}, src / "consolidated.00.pth")


BAD = {  # name -> (layout, how to break it (may return extra flags), words the message must contain)
    "missing_src": (None, None, ["does not exist"]),
    "absent_shard": ("sharded", lambda d: _shard(d, 1).unlink(), ["does not exist"]),
    "truncated_shard": ("legacy", lambda d: os.truncate(d / "model.safetensors",
                                                        os.path.getsize(d / "model.safetensors") // 2),
                        ["model.safetensors", "truncated"]),
    "corrupt_header": ("sharded", lambda d: _corrupt_header(_shard(d, 2)), ["corrupt"]),
    "huge_header_length": ("legacy", lambda d: d.joinpath("model.safetensors").write_bytes(
        struct.pack("<Q", 1 << 40) + b"{}"), ["model.safetensors", "header length"]),
    "shape_vs_config": ("legacy", lambda d: _edit_json(d / "config.json", intermediate_size=37),
                        ["experts.0.w1.weight", "shape", "config.json"]),
    "experts_vs_config": ("legacy", lambda d: _edit_json(d / "config.json", num_local_experts=6),
                          ["experts 0..6", "num_local_experts=6"]),
    "fused_experts_vs_config": ("fused", lambda d: _edit_json(d / "config.json", num_local_experts=8),
                                ["mlp.gate.weight", "7 experts", "num_local_experts=8"]),
    "layers_vs_config": ("mistral_safetensors", lambda d: _edit_json(d / "params.json", n_layers=3),
                         ["layers 0..1", "n_layers=3"]),
    "unknown_key": ("legacy", lambda d: _rewrite_safetensors(
        d / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones(3, np.float32)})),
        ["unknown tensor", "model.layers.0.self_attn.extra.weight"]),
    "missing_key": ("legacy", lambda d: _rewrite_safetensors(
        d / "model.safetensors", lambda t: t.pop("model.layers.1.post_attention_layernorm.weight")),
        ["missing tensor", "model.layers.1.post_attention_layernorm.weight"]),
    "missing_key_mistral": ("mistral_stacked", lambda d: _rewrite_pth(d, drop="layers.0.block_sparse_moe.w2"),
                            ["missing tensor", "layers.0.block_sparse_moe.w2"]),
    "corrupt_pth": ("mistral_pth", lambda d: (d / "consolidated.01.pth").write_bytes(b"PK\x03\x04 not a zip"),
                    ["consolidated.01.pth", "cannot be read"]),
    "code_in_pth": ("mistral_pth", _evil_pth, ["consolidated.00.pth", "weights_only"]),
    "bad_config_json": ("legacy", lambda d: (d / "config.json").write_text("{not json"), ["config.json", "JSON"]),
    "config_missing_field": ("legacy", lambda d: _edit_json(d / "config.json", hidden_size=_DROP),
                             ["config.json", "missing field 'hidden_size'"]),
    "not_moe_params": ("mistral_safetensors", lambda d: _edit_json(d / "params.json", moe=None),
                       ["params.json", "moe"]),
    "no_weights": ("legacy", lambda d: (d / "model.safetensors").unlink(), ["no *.safetensors"]),
    "wrong_format_flag": ("legacy", lambda d: ["--format", "mistral"], ["params.json", "does not exist"]),
}


def _shard(src: Path, n: int) -> Path:
  """The n-th shard; the test's message check also requires its name (see _broken_words)."""
  path = sorted(src.glob("model-*.safetensors"))[n]
  _shard.last = path.name
  return path


def _rewrite_pth(src: Path, drop: str):
  for path in src.glob("*.pth"):
    state = torch.load(path, weights_only=True)
    state.pop(drop, None)
    torch.save(state, path)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(name, hf_models, tmp_path, capsys):
  layout, breaker, words = BAD[name]
  src, flags = tmp_path / "nothing_here", []
  if layout is not None:
    src = write_layout(hf_models["base"], layout, tmp_path)
    flags = breaker(src)  # extra command-line flags if it returns a list
  dst = tmp_path / "out" / "ckpt"
  dst.parent.mkdir()
  rc, out, err = run([src, dst, *(flags if isinstance(flags, list) else [])], capsys)
  assert rc == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  if name in ("absent_shard", "corrupt_header"):
    words = [*words, _shard.last]
  for word in words:
    assert word in lines[0], lines[0]
  assert list(dst.parent.iterdir()) == []  # no DST, no temporary directory
  assert not (src / "PWNED").exists()


def test_existing_dst_kept_without_overwrite_replaced_with_it(hf_models, tmp_path, capsys):
  src = write_layout(hf_models["base"], "legacy", tmp_path)
  dst = tmp_path / "ckpt"
  dst.mkdir()
  (dst / "precious.txt").write_text("keep me")
  rc, _, err = run([src, dst], capsys)
  assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
  assert (dst / "precious.txt").read_text() == "keep me"
  assert run([src, dst, "--overwrite"], capsys)[0] == 0
  assert not (dst / "precious.txt").exists() and checkpoint.load_config(dst).num_layers == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "legacy"]  # no temporary leftovers
  rc, _, err = run(["--to-hf", dst, src], capsys)  # an existing HF dir is not clobbered either
  assert rc == 2 and "already exists" in err


def test_failure_mid_write_leaves_old_dst_intact(hf_models, tmp_path, capsys, monkeypatch):
  """A read failing after validation (the disk, not the input) still leaves no partial output."""
  from mixtral_jax.checkpoints import formats
  src = write_layout(hf_models["base"], "legacy", tmp_path)
  dst = tmp_path / "ckpt"
  assert run([src, dst], capsys)[0] == 0
  before = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
  real_read = formats.SafetensorsFile.read

  def failing_read(self, name, index=()):
    if "layers.1.block_sparse_moe.experts.3" in name:
      raise formats.CheckpointError(f"{self.path} is truncated: reading tensor {name} hit the end of the file")
    return real_read(self, name, index)

  monkeypatch.setattr(formats.SafetensorsFile, "read", failing_read)
  rc, _, err = run([src, dst, "--overwrite"], capsys)
  assert rc == 2 and "experts.3" in err and len(err.strip().splitlines()) == 1, err
  assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "legacy"]


def test_to_hf_bad_input(tmp_path, capsys):
  (tmp_path / "plain").mkdir()
  for argv, words in [(["--to-hf", tmp_path / "none", tmp_path / "hf"], ["does not exist"]),
                      (["--to-hf", tmp_path / "plain", tmp_path / "hf"], ["not a mixtral_jax checkpoint"]),
                      (["--to-hf", tmp_path / "plain", tmp_path / "hf", "--max-shard-size", "lots"], ["lots"]),
                      ([tmp_path / "plain"], ["required"])]:
    rc, _, err = run(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
  assert not (tmp_path / "hf").exists()


def test_cli_subprocess_exit_status_and_stderr(hf_models, tmp_path):
  """The real entry point: one stderr line and status 2 on bad input, then a successful conversion."""
  src = write_layout(hf_models["base"], "legacy", tmp_path)
  _edit_json(src / "config.json", num_local_experts=6)
  cmd = [sys.executable, "-m", "mixtral_jax.convert", str(src), str(tmp_path / "ckpt")]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = Path(__file__).resolve().parents[1]
  bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  assert "num_local_experts=6" in bad.stderr and "Traceback" not in bad.stderr
  assert not (tmp_path / "ckpt").exists()
  _edit_json(src / "config.json", num_local_experts=7)
  # Success, and torch is never imported for a safetensors source (only a .pth needs it).
  script = ("import sys; from mixtral_jax import convert; rc = convert.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
  good = subprocess.run([sys.executable, "-c", script, *cmd[3:]], capture_output=True, text=True, env=env,
                        cwd=root, timeout=300)
  assert good.returncode == 0, good.stderr
  assert "wrote" in good.stdout and checkpoint.load_config(tmp_path / "ckpt").num_experts == 7


def test_rotary_permutation_roundtrip():
  w = np.arange(5 * 12 * 3).reshape(5 * 12, 3)
  half = params.interleaved_to_half(w, 5)
  np.testing.assert_array_equal(params.half_to_interleaved(half, 5), w)
  # within head 0, rotate-half row r (< Dh/2) is interleaved row 2r and row Dh/2 + r is 2r + 1
  np.testing.assert_array_equal(half[[0, 1, 6, 7]], w[[0, 2, 1, 3]])


def test_rope_theta_in_rope_parameters_or_top_level(hf_models, tmp_path, capsys):
  src = write_layout(hf_models["window"], "legacy", tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  assert cfg["rope_parameters"]["rope_theta"] == 1e6 and "rope_theta" not in cfg  # transformers v5 style
  assert run([src, tmp_path / "a"], capsys)[0] == 0
  assert checkpoint.load_config(tmp_path / "a").rope_theta == 1e6
  cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]  # older style
  (src / "config.json").write_text(json.dumps(cfg))
  assert run([src, tmp_path / "b"], capsys)[0] == 0
  assert checkpoint.load_config(tmp_path / "b").rope_theta == 1e6
  assert checkpoint.load_config(tmp_path / "b").sliding_window == 5


def test_to_hf_from_save_model_checkpoint(tmp_path, capsys):
  """The serving path for a trained model: save_model (Orbax-chosen chunks) -> --to-hf -> transformers."""
  from flax import nnx
  from mixtral_jax.model import abstract_params, from_params
  cfg = tiny_config(**CONFIGS["top3"])
  rng = np.random.default_rng(7)
  shapes = abstract_params(cfg)
  model = from_params(cfg, jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes))
  checkpoint.save_model(tmp_path / "trained", model)
  rc, _, err = run(["--to-hf", tmp_path / "trained", tmp_path / "hf"], capsys)
  assert rc == 0, err
  reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                            experts_implementation="eager")
  expected = np.asarray(_forward(model, jnp.asarray(TOKENS, jnp.int32)))
  assert rel_err(hf_logits(reloaded, TOKENS), expected) <= TOL
  # A model HF cannot represent is refused, in one line, with nothing written.
  shared = from_params(cfg.replace(num_shared_experts=1), jax.tree.map(
      lambda s: np.zeros(s.shape, np.float32), abstract_params(cfg.replace(num_shared_experts=1))))
  checkpoint.save_model(tmp_path / "shared", shared)
  rc, _, err = run(["--to-hf", tmp_path / "shared", tmp_path / "hf2"], capsys)
  assert rc == 2 and "layers.moe.shared" in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "hf2").exists()
