"""The execution spec: validation, per-backend defaults, and that the strategy a config names is the one
every entry point traces (model call, generate, the generate / eval / train modes)."""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from mixtral_jax import execution, model as model_lib
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.moe import dispatch
from mixtral_jax.checkpoints import loading
from mixtral_jax.inference import sampling
from mixtral_jax.config import MOVED_TO_RUN, ConfigError, model_config_from
from mixtral_jax.execution import Execution, execution_from, resolve

# Spies: registered strategies that compute `dense` and record, at trace time, that they were traced.
TRACED = collections.Counter()
SPIES = ("spy_train", "spy_prefill", "spy_decode")
for _name in SPIES:
  if _name not in dispatch.DISPATCHERS:
    def _spy(x, route, w1, w3, w2, *, dtype, _name=_name, **kw):
      TRACED[_name] += 1
      return dispatch.dense(x, route, w1, w3, w2, dtype=dtype)
    dispatch.DISPATCHERS.register(_name)(_spy)
SPY_RUN = dict(train_dispatch="spy_train", prefill_dispatch="spy_prefill", decode_dispatch="spy_decode")


@pytest.fixture(autouse=True)
def _clear():
  TRACED.clear()


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match=r"config.run.decode_dispatch='nope' is unknown"):
    execution_from({"decode_dispatch": "nope"})
  with pytest.raises(ConfigError, match=r"config.run has unknown field\(s\): dispach"):
    execution_from({"dispach": "dense"})
  with pytest.raises(ConfigError, match=r"config.run.layout='rows'"):
    Execution(layout="rows").replace()
  with pytest.raises(ConfigError, match=r"config.run.loop_block must be a non-negative integer"):
    Execution(loop_block=-1).replace()
  for field in MOVED_TO_RUN:  # what used to be a model field points at its new home
    with pytest.raises(ConfigError, match=rf"config.model.{field} is how the model runs.*config.run"):
      model_config_from({field: "x"})


def test_routing_override_fields_resolve_as_given():
  """top_k / top_p 0 is "as trained", a resolved value: resolve leaves both fields as they are."""
  from configs import base
  run = execution_from(base.run_config())  # the config file's run section carries both fields
  assert (run.top_k, run.top_p) == (0, 0.0)
  assert resolve(run).resolved and (resolve(run).top_k, resolve(run).top_p) == (0, 0.0)
  assert (resolve(Execution(top_k=3, top_p=0.5)).top_k, resolve(Execution(top_k=3, top_p=0.5)).top_p) == (3, 0.5)
  assert Execution(top_p=1).replace().top_p == 1
  with pytest.raises(ConfigError, match=r"^config.run.top_p must be in \[0, 1\] \(0 = off\), got 2$"):
    Execution(top_p=2).replace()
  with pytest.raises(ConfigError, match=r"^config.run.top_k must be a non-negative integer"):
    execution_from({"top_k": True})


@pytest.mark.parametrize("backend", sorted(execution.BACKENDS))
def test_backend_defaults_are_exact_registered_strategies(backend):
  run = resolve(Execution(), backend=backend)
  assert run.resolved
  known = dispatch.all_dispatchers()
  for phase in execution.PHASES:
    name = run.dispatch_for(phase)
    assert name in known
    assert name not in ("capacity", "ep_capacity"), "a default must never drop tokens"
  assert resolve(Execution(), purpose="train", backend=backend).layout == "stacked"
  # explicit choices survive resolution
  assert resolve(Execution(decode_dispatch="dense", layout="stacked"), backend=backend).decode_dispatch == "dense"


def test_every_phase_traces_its_strategy_and_equals_dense():
  cfg = tiny_config()
  run = Execution(**SPY_RUN)
  for layout in execution.LAYOUTS:
    TRACED.clear()
    m = model_lib.build(cfg, 0, run.replace(layout=layout))
    ref = model_lib.build(cfg, 0, Execution.everywhere("dense", layout="stacked"))
    x = jax.random.randint(jax.random.key(0), (2, 7), 0, cfg.vocab_size)
    assert rel_err(m(x).logits, ref(x).logits) < 1e-6
    assert TRACED == {"spy_prefill": 1 if layout == "stacked" else cfg.num_layers}
    TRACED.clear()
    m(x, train=True)
    assert set(TRACED) == {"spy_train"}
    TRACED.clear()
    out = sampling.generate(m, [[1, 2, 3]], 3)
    assert set(TRACED) == {"spy_prefill", "spy_decode"}
    np.testing.assert_array_equal(out, sampling.generate(ref, [[1, 2, 3]], 3))


def test_default_build_and_load_are_the_fast_exact_path(tmp_path):
  cfg = tiny_config()
  m = model_lib.build(cfg, 0)
  fast = resolve(Execution())
  assert m.execution == fast  # no argument: the backend's inference execution
  checkpoint.save_model(tmp_path / "ckpt", m)
  loaded = checkpoint.load_model(tmp_path / "ckpt")
  assert loaded.execution == fast
  stored = checkpoint.load_metadata(tmp_path / "ckpt")["model"]
  assert not set(stored) & set(MOVED_TO_RUN), "execution must never be stored with the weights"
  x = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
  np.testing.assert_array_equal(loaded(x).logits, m(x).logits)


