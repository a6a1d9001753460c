"""The trainer: train step, optimizer pieces, freezing, the router-state hook, checkpoints, resume, signals."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.training import optim
from mixtral_jax.training import train
from mixtral_jax.training import step as train_step
from mixtral_jax.moe.routers import ROUTERS, MixtralTopK
from mixtral_jax.training.run_checkpoints import load_pretrained

WORDS = ("the quick brown fox jumps over the lazy dog while seven experts route every token to two of "
         "them and the router learns which expert knows what").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Ten small English-like text files (deterministic)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(10):
    paragraphs = [" ".join(rng.choice(WORDS, 40)) for _ in range(6)]
    (root / f"doc{i}.txt").write_text("\n\n".join(paragraphs))
  return str(root)


def tiny_train_config(corpus, **train_overrides):
  """configs/base.py with a tiny odd-sized model, the byte tokenizer and no wandb/plot/progress."""
  from configs import base
  config = base.get_config()
  config.mode = "train"
  config.model.update(dict(vocab_size=259, dim=40, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=12,
                           ffn_dim=36, num_experts=7, top_k=2, max_positions=128, rope_theta=10000.0))
  config.train.update(dict(steps=6, batch_size=4, seq_len=32, warmup_steps=2, learning_rate=1e-2, log_every=1,
                           eval_every=3, eval_batches=1, checkpoint_every=3, sample_tokens=4))
  config.train.update(train_overrides)
  config.data.update(dict(paths=corpus, tokenizer="bytes", eval_fraction=0.2))
  config.logging.update(dict(wandb="disabled", progress=False, plot=False))
  return config


def _step_fn(config):
  setup = train_step.build_setup(config)
  trainable = setup.base
  if setup.lora:
    from mixtral_jax.training import lora
    trainable = lora.init(setup.base, rank=setup.lora["rank"], targets=setup.lora["targets"],
                          key=jax.random.PRNGKey(1))
  opt, schedule = optim.make_optimizer(config.train, trainable, num_experts=setup.cfg.num_experts)
  state = dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=jax.jit(opt.init)(trainable),
               rng=jax.random.PRNGKey(0), rest=setup.rest)
  return setup, state, train_step.make_train_step(setup, config.train, opt, schedule)


def _batch(rows, seq_len=32, seed=0):
  rng = np.random.default_rng(seed)
  return dict(tokens=rng.integers(3, 259, (rows, seq_len)).astype(np.int32),
              targets=rng.integers(3, 259, (rows, seq_len)).astype(np.int32),
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
              segment_ids=np.ones((rows, seq_len), np.int32), loss_mask=np.ones((rows, seq_len), np.float32))


def _copy(tree):
  return jax.tree.map(np.array, tree)


class CountingRouter(MixtralTopK):
  """A router with non-parameter state and the generic `update_state` hook."""

  def __init__(self, dim, num_experts, top_k, *, param_dtype=jnp.float32, rngs, **options):
    super().__init__(dim, num_experts, top_k, param_dtype=param_dtype, rngs=rngs, **options)
    self.seen = nnx.Variable(jnp.zeros((num_experts,), jnp.float32))

  @staticmethod
  def update_state(state, *, router, mask, step):
    from mixtral_jax.moe.metrics import expert_load
    return {**state, "seen": state["seen"] + expert_load(router, mask)}


def test_one_step_few_steps_and_gradient_accumulation(corpus):
  """Loss falls on a repeated batch; 2 microbatches of 2 rows == one batch of 4 rows (aux losses off here:
  they are per-microbatch means, so only the cross-entropy accumulates exactly). The router-state hook sees
  the whole step's routing either way."""
  if "test_counting" not in ROUTERS:
    ROUTERS.register("test_counting")(CountingRouter)
  results, seen = [], []
  for accum, rows in ((1, 4), (2, 2)):
    # eps=1 makes Adam's first update lr * g / (|g| + 1) ~ lr * g: linear in the gradient, so comparing
    # parameters compares gradients (with eps=1e-8 it is lr * sign(g), and a 1-ulp sign flip moves 2 lr).
    config = tiny_train_config(corpus, grad_accum=accum, batch_size=rows, warmup_steps=0, schedule="constant",
                               learning_rate=1.0, eps=1.0, weight_decay=0.0)
    config.train.aux_losses.update(dict(load_balancing=0.0, z_loss=0.0))
    config.model.router = "test_counting"
    setup, state, step = _step_fn(config)
    assert "seen" not in state["params"]["layers"]["moe"]["router"]
    batch = _batch(4)
    batch["loss_mask"][1, :5] = 0  # uneven token counts across microbatches
    state, metrics = step(state, None, batch)
    results.append(_copy(state["params"]))
    seen.append(np.asarray(state["rest"]["layers"]["moe"]["router"]["seen"]))  # [L, E] load after one step
    if accum == 1:
      layers, experts = setup.cfg.num_layers, setup.cfg.num_experts
      assert metrics["expert_load"].shape == (layers, experts) and metrics["router_entropy"].shape == (layers,)
      np.testing.assert_allclose(np.sum(metrics["expert_load"], -1), 1.0, rtol=1e-6)
      assert {"aux/load_balancing", "aux/z_loss", "grad_norm", "learning_rate"} <= set(metrics)
      losses = [float(metrics["loss"])]
      assert abs(losses[0] - np.log(259)) < 0.5  # a fresh model is near uniform
      for _ in range(7):
        state, metrics = step(state, None, batch)
        losses.append(float(metrics["loss"]))
      assert int(state["step"]) == 8 and all(np.isfinite(losses))
      assert losses[-1] < 0.8 * losses[0] and min(losses[4:]) < min(losses[:4]), losses
  # results[0] was copied after the first step; float32 sums in a different order agree to ~1e-7.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *results)
  np.testing.assert_allclose(seen[0].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(seen[0], seen[1], rtol=1e-6)


def test_weight_decay_mask_and_schedules(corpus):
  config = tiny_train_config(corpus)
  setup = train_step.build_setup(config)
  mask = optim.decay_mask(setup.base)
  assert mask["layers"]["attn"]["wq"] and mask["embed"] and mask["layers"]["moe"]["w1"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
  t = config.train
  t.update(dict(steps=100, warmup_steps=10, learning_rate=1.0, end_lr_fraction=0.1))
  for kind in ("cosine", "linear"):
    t.schedule = kind
    lr = optim.learning_rate_schedule(t)
    assert float(lr(0)) == 0 and abs(float(lr(10)) - 1.0) < 1e-6 and abs(float(lr(100)) - 0.1) < 1e-6
  t.schedule = "step"
  with pytest.raises(train.ConfigError, match="config.train.schedule='step'"):
    optim.learning_rate_schedule(t)


def test_freezing_router_and_experts_and_the_aux_free_bias_update(corpus):
  """Frozen router and experts 0, 3 stay bit-identical (AdamW decay included); aux_free_bias's bias (model
  state, not a parameter) moves by bias_rate * sign(mean load - load) each step, outside the gradient."""
  from mixtral_jax.moe.routers_extra import aux_free_bias_update
  config = tiny_train_config(corpus, freeze_router=True, freeze_experts="0,3")
  config.model.router = "aux_free_bias"
  config.model.router_options = {"bias_rate": 0.01}
  setup, state, step = _step_fn(config)
  assert "bias" not in state["params"]["layers"]["moe"]["router"]
  before = _copy(state["params"])
  batch = _batch(4)
  route = train_step.forward(setup, state["params"], None, state["rest"], batch, train=True,
                        key=jax.random.fold_in(state["rng"], 0)).router
  expected_bias = aux_free_bias_update(jnp.zeros((2, 7)), route, rate=0.01, mask=jnp.ones((4, 32)))
  for i in range(3):
    state, _ = step(state, None, batch if i == 0 else _batch(4, seed=i))
    if i == 0:
      np.testing.assert_allclose(state["rest"]["layers"]["moe"]["router"]["bias"], expected_bias, atol=1e-7)
  after = _copy(state["params"])
  np.testing.assert_array_equal(after["layers"]["moe"]["router"]["kernel"], before["layers"]["moe"]["router"]["kernel"])
  for name in ("w1", "w2", "w3"):
    b, a = before["layers"]["moe"][name], after["layers"]["moe"][name]  # [L, E, ...]
    np.testing.assert_array_equal(a[:, [0, 3]], b[:, [0, 3]])
    assert all(not np.array_equal(a[:, e], b[:, e]) for e in (1, 2, 4, 5, 6))
  assert not np.array_equal(after["layers"]["attn"]["wq"], before["layers"]["attn"]["wq"])
  with pytest.raises(train.ConfigError, match="freeze_experts has \\[9\\]"):
    optim.parse_experts("1,9", 7)


def test_train_and_evaluate_checkpoints_metrics_and_restart(corpus, tmp_path):
  config = tiny_train_config(corpus, checkpoint_every=2)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 6 and summary["eval_loss"] < summary["eval_loss_start"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]  # keep_checkpoints=2
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
  assert len(records[1]["expert_load"]) == 2 and isinstance(summary["sample"], str)
  cfg, params = load_pretrained(str(tmp_path))  # a workdir is a fine-tuning source: its latest full weights
  assert cfg == train_step.build_setup(config).cfg
  jax.tree.map(np.testing.assert_array_equal, params, restore_state(tmp_path / "checkpoints" / "6")["params"])
  config.train.sample_tokens = 0
  summary = train.train_and_evaluate(config, str(tmp_path))  # a finished run restores and only reports
  assert summary["start_step"] == summary["step"] == 6
  config.model.num_experts = 5
  with pytest.raises(train.ConfigError, match="different run: model.num_experts"):
    train.train_and_evaluate(config, str(tmp_path))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
  real = optim.learning_rate_schedule
  monkeypatch.setattr(optim, "learning_rate_schedule",
                      lambda t: lambda step: jnp.where(step >= 4, jnp.nan, real(t)(step)))
  config = tiny_train_config(corpus, sample_tokens=0)
  with pytest.raises(train.TrainingError, match=r"non-finite loss .* at step 5; stopped\. Last good checkpoint: "
                                               r".*checkpoints/3"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  state = restore_state(tmp_path / "checkpoints" / "3")  # intact, finite, restorable
  assert int(state["step"]) == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------------------------- processes and signals

def _run_py(workdir, corpus, *extra):
  args = [sys.executable, "run.py", f"--workdir={workdir}", f"--config.data.paths={corpus}",
          "--config.data.tokenizer=bytes", "--config.model.vocab_size=259", "--config.model.dim=48",
          "--config.model.num_layers=2", "--config.model.ffn_dim=64", "--config.train.seq_len=64",
          "--config.train.batch_size=4", "--config.train.steps=60", "--config.train.checkpoint_every=10",
          "--config.train.eval_every=30", "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
          "--config.logging.wandb=disabled", "--config.logging.progress=False", "--config.logging.plot=False",
          *extra]
  # The runs compile the same programs: share them through JAX's persistent cache (same executables, so
  # bit-exactness is unaffected).
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def restore_state(step_dir):
  """A saved train state as numpy (Orbax warns that no sharding was given: on one host that is fine)."""
  import warnings
  import orbax.checkpoint as ocp
  with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as checkpointer:
    warnings.simplefilter("ignore", UserWarning)
    return checkpointer.restore(os.path.join(step_dir, "state"))


def _final_params(workdir, step=60):
  return restore_state(os.path.join(workdir, "checkpoints", str(step)))["params"]


def _wait_for_checkpoint(workdir, process, after=0, timeout=600):
  """Blocks until the run has written a complete checkpoint newer than step `after` (training is under way)."""
  start = time.time()
  directory = os.path.join(workdir, "checkpoints")
  while time.time() - start < timeout:
    if os.path.isdir(directory) and any(n.isdigit() and int(n) > after for n in os.listdir(directory)):
      return
    assert process.poll() is None, process.communicate()
    time.sleep(0.02)
  raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bit_exact(corpus, tmp_path):
  """Reference run vs. a run SIGKILLed mid-run, restarted, SIGTERMed mid-run, restarted: the final
  parameters are bit-identical, and so is metrics.jsonl's list of steps."""
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  reference = _run_py(ref, corpus)
  _wait_for_checkpoint(ref, reference)  # its programs are compiled and cached: the other runs reuse them
  first = _run_py(run, corpus)
  _wait_for_checkpoint(run, first)
  first.send_signal(signal.SIGKILL)
  assert first.wait() == -signal.SIGKILL
  killed_at = max(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())
  assert killed_at < 60

  second = _run_py(run, corpus)
  _wait_for_checkpoint(run, second, after=killed_at)
  second.send_signal(signal.SIGTERM)
  out, err = second.communicate()
  assert second.returncode == 0, err
  assert "SIGTERM: saved checkpoint" in out, out
  stopped = int(out.split("checkpoints/")[1].split(";")[0])
  assert killed_at < stopped < 60, (killed_at, stopped)

  third = _run_py(run, corpus)
  for p in (reference, third):
    out, err = p.communicate()
    assert p.returncode == 0, err
  jax.tree.map(np.testing.assert_array_equal, _final_params(run), _final_params(ref))
  steps = lambda w: [json.loads(l)["step"] for l in open(os.path.join(w, "metrics.jsonl"))]  # noqa: E731,E741
  assert steps(run) == steps(ref)


@pytest.mark.slow
def test_default_run_end_to_end(tmp_path):
  """`python run.py` (configs/tiny.py: real tokenizer, stdlib corpus, wandb offline) with fewer steps."""
  out = subprocess.run([sys.executable, "run.py", f"--workdir={tmp_path}", "--config.train.steps=24",
                        "--config.train.batch_size=4", "--config.train.seq_len=64", "--config.train.warmup_steps=4",
                        "--config.train.eval_every=12", "--config.train.checkpoint_every=12",
                        "--config.train.sample_tokens=8", "--config.logging.progress=False"],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  import re
  found = re.search(r"held-out perplexity: ([\d,.]+) at step 0 -> ([\d,.]+) at step 24", out.stdout)
  assert found, out.stdout
  start, end = (float(x.replace(",", "")) for x in found.groups())
  assert end < start / 10, found.group(0)
  assert (tmp_path / "training.png").stat().st_size > 10_000
  assert (tmp_path / "checkpoints" / "24" / "state").is_dir()
  assert list((tmp_path / "wandb").glob("offline-run-*"))
  assert "sample (greedy" in out.stdout
