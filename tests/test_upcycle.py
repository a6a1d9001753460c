"""convert --upcycle (sparse upcycling): a dense Mistral in every source form -> an E-expert Mixtral whose logits
equal HF MistralForCausalLM's; every expert is the dense FFN (expert 0 even with --noise); the router init and
its zero gradient while experts are identical; streaming (one dense matrix per block); bad input is one line,
exit 2, nothing written.

Fixtures are written by HF itself (save_pretrained, single file and sharded) or built here from an HF-written
state dict: the original Mistral format (q/k rows back in interleaved rotary pairs), our Orbax E=1 checkpoint
(through the existing Mixtral name mapping, params.from_hf) and a trainer-style workdir.
"""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, rel_err, tiny_config
from mixtral_jax import convert
from mixtral_jax.checkpoints import params
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.checkpoints import upcycle as upcycling
from mixtral_jax.checkpoints.formats import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # float32 end to end: copies are exact, renormalised top-k weights sum to 1 up to rounding
CONFIGS = {  # odd, distinct sizes; head_dim != hidden_size / heads in "base" and "tied"
    "base": dict(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                 intermediate_size=40, sliding_window=None, rope_theta=10000.0),
    "window": dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                   intermediate_size=36, sliding_window=5, rope_theta=1e6),  # TOKENS: 13 > 5
    "tied": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=14,
                 intermediate_size=44, sliding_window=None, rope_theta=10000.0, tie_word_embeddings=True),
}
VOCAB, DIM = 97, 48
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 13))


def hf_mistral(seed: int, **overrides):
  """A random HF MistralForCausalLM (float32, eager attention); weights larger than HF's 0.02 default and
  non-trivial norm scales, so a misplaced tensor moves the logits visibly."""
  torch.manual_seed(seed)
  cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=DIM, max_position_embeddings=128,
                                   initializer_range=0.08, attn_implementation="eager", **overrides)
  model = transformers.MistralForCausalLM(cfg).eval()
  with torch.no_grad():
    for layer in model.model.layers:
      layer.input_layernorm.weight.uniform_(0.5, 1.5)
      layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    model.model.norm.weight.uniform_(0.5, 1.5)
  return model


@pytest.fixture(scope="module")
def hf_models():
  return {name: hf_mistral(i, **overrides) for i, (name, overrides) in enumerate(CONFIGS.items())}


def hf_tensors(model) -> dict:
  return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def dense_config(model):
  """Our ModelConfig of the dense model: a one-expert Mixtral."""
  hf = model.config.to_dict()
  return params.config_from_hf({**hf, "num_local_experts": 1, "num_experts_per_tok": 1})


