"""LoRA: targets, shapes, merge arithmetic, and a LoRA fine-tune from a converted checkpoint that exports
merged weights equal to the adapter model."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mixtral_jax.training import lora
from mixtral_jax.training import train
from mixtral_jax.training import step as train_step
from mixtral_jax.model import STACKED, build, from_params, params_of
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.training.run_checkpoints import load_pretrained
from test_train import corpus, restore_state, tiny_train_config  # noqa: F401 -- corpus is a fixture


def _params(cfg, seed=0):
  return params_of(build(cfg, seed, STACKED))  # the canonical (stacked) parameter tree LoRA adapts


def test_targets_groups_and_errors():
  assert lora.parse_targets("attn") == ("wq", "wk", "wv", "wo")
  assert lora.parse_targets("wq, w2,wq") == ("wq", "w2")
  assert lora.parse_targets("all") == ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
  with pytest.raises(train.ConfigError, match="unknown target 'router'"):
    lora.parse_targets("attn,router")
  with pytest.raises(train.ConfigError, match="lora.rank must be positive"):
    lora.init({}, rank=0, targets="attn", key=jax.random.PRNGKey(0))


def test_init_is_the_identity_and_merge_is_w_plus_scaled_a_b():
  cfg = tiny_config(num_layers=2)
  params = _params(cfg)
  adapters = jax.jit(lambda p: lora.init(p, rank=3, targets="all", key=jax.random.PRNGKey(0)))(params)
  merge = jax.jit(lambda p, a: lora.merge(p, a, alpha=6.0, rank=3))  # one program, not one per eager op
  assert sorted(lora.targets_of(adapters)) == sorted(lora.GROUPS["all"])
  a, b = adapters["layers"]["attn"]["wo"]["a"], adapters["layers"]["attn"]["wo"]["b"]
  assert a.shape == (2, 5, 12, 3) and b.shape == (2, 3, 40)  # wo [L, H, Dh, D]: in = (H, Dh)
  assert adapters["layers"]["moe"]["w2"]["a"].shape == (2, 7, 36, 3)  # per expert: [L, E, F, r]
  merged = merge(params, adapters)  # B = 0: exactly the base model
  jax.tree.map(np.testing.assert_array_equal, merged, params)

  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters)
  merged = merge(params, adapters)
  for name, (path, batch_axes, _) in lora.LEAVES.items():
    w = np.asarray(lora._get(params, path), np.float64)
    ad = lora._get(adapters, path)
    a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
    lead = w.shape[:batch_axes]
    expect = np.empty_like(w)
    for idx in np.ndindex(*lead):  # one explicit matrix product per layer (and expert)
      a2 = a[idx].reshape(-1, 3)
      expect[idx] = w[idx] + 2.0 * (a2 @ b[idx].reshape(3, -1)).reshape(w[idx].shape)
    # float32 merge vs float64 reference over a rank-3 sum
    np.testing.assert_allclose(lora._get(merged, path), expect, rtol=1e-5, atol=1e-5, err_msg=name)
  eager = lora.merge(params, {"layers": {"attn": {"wv": lora._get(adapters, lora.LEAVES["wv"][0])}}},
                     alpha=6.0, rank=3)
  assert eager["embed"] is params["embed"]  # untouched leaves are shared, not copied


def test_lora_finetune_trains_only_adapters_and_exports_the_same_model(corpus, tmp_path):
  from configs import finetune
  model_cfg = train_step.model_config_from(tiny_train_config(corpus).model)
  source = str(checkpoint.save_model(tmp_path / "source", _params(model_cfg, seed=3), model_cfg))  # "converted"

  config = finetune.get_config("lora=True,rank=4,targets=wq,alpha=8.0")
  tiny = tiny_train_config(corpus, steps=6, learning_rate=3e-2, warmup_steps=1)
  config.model, config.data, config.logging = tiny.model, tiny.data, tiny.logging
  config.train.update({k: tiny.train[k] for k in ("steps", "batch_size", "seq_len", "learning_rate",
                                                  "warmup_steps", "log_every", "eval_every", "eval_batches",
                                                  "checkpoint_every")})
  config.train.lora.targets = "wq,w2"
  config.train.sample_tokens = 0
  config.checkpoint = source
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["eval_loss"] < summary["eval_loss_start"]
  assert summary["lora_params"] == 2 * 4 * (40 + 5 * 12) + 2 * 7 * 4 * (36 + 40)

  # The checkpoint holds adapters only; the base weights are the source's, untouched.
  state = restore_state(tmp_path / "run" / "checkpoints" / "6")
  assert sorted(lora.targets_of(state["params"])) == ["w2", "wq"]
  assert jax.tree.leaves(state["params"]) and all(set(v) == {"a", "b"} for v in (
      state["params"]["layers"]["attn"]["wq"], state["params"]["layers"]["moe"]["w2"]))

  cfg, base = load_pretrained(source)
  cfg_exported, exported = load_pretrained(summary["export"])
  assert cfg_exported == cfg
  changed = {name for name, (path, _, _) in lora.LEAVES.items()
             if not np.array_equal(lora._get(exported, path), lora._get(base, path))}
  assert changed == {"wq", "w2"}
  for path in (("embed",), ("lm_head",), ("layers", "moe", "router", "kernel"), ("layers", "attn", "wk")):
    np.testing.assert_array_equal(lora._get(exported, path), lora._get(base, path))

  # Merged model (exported, reloaded) == base + adapters as the trainer ran it.
  setup = train_step.build_setup(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 16)), jnp.int32)
  batch = dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(16), (2, 16)),
               segment_ids=jnp.ones((2, 16), jnp.int32))
  adapters = jax.tree.map(jnp.asarray, state["params"])
  ours = train_step.forward(setup, adapters, setup.base, setup.rest, batch, train=False).logits
  merged = from_params(cfg_exported, exported, setup.run)(tokens).logits  # the trainer's execution
  np.testing.assert_allclose(merged, ours, rtol=1e-6, atol=1e-6)  # same float32 weights, same program shape

  with pytest.raises(train.ConfigError, match="holds LoRA adapters"):
    load_pretrained(str(tmp_path / "run"))
  assert os.path.isfile(os.path.join(summary["hf"], "config.json"))  # finetune lora=True: also --to-hf