def test_same_seed_same_weights_in_every_layout_and_converted_models_agree():
  cfg = tiny_config()
  stacked = model_lib.build(cfg, 3, model_lib.STACKED)
  unstacked = model_lib.build(cfg, 3, Execution(layout="unstacked"))
  a, b = model_lib.params_of(stacked), model_lib.params_of(unstacked)
  assert jax.tree.all(jax.tree.map(lambda p, q: bool((p == q).all()), a, b))
  moved = model_lib.with_execution(stacked, layout="unstacked")
  assert moved.execution.layout == "unstacked" and moved.execution == unstacked.execution
  assert jax.tree.all(jax.tree.map(lambda p, q: bool((p == q).all()), model_lib.params_of(moved), a))
  assert stacked.execution.layout == "stacked", "with_execution returns a new model; the old one is unchanged"


def _spy_config(base_config, path=""):
  config = base_config
  config.run.update(SPY_RUN)
  config.checkpoint = path
  return config


def test_generate_and_eval_modes_trace_the_configured_strategies(tmp_path, capsys):
  from configs import eval as eval_config, generate as generate_config
  from mixtral_jax.inference.evaluate import eval_mode
  from mixtral_jax.inference.generate import generate_mode
  cfg = tiny_config(vocab_size=32000, num_layers=2)
  path = tmp_path / "ckpt"
  checkpoint.save_model(path, model_lib.build(cfg, 0))
  config = _spy_config(generate_config.get_config(), str(path))
  config.max_new_tokens = 4
  generate_mode(config, str(tmp_path))
  assert set(TRACED) == {"spy_prefill", "spy_decode"}
  err = capsys.readouterr().err
  assert "prefill spy_prefill, decode spy_decode" in err
  TRACED.clear()
  config = _spy_config(eval_config.get_config(), str(path))
  text = tmp_path / "text.txt"
  text.write_text("def f(x):\n    return x + 1\n" * 40)
  config.eval.update(dict(data=str(text), seq_len=32, batch_size=2, max_batches=2))
  result = eval_mode(config, str(tmp_path / "eval"))
  assert set(TRACED) == {"spy_prefill"}
  assert np.isfinite(result["perplexity"]) and result["tokens_per_s"] > 0


def test_train_mode_traces_the_training_strategy(tmp_path):
  from test_train import tiny_train_config
  from mixtral_jax.training import train
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n\n" * 60)
  (corpus / "b.txt").write_text("seven experts route every token to two of them\n\n" * 60)
  config = tiny_train_config(str(corpus), steps=2, eval_every=2, checkpoint_every=2, sample_tokens=2)
  config.run.update(SPY_RUN)
  train.train_and_evaluate(config, str(tmp_path / "work"))
  # training steps and the held-out evaluation run the training strategy (prefill defaults to it in the
  # trainer only when "auto"; here it is named, so evaluation traces spy_prefill); the final sample
  # generates with the inference execution of this backend.
  assert TRACED["spy_train"] >= 1 and TRACED["spy_prefill"] >= 1


def _kinds(tmp_path, cfg):
  """One directory of every kind loading.py reads, all holding the same weights (quantized: q8 of them)."""
  import torch  # noqa: F401  (the HF / Mistral writers are the oracle's own)
  from conftest import hf_model, ours_from_hf
  from mixtral_jax import convert
  from mixtral_jax.inference import quant
  hf = hf_model(cfg)
  hf.save_pretrained(tmp_path / "hf")
  ours = ours_from_hf(cfg, hf)
  dirs = {"hf": tmp_path / "hf", "mixtral_jax": tmp_path / "converted"}
  convert.convert(str(dirs["hf"]), str(dirs["mixtral_jax"]))
  quant.save_quantized(str(tmp_path / "q8"), quant.quantize_model(ours, "q8"))
  dirs["quantized"] = tmp_path / "q8"
  return ours, dirs


@pytest.mark.slow
def test_every_checkpoint_kind_loads_for_inference_and_fine_tuning(tmp_path):
  from configs import eval as eval_config
  from mixtral_jax.inference.generate import load_for_inference
  from mixtral_jax.training.run_checkpoints import load_pretrained
  cfg = tiny_config()
  ours, dirs = _kinds(tmp_path, cfg)
  x = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
  want = ours(x).logits
  for kind, path in dirs.items():
    assert loading.kind_of(path) == kind
    config = eval_config.get_config()
    config.checkpoint = str(path)
    m = load_for_inference(config)
    assert m.execution == resolve(Execution()), kind
    tol = 5e-2 if kind == "quantized" else 1e-5  # q8 is lossy; the others are the same float32 weights
    assert rel_err(m(x).logits, want) <= tol, kind
    got_cfg, params = load_pretrained(str(path))
    assert got_cfg.num_experts == cfg.num_experts
    assert rel_err(model_lib.from_params(got_cfg, params)(x).logits, want) <= tol, kind
  with pytest.raises(Exception, match="holds no checkpoint"):
    loading.kind_of(tmp_path)
  (tmp_path / "empty").mkdir()
  config = eval_config.get_config()
  config.checkpoint = str(tmp_path / "empty")
  with pytest.raises(ConfigError, match=r"config.checkpoint: .*empty holds no checkpoint"):
    load_for_inference(config)