def mistral_state(model) -> dict:
  """The original release's tensor names, q/k rows in interleaved rotary pairs (what Mistral ships)."""
  hf, c = hf_tensors(model), model.config
  out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
         "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
  for i in range(c.num_hidden_layers):
    p, q = f"model.layers.{i}.", f"layers.{i}."
    out[q + "attention.wq.weight"] = params.half_to_interleaved(hf[p + "self_attn.q_proj.weight"],
                                                                 c.num_attention_heads)
    out[q + "attention.wk.weight"] = params.half_to_interleaved(hf[p + "self_attn.k_proj.weight"],
                                                                 c.num_key_value_heads)
    out[q + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
    out[q + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
    out[q + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
    out[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
      out[f"{q}feed_forward.{ours}.weight"] = hf[f"{p}mlp.{theirs}.weight"]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def dense_tree(model) -> dict:
  """Our one-expert parameter tree of `model`, through the existing Mixtral mapping (HF names renamed to
  MixtralForCausalLM's legacy ones) -- independent of the code under test. The router is random: with a
  single expert the softmax of its one logit is 1, whatever the kernel."""
  hf, cfg = hf_tensors(model), dense_config(model)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
      hf[f"{p}block_sparse_moe.experts.0.{ours}.weight"] = hf.pop(f"{p}mlp.{theirs}.weight")
    hf[p + "block_sparse_moe.gate.weight"] = np.random.default_rng(i).standard_normal((1, cfg.dim), np.float32)
  return params.from_hf(hf.__getitem__, list(hf), cfg)


def write_workdir(tree, cfg, out: Path):
  """A trainer-style workdir: checkpoints/N with a `state` item holding params and a `meta` JSON with the
  ModelConfig, as training/run_checkpoints.py writes (the data-iterator item is not read back by loading)."""
  import orbax.checkpoint as ocp
  from mixtral_jax import config as config_lib
  manager = ocp.CheckpointManager(str(out / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True),
                                  item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": tree}),
                                          meta=ocp.args.JsonSave({"model": config_lib.to_dict(cfg), "lora": None})))
  manager.wait_until_finished()
  manager.close()


def write_source(model, form: str, root: Path) -> Path:
  out = root / form
  if form == "hf":
    model.save_pretrained(out)
  elif form == "hf_sharded":
    model.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
  elif form in ("mistral", "mistral_pth"):
    c = model.config
    out.mkdir()
    fields = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, head_dim=c.head_dim,
                  hidden_dim=c.intermediate_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                  norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size, rope_theta=c.rope_parameters["rope_theta"])
    if c.sliding_window:
      fields["sliding_window"] = c.sliding_window
    (out / "params.json").write_text(json.dumps(fields))
    state = mistral_state(model)
    if form == "mistral":
      from safetensors.numpy import save_file
      save_file(state, str(out / "consolidated.safetensors"))
    else:
      torch.save({k: torch.from_numpy(v) for k, v in state.items()}, out / "consolidated.00.pth")
  elif form == "orbax":
    checkpoint.save_model(out, dense_tree(model), dense_config(model))
  elif form == "workdir":
    write_workdir(dense_tree(model), dense_config(model), out)
  else:
    raise AssertionError(form)
  return out


_forward = jax.jit(lambda model, tokens: model(tokens).logits)


def ours_logits(path):
  model = checkpoint.load_model(path, dtype="float32")
  return np.asarray(_forward(model, jnp.asarray(TOKENS, jnp.int32)))


def run(argv, capsys):
  capsys.readouterr()  # drop HF's progress bars
  rc = convert.main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def stored(path, name) -> np.ndarray:
  return np.asarray(checkpoint.open_arrays(path)[name].read().result())


# --- function preserving -----------------------------------------------------------------------------

CASES = [("base", "hf", 8, 2), ("base", "hf_sharded", 4, 1), ("base", "mistral", 2, 2), ("base", "orbax", 8, 2),
         ("window", "hf", 4, 1), ("window", "hf_sharded", 8, 2), ("window", "mistral_pth", 2, 2),
         ("window", "orbax", 3, 2), ("window", "mistral", 1, 1), ("tied", "hf", 8, 2), ("tied", "mistral", 5, 3),
         ("base", "workdir", 2, 2)]
LAYOUTS = {"hf": "hf_dense", "hf_sharded": "hf_dense", "mistral": "mistral_dense", "mistral_pth": "mistral_dense",
           "orbax": "mixtral_jax", "workdir": "workdir"}


@pytest.mark.parametrize("config,form,experts,top_k", CASES)
def test_upcycled_logits_equal_dense_hf(config, form, experts, top_k, hf_models, tmp_path, capsys):
  hf = hf_models[config]
  src = write_source(hf, form, tmp_path)
  rc, out, err = run(["--upcycle", "--num-experts", experts, "--top-k", top_k, src, tmp_path / "moe"], capsys)
  assert rc == 0, err
  assert f"{experts} experts (top-{top_k})" in out
  cfg = checkpoint.load_config(tmp_path / "moe")
  assert (cfg.num_experts, cfg.top_k, cfg.router, cfg.dim, cfg.ffn_dim) == (
      experts, top_k, "mixtral_topk", DIM, hf.config.intermediate_size)
  assert cfg.sliding_window == hf.config.sliding_window and cfg.head_dim == hf.config.head_dim
  meta = checkpoint.load_metadata(tmp_path / "moe")["source"]
  assert meta["layout"] == LAYOUTS[form] and meta["upcycle"]["num_experts"] == experts
  assert rel_err(ours_logits(tmp_path / "moe"), hf_logits(hf, TOKENS)) <= TOL


def test_upcycled_to_hf_is_a_mixtral_equal_to_the_dense_mistral(hf_models, tmp_path, capsys):
  """The result serves in HF too: --to-hf of the upcycled checkpoint is a MixtralForCausalLM whose logits
  equal the dense MistralForCausalLM's (sliding window included)."""
  hf = hf_models["window"]
  src = write_source(hf, "hf", tmp_path)
  assert run(["--upcycle", "--num-experts", 4, src, tmp_path / "moe"], capsys)[0] == 0
  assert run(["--to-hf", tmp_path / "moe", tmp_path / "hf_moe"], capsys)[0] == 0
  mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf_moe", attn_implementation="eager",
                                                           experts_implementation="eager")
  assert mixtral.config.num_local_experts == 4 and mixtral.config.sliding_window == 5
  assert rel_err(hf_logits(mixtral, TOKENS), hf_logits(hf, TOKENS)) <= TOL


def test_every_expert_is_the_dense_ffn_and_the_rest_is_unchanged(hf_models, tmp_path, capsys):
  hf = hf_models["window"]
  src = write_source(hf, "mistral", tmp_path)
  assert run(["--upcycle", "--num-experts", 5, "--top-k", 2, src, tmp_path / "moe"], capsys)[0] == 0
  t = hf_tensors(hf)
  w1, w3, w2 = (stored(tmp_path / "moe", f"layers.moe.{w}") for w in ("w1", "w3", "w2"))
  assert w1.shape == (3, 5, DIM, 36) and w2.shape == (3, 5, 36, DIM)
  for i in range(3):
    for j in range(5):
      np.testing.assert_array_equal(w1[i, j], t[f"model.layers.{i}.mlp.gate_proj.weight"].T)
      np.testing.assert_array_equal(w3[i, j], t[f"model.layers.{i}.mlp.up_proj.weight"].T)
      np.testing.assert_array_equal(w2[i, j], t[f"model.layers.{i}.mlp.down_proj.weight"].T)
  wq = stored(tmp_path / "moe", "layers.attn.wq")  # un-interleaved back to HF's rotate-half rows
  np.testing.assert_array_equal(wq[1].reshape(DIM, -1), t["model.layers.1.self_attn.q_proj.weight"].T)


def test_noise_breaks_symmetry_but_keeps_expert_0(hf_models, tmp_path, capsys):
  hf = hf_models["base"]
  src = write_source(hf, "hf", tmp_path)
  flags = ["--upcycle", "--num-experts", 4, "--top-k", 2, "--noise", 0.05, src]
  assert run([*flags, tmp_path / "a"], capsys)[0] == 0
  assert run([*flags, tmp_path / "b"], capsys)[0] == 0
  assert run([*flags, tmp_path / "c", "--seed", 1], capsys)[0] == 0
  t = hf_tensors(hf)
  for name, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
    a, b, c = (stored(tmp_path / d, f"layers.moe.{name}") for d in "abc")
    np.testing.assert_array_equal(a, b)  # seeded: the same run twice is the same checkpoint
    assert not np.array_equal(a[:, 1:], c[:, 1:])
    for i in range(2):
      dense = t[f"model.layers.{i}.{'mlp.' + theirs}.weight"].T
      np.testing.assert_array_equal(a[i, 0], dense)
      for j in range(1, 4):
        relative = (a[i, j] - dense) / dense.std()
        assert 0.045 < relative.std() < 0.055 and abs(relative.mean()) < 0.01, (name, i, j, relative.std())
      assert not np.array_equal(a[i, 1], a[i, 2])
  assert rel_err(ours_logits(tmp_path / "a"), hf_logits(hf, TOKENS)) > 1e-3  # no longer function preserving


def test_router_init_stats_and_ties(hf_models, tmp_path, capsys):
  hf = hf_models["base"]
  src = write_source(hf, "hf", tmp_path)
  for name, flags in (("normal", []), ("wide", ["--router-std", 0.3]), ("zero", ["--router-init", "zero"])):
    assert run(["--upcycle", "--num-experts", 8, src, tmp_path / name, *flags], capsys)[0] == 0
  normal = stored(tmp_path / "normal", "layers.moe.router.kernel")  # [L, D, E]
  assert normal.shape == (2, DIM, 8)
  expected = np.sqrt(0.1 / DIM)
  assert abs(normal.std() / expected - 1) < 0.08 and abs(normal.mean()) < 0.1 * expected  # 768 draws
  assert not np.array_equal(normal[0], normal[1])
  meta = checkpoint.load_metadata(tmp_path / "normal")["source"]["upcycle"]
  assert meta["router_std"] == pytest.approx(expected) and meta["top_k"] == 2  # default top-k: min(2, E)
  assert abs(stored(tmp_path / "wide", "layers.moe.router.kernel").std() / 0.3 - 1) < 0.08
  assert not stored(tmp_path / "zero", "layers.moe.router.kernel").any()
  tokens = jnp.asarray(TOKENS, jnp.int32)
  zero = _route(checkpoint.load_model(tmp_path / "zero"), tokens)
  np.testing.assert_array_equal(np.sort(np.asarray(zero.experts), -1), np.broadcast_to([0, 1], zero.experts.shape))
  np.testing.assert_allclose(np.asarray(zero.weights), 0.5)
  spread = _route(checkpoint.load_model(tmp_path / "normal"), tokens)
  assert len(np.unique(np.asarray(spread.experts))) == 8  # a random router sends the 26 tokens to every expert
  probs = np.asarray(spread.probs)
  assert probs.max() < 2.5 / 8 and probs.min() > 0.4 / 8  # near uniform: small logits


_route = jax.jit(lambda model, tokens: model(tokens).router)


def _next_token_loss(model, tokens):
  logits = model(tokens[:, :-1], train=True).logits
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def _gradients(cache={}):  # one compiled function for every model of the same shapes
  from flax import nnx
  if not cache:
    cache["fn"] = nnx.jit(nnx.grad(_next_token_loss))
  return cache["fn"]


def _router_gradient_ratio(path) -> float:
  """max |dL/dW_router| / max |dL/dW_1| of the next-token cross entropy on TOKENS (train=True forward)."""
  from flax import nnx
  from mixtral_jax.execution import Execution
  model = checkpoint.load_model(path, execution=Execution(layout="stacked"))  # grads under layers.moe
  grads = _gradients()(model, jnp.asarray(TOKENS, jnp.int32))
  moe = nnx.to_pure_dict(grads)["layers"]["moe"]
  return float(jnp.max(jnp.abs(moe["router"]["kernel"])) / jnp.max(jnp.abs(moe["w1"])))


def test_router_gradient_is_zero_while_experts_are_identical(hf_models, tmp_path, capsys):
  """The docstring's claim: identical experts + renormalised top-k = no LM-loss gradient to the router, for
  a random router as for a zero one; noise on the experts gives it one (so this test can fail)."""
  src = write_source(hf_models["base"], "hf", tmp_path)
  cases = (("copies", []), ("zero", ["--router-init", "zero"]), ("noisy", ["--noise", 0.1]))
  for name, flags in cases:
    assert run(["--upcycle", "--num-experts", 4, src, tmp_path / name, *flags], capsys)[0] == 0
  copies, zero, noisy = (_router_gradient_ratio(tmp_path / name) for name, _ in cases)
  # measured: 7e-8 (float rounding of the renormalised weights), exactly 0, 0.15
  assert copies < 1e-6 and zero == 0.0 and noisy > 1e-2, (copies, zero, noisy)


def _random_dense(cfg, seed=7):
  from mixtral_jax.model import abstract_params
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), abstract_params(cfg))


def test_one_expert_orbax_with_shared_experts_and_switch_router(tmp_path, capsys):
  """Our own dense model (E=1) with a shared expert and the switch router: the shared expert passes through,
  the router becomes mixtral_topk, and the logits equal the E=1 model's."""
  from mixtral_jax.model import from_params
  cfg = tiny_config(num_layers=2, num_experts=1, top_k=1, num_shared_experts=1, router="switch")
  dense = from_params(cfg, _random_dense(cfg))
  checkpoint.save_model(tmp_path / "dense", dense)
  assert run(["--upcycle", "--num-experts", 3, tmp_path / "dense", tmp_path / "moe"], capsys)[0] == 0
  moe_cfg = checkpoint.load_config(tmp_path / "moe")
  assert (moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.router, moe_cfg.num_shared_experts) == (3, 2, "mixtral_topk", 1)
  for name in ("shared.w1", "shared.w2", "shared.w3"):
    np.testing.assert_array_equal(stored(tmp_path / "moe", f"layers.moe.{name}"),
                                  stored(tmp_path / "dense", f"layers.moe.{name}"))
  expected = np.asarray(_forward(dense, jnp.asarray(TOKENS % cfg.vocab_size, jnp.int32)))
  got = np.asarray(_forward(checkpoint.load_model(tmp_path / "moe"), jnp.asarray(TOKENS % cfg.vocab_size, jnp.int32)))
  assert rel_err(got, expected) <= TOL


def test_one_expert_model_with_a_non_unit_router_is_refused(tmp_path, capsys):
  cfg = tiny_config(num_layers=2, num_experts=1, top_k=1, router="aux_free_bias")
  from mixtral_jax.model import from_params
  checkpoint.save_model(tmp_path / "dense", from_params(cfg, _random_dense(cfg)))
  rc, _, err = run(["--upcycle", "--num-experts", 4, tmp_path / "dense", tmp_path / "moe"], capsys)
  assert rc == 2 and "router 'aux_free_bias'" in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "moe").exists()


def test_bfloat16_output(hf_models, tmp_path, capsys):
  import ml_dtypes
  hf = hf_models["base"]
  src = write_source(hf, "hf", tmp_path)
  assert run(["--upcycle", "--num-experts", 3, "--dtype", "bfloat16", "--noise", 0.1, src, tmp_path / "moe"],
             capsys)[0] == 0
  assert {str(m.dtype) for m in checkpoint.stored_arrays(tmp_path / "moe").values()} == {"bfloat16"}
  assert checkpoint.load_config(tmp_path / "moe").param_dtype == "bfloat16"
  w1 = stored(tmp_path / "moe", "layers.moe.w1")
  dense = hf_tensors(hf)["model.layers.1.mlp.gate_proj.weight"].T.astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(w1[1, 0].view(np.uint16), dense.view(np.uint16))
  assert not np.array_equal(w1[1, 2], w1[1, 0])


# --- streaming -----------------------------------------------------------------------------------------

def test_streams_one_dense_matrix_per_block(hf_models, tmp_path, monkeypatch):
  """Each dense FFN matrix is read once per layer, every block written is one [D, F] / [F, D] matrix (no
  [E, ...] stack), and noiseless copies are the very same array, re-yielded."""
  from mixtral_jax.checkpoints import formats
  src = write_source(hf_models["window"], "hf", tmp_path)
  reads = []
  real = formats.SafetensorsFile.read
  monkeypatch.setattr(formats.SafetensorsFile, "read",
                      lambda self, name, index=(): reads.append(name) or real(self, name, index))
  dense = upcycling.open_dense(src)
  plan = upcycling.Upcycling(num_experts=6, top_k=2).check()
  tree = upcycling.upcycled_tree(dense.tree(np.dtype("float32")), dense.config, plan)
  for name in ("w1", "w3", "w2"):
    leaf = tree["layers"]["moe"][name]
    assert leaf.shape[:2] == (3, 6) and leaf.chunks == (1, 1, *leaf.shape[2:])
    blocks = list(leaf.blocks())
    assert [index for index, _ in blocks] == [(i, j) for i in range(3) for j in range(6)]
    assert all(block.shape == leaf.shape[2:] for _, block in blocks)
    assert all(blocks[6 * i + j][1] is blocks[6 * i][1] for i in range(3) for j in range(6))
  for theirs in ("gate_proj", "up_proj", "down_proj"):
    assert sorted(n for n in reads if theirs in n) == [f"model.layers.{i}.mlp.{theirs}.weight" for i in range(3)]
  dense.close()


# --- bad input -----------------------------------------------------------------------------------------

def _mixtral_hf(root: Path, hf) -> Path:
  from conftest import hf_model
  hf_model(tiny_config(num_layers=2)).save_pretrained(root / "mixtral")
  return root / "mixtral"


def _mixtral_release(root: Path, hf) -> Path:
  src = write_source(hf, "mistral", root)
  fields = json.loads((src / "params.json").read_text())
  (src / "params.json").write_text(json.dumps({**fields, "moe": {"num_experts": 8, "num_experts_per_tok": 2}}))
  return src


def _mixtral_orbax(root: Path, hf) -> Path:
  from mixtral_jax.model import abstract_params
  cfg = tiny_config(num_layers=2)
  tree = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_params(cfg))
  return checkpoint.save_model(root / "orbax_moe", tree, cfg)


def _rewrite(path: Path, change):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path))
  change(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_json(path: Path, **fields):
  path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _quantized(root: Path, hf) -> Path:
  (root / "q").mkdir()
  (root / "q" / "quantized.json").write_text("{}")
  return root / "q"


E8 = ["--upcycle", "--num-experts", "8"]
BAD = {  # name -> (make SRC under root, extra flags (before SRC DST), words the one line must hold)
    "hf_mixtral": (_mixtral_hf, E8, ["config.json", "already a mixture of experts"]),
    "mistral_moe_release": (_mixtral_release, E8, ["params.json", "already a mixture of experts"]),
    "orbax_moe": (_mixtral_orbax, E8, ["num_experts=7", "already a mixture of experts"]),
    "top_k_over_experts": ("hf", ["--upcycle", "--num-experts", "2", "--top-k", "3"], ["--top-k 3", "--num-experts 2"]),
    "zero_experts": ("hf", ["--upcycle", "--num-experts", "0"], ["--num-experts", "positive"]),
    "zero_top_k": ("hf", [*E8, "--top-k", "0"], ["--top-k", "positive"]),
    "no_num_experts": ("hf", ["--upcycle", "--top-k", "2"], ["--upcycle needs --num-experts"]),
    "negative_noise": ("hf", [*E8, "--noise", "-0.1"], ["--noise", ">= 0"]),
    "with_to_hf": ("hf", [*E8, "--to-hf"], ["--upcycle", "--to-hf"]),
    "flag_without_upcycle": ("hf", ["--num-experts", "8"], ["--num-experts needs --upcycle"]),
    "router_std_with_zero": ("hf", [*E8, "--router-init", "zero", "--router-std", "0.1"], ["--router-std"]),
    "bad_router_std": ("hf", [*E8, "--router-std", "0"], ["--router-std", "positive"]),
    "not_an_int": ("hf", ["--upcycle", "--num-experts", "many"], ["--num-experts", "many"]),
    "dense_without_upcycle": ("hf", [], ["model_type 'mistral' is a dense model", "--upcycle"]),
    "dense_release_without_upcycle": ("mistral", [], ["params.json", "no 'moe' section"]),
    "missing_tensor": ("hf", E8, ["missing tensor", "model.layers.1.mlp.down_proj.weight"]),
    "bad_shape": ("hf", E8, ["model.layers.0.mlp.gate_proj.weight", "shape", "config.json"]),
    "missing_tensor_mistral": ("mistral", E8, ["missing tensor", "layers.0.feed_forward.w3.weight"]),
    "truncated": ("hf", E8, ["model.safetensors", "truncated"]),
    "corrupt_shard": ("hf_sharded", E8, ["corrupt"]),
    "moe_tensor_in_dense": ("hf", E8, ["already a mixture of experts", "block_sparse_moe.gate.weight"]),
    "missing_src": (lambda root, hf: root / "nothing", E8, ["does not exist"]),
    "quantized": (_quantized, E8, ["quantized", "--upcycle"]),
}
BREAK = {  # name -> how to break the written source
    "missing_tensor": lambda d: _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
    "bad_shape": lambda d: _edit_json(d / "config.json", intermediate_size=39),
    "missing_tensor_mistral": lambda d: _rewrite(d / "consolidated.safetensors",
                                                 lambda t: t.pop("layers.0.feed_forward.w3.weight")),
    "truncated": lambda d: os.truncate(d / "model.safetensors", os.path.getsize(d / "model.safetensors") // 2),
    "corrupt_shard": lambda d: _corrupt(sorted(d.glob("model-*.safetensors"))[1]),
    "moe_tensor_in_dense": lambda d: _rewrite(d / "model.safetensors", lambda t: t.update(
        {"model.layers.0.block_sparse_moe.gate.weight": np.ones((8, DIM), np.float32)})),
}


def _corrupt(path: Path):
  data = bytearray(path.read_bytes())
  data[8:20] = b"\x00garbage!!\xff\x01"
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(name, hf_models, tmp_path, capsys):
  make, flags, words = BAD[name]
  hf = hf_models["base"]
  src = write_source(hf, make, tmp_path) if isinstance(make, str) else make(tmp_path, hf)
  if name in BREAK:
    BREAK[name](src)
  dst = tmp_path / "out" / "moe"
  dst.parent.mkdir()
  rc, _, err = run([*flags, src, dst], capsys)
  assert rc == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  for word in words:
    assert word in lines[0], lines[0]
  assert list(dst.parent.iterdir()) == []  # no DST, no temporary directory


def test_python_api_validates_before_opening(tmp_path):
  with pytest.raises(CheckpointError, match="--top-k 5 exceeds --num-experts 4"):
    convert.upcycle(tmp_path / "does_not_matter", tmp_path / "out", num_experts=4, top_k=5)
  with pytest.raises(CheckpointError, match="--noise"):
    convert.upcycle(tmp_path / "x", tmp_path / "out", num_experts=4, noise=float("nan"))
  assert not (tmp_path / "out").exists()


def test_help_documents_upcycling(capsys):
  with pytest.raises(SystemExit):
    convert.main(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  for words in ("--upcycle", "NOT function preserving", "sqrt(0.1/dim)", "experts 0..K-1", "min(2, E)"):
    assert words in text, words
