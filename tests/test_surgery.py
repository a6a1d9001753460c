"""Expert surgery (moe/surgery.py and the `python -m mixtral_jax.surgery` CLI): usage statistics by hand, pruning and
merging that provably keep the function (identical logits), alignment that recovers a permuted expert, and the CLI
end to end on a tiny checkpoint, with every bad input one line, exit status 2 and nothing written."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, tiny_config
from mixtral_jax import surgery as cli
from mixtral_jax.checkpoints import store as checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.inference import sampling
from mixtral_jax.model import STACKED, build, from_params, params_of
from mixtral_jax.moe import surgery
from mixtral_jax.moe.routers import RouterOutput

TOL = 1e-5  # float32: the surgery moves or averages weights; only summation order and the renormalisation differ
CFG = tiny_config(vocab_size=263, num_layers=3)  # V=263 >= the byte tokenizer's 259; E=7, k=2, F=36, D=40
TOKENS = np.random.default_rng(0).integers(3, 263, (2, 11)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
  return jax.device_get(params_of(build(CFG, seed=3)))


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  # one jitted program per config: the eager forward of the unstacked layout takes ~20 s on 2 cores
  def forward(tree, tokens):
    out = from_params(cfg, tree, STACKED)(tokens)
    return out.logits, out.router.experts  # [B, T, V], [L, B, T, k]
  return jax.jit(forward)


def _logits(cfg, tree, tokens=TOKENS):
  return np.asarray(_forward(cfg)(tree, jnp.asarray(tokens))[0])


_model_logits = jax.jit(lambda model, tokens: model(tokens).logits)


def _with_router(tree, kernel):
  moe = {**tree["layers"]["moe"], "router": {"kernel": np.asarray(kernel, np.float32)}}
  return {**tree, "layers": {**tree["layers"], "moe": moe}}


def _with_experts(tree, **experts):
  moe = {**tree["layers"]["moe"], **{k: np.asarray(v, np.float32) for k, v in experts.items()}}
  return {**tree, "layers": {**tree["layers"], "moe": moe}}


def _usage(slots, weight=None, gram=None, tokens=10.0):
  slots = np.asarray(slots, np.float64)
  weight = slots / 2 if weight is None else np.asarray(weight, np.float64)
  num_layers, num_experts = slots.shape
  gram = np.tile(np.eye(num_experts), (num_layers, 1, 1)) if gram is None else np.asarray(gram, np.float64)
  return surgery.ExpertUsage(slots=slots, weight=weight, prob=weight, logit_gram=gram, tokens=np.float64(tokens))


# ----------------------------------------------------------------------------------------------------- usage

def test_expert_usage_by_hand_and_accumulates():
  # 1 layer, 1 row, 3 tokens (the last is padding), 4 experts, top-2; token 1's second slot is unused (weight 0)
  experts = jnp.asarray([[[[0, 2], [2, 3], [1, 0]]]], jnp.int32)
  weights = jnp.asarray([[[[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]]]])
  logits = jnp.asarray([[[[1.0, 0, 2, 0], [0, 1, 1, 3], [5, 5, 5, 5]]]])
  probs = jax.nn.softmax(logits, axis=-1)
  r = RouterOutput(logits=logits, probs=probs, experts=experts, weights=weights)
  u = surgery.expert_usage(r, mask=jnp.asarray([[1, 1, 0]]))
  np.testing.assert_allclose(u.slots, [[1, 0, 2, 0]])
  np.testing.assert_allclose(u.frequency, [[1 / 3, 0, 2 / 3, 0]])
  np.testing.assert_allclose(u.weight_mass, [[0.3, 0, 0.7, 0]], rtol=1e-6)  # (0.6 | 0.4 + 1.0) / 2 tokens
  np.testing.assert_allclose(u.mean_prob, np.asarray(probs[0, 0, :2].mean(0))[None], rtol=1e-6)
  real = np.asarray(logits[0, 0, :2])  # [2, E]
  np.testing.assert_allclose(u.logit_gram[0], real.T @ real, rtol=1e-6)
  assert float(u.tokens) == 2
  # padding and a second batch: sums add; the derived statistics are of the union
  both = u + u
  np.testing.assert_allclose(both.frequency, u.frequency)
  np.testing.assert_allclose(both.slots, 2 * u.slots)
  cos = u.logit_similarity[0]
  np.testing.assert_allclose(np.diag(cos), 1.0, rtol=1e-6)
  np.testing.assert_allclose(cos[2, 3], real[:, 2] @ real[:, 3] / np.linalg.norm(real[:, 2]) / np.linalg.norm(real[:, 3]),
                             rtol=1e-6)


def test_choose_pruned_picks_the_most_used_by_each_criterion():
  slots = [[5, 1, 9, 0, 3], [0, 4, 4, 8, 1]]
  weight = [[1, 8, 2, 0, 3], [6, 0, 0, 1, 2]]  # by weight mass the order differs
  u = _usage(slots, weight)
  np.testing.assert_array_equal(surgery.choose_pruned(u, 3), [[0, 2, 4], [1, 2, 3]])  # ties (4, 4): both kept
  np.testing.assert_array_equal(surgery.choose_pruned(u, 2, by="weight"), [[1, 4], [0, 4]])
  np.testing.assert_array_equal(surgery.choose_pruned(_usage([[2, 2, 2, 1, 0]]), 2), [[0, 1]])  # tie: lower index
  with pytest.raises(ConfigError, match="by='load'"):
    surgery.choose_pruned(u, 2, by="load")
  with pytest.raises(ConfigError, match="num_keep=0"):
    surgery.choose_pruned(u, 0)


def test_choose_groups_leaders_and_most_similar_routing():
  # 1 layer, 5 experts: leaders are the 2 most frequent (2, 0); 1 routes like 2, 3 and 4 like 0
  cos = np.eye(5)
  for a, b, s in ((1, 2, 0.9), (1, 0, 0.2), (3, 0, 0.8), (3, 2, 0.7), (4, 0, 0.1), (4, 2, -0.5)):
    cos[a, b] = cos[b, a] = s
  u = _usage([[6, 1, 9, 2, 0]], gram=cos[None])  # a gram with unit diagonal is its own cosine
  assert surgery.choose_groups(u, 2) == [[[0, 3, 4], [1, 2]]]
  assert surgery.choose_groups(u, 5) == [[[0], [1], [2], [3], [4]]]
  assert surgery.choose_groups(u, 1) == [[[0, 1, 2, 3, 4]]]
  assert surgery.group_leaders([[[0, 3, 4], [1, 2]]], u.frequency) == [[0, 2]]


def test_unsupported_routers_are_refused_with_the_reason(params):
  for router, why in (("hash", "fixed hash of the token id"), ("expert_choice", "capacity")):
    cfg = CFG.replace(router=router)
    with pytest.raises(ConfigError, match=why):
      surgery.prune(params, cfg, np.tile(np.arange(3), (CFG.num_layers, 1)))
    with pytest.raises(ConfigError, match=why):
      surgery.check_router(cfg)


# ----------------------------------------------------------------------------------------------------- prune

def test_prune_keeping_all_experts_in_any_order_keeps_the_logits(params):
  rng = np.random.default_rng(1)
  keep = np.stack([rng.permutation(CFG.num_experts) for _ in range(CFG.num_layers)])  # [L, E]
  tree, cfg = surgery.prune(params, CFG, keep)
  assert cfg == CFG
  assert rel_err(_logits(cfg, tree), _logits(CFG, params)) <= TOL
  w1 = tree["layers"]["moe"]["w1"]
  np.testing.assert_array_equal(w1[1, 0], params["layers"]["moe"]["w1"][1, keep[1, 0]])


def _never_chosen(params, keep_sets):
  """params whose layer-l router can only pick experts keep_sets[l] (4 of them, top-2): kept columns come in
  antipodal pairs (v, -v), so each pair has a logit >= 0 for every input, and the dropped columns are 0."""
  kernel = np.array(params["layers"]["moe"]["router"]["kernel"])  # [L, D, E]
  for layer, kept in enumerate(keep_sets):
    a, b, c, d = kept
    kernel[layer][:, [a, b, c, d]] = 20 * np.stack([kernel[layer][:, a], -kernel[layer][:, a],
                                                    kernel[layer][:, c], -kernel[layer][:, c]], axis=1)
    kernel[layer][:, [e for e in range(CFG.num_experts) if e not in kept]] = 0.0
  return _with_router(params, kernel)


def test_pruning_never_chosen_experts_keeps_the_logits_per_layer_sets(params):
  keep = np.asarray([[0, 2, 4, 6], [1, 2, 3, 5], [0, 3, 5, 6]])  # a different kept set in every layer
  tree = _never_chosen(params, keep)
  experts = np.asarray(_forward(CFG)(tree, jnp.asarray(TOKENS))[1])  # [L, B, T, k]
  for layer in range(3):  # the premise holds
    assert set(np.unique(experts[layer]).tolist()) <= set(keep[layer].tolist())
  pruned, cfg = surgery.prune(tree, CFG, keep)
  assert (cfg.num_experts, cfg.top_k) == (4, 2)
  assert pruned["layers"]["moe"]["w2"].shape == (3, 4, CFG.ffn_dim, CFG.dim)
  full = _logits(CFG, tree)
  assert rel_err(_logits(cfg, pruned), full) <= TOL
  # the test can fail: the same experts kept in every layer drops ones layers 1 and 2 use
  wrong, _ = surgery.prune(tree, CFG, np.tile(keep[0], (3, 1)))
  assert rel_err(_logits(cfg, wrong), full) > 1e-2


def test_prune_lowers_top_k_and_says_so(params):
  with pytest.warns(UserWarning, match="top_k lowered from 2 to 1"):
    tree, cfg = surgery.prune(params, CFG, [[3], [0], [6]])
  assert (cfg.num_experts, cfg.top_k) == (1, 1)
  np.testing.assert_array_equal(tree["layers"]["moe"]["router"]["kernel"][:, :, 0],
                                params["layers"]["moe"]["router"]["kernel"][[0, 1, 2], :, [3, 0, 6]])
  assert np.all(np.isfinite(_logits(cfg, tree)))
  with pytest.raises(ConfigError, match="keep\\[1\\]"):
    surgery.prune(params, CFG, [[0, 1], [2, 2], [0, 1]])


# ----------------------------------------------------------------------------------------------------- merge

def test_groups_of_one_are_prune(params):
  keep = np.asarray([[0, 5, 6], [1, 2, 3], [6, 4, 0]])
  freqs = np.random.default_rng(2).random((3, 7))
  merged, cfg = surgery.merge(params, CFG, [[[e] for e in row] for row in keep], freqs)
  pruned, cfg_p = surgery.prune(params, CFG, keep)
  assert cfg == cfg_p
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged), jax.device_get(pruned))


def test_frequency_weighted_average_and_dominant_router_column(params):
  moe = params["layers"]["moe"]
  freqs = np.zeros((3, 7))
  freqs[:, [1, 4, 5]] = [0.3, 0.5, 0.2]  # expert 4 dominates its group
  merged, cfg = surgery.merge(params, CFG, [[[5, 1, 4], [2]]] * 3, freqs, align=False)
  assert (cfg.num_experts, cfg.top_k) == (2, 2)
  for name in ("w1", "w3", "w2"):
    want = 0.3 * moe[name][:, 1] + 0.5 * moe[name][:, 4] + 0.2 * moe[name][:, 5]
    np.testing.assert_allclose(merged["layers"]["moe"][name][:, 0], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(merged["layers"]["moe"][name][:, 1], moe[name][:, 2])
  kernel = merged["layers"]["moe"]["router"]["kernel"]
  np.testing.assert_array_equal(kernel, moe["router"]["kernel"][:, :, [4, 2]])  # the dominant's column
  # all-zero frequencies: the plain mean
  merged, _ = surgery.merge(params, CFG, [[[3, 6], [0]]] * 3, np.zeros((3, 7)), align=False)
  np.testing.assert_allclose(merged["layers"]["moe"]["w2"][:, 0], (moe["w2"][:, 3] + moe["w2"][:, 6]) / 2, rtol=1e-6)


def test_alignment_recovers_a_permuted_copy(params):
  moe = params["layers"]["moe"]
  perm = np.random.default_rng(4).permutation(CFG.ffn_dim)
  w1, w3, w2 = (np.array(moe[n]) for n in ("w1", "w3", "w2"))
  w1[:, 1], w3[:, 1], w2[:, 1] = w1[:, 0][..., perm], w3[:, 0][..., perm], w2[:, 0][:, perm, :]  # same function
  tree = _with_experts(params, w1=w1, w3=w3, w2=w2)
  layer = (w1[0, 0], w3[0, 0], w2[0, 0]), (w1[0, 1], w3[0, 1], w2[0, 1])
  np.testing.assert_array_equal(perm[surgery.match_hidden_units(*layer)], np.arange(CFG.ffn_dim))  # unit p[i] = unit i
  freqs = np.full((3, 7), 0.1)
  freqs[:, 0] = 0.3
  groups = [[[0, 1], [2], [3], [4], [5], [6]]] * 3
  aligned, _ = surgery.merge(tree, CFG, groups, freqs)
  unaligned, _ = surgery.merge(tree, CFG, groups, freqs, align=False)
  for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
    assert rel_err(aligned["layers"]["moe"][name][:, 0], w[:, 0]) <= 1e-6
    assert rel_err(unaligned["layers"]["moe"][name][:, 0], w[:, 0]) > 0.3


def test_merging_identical_experts_keeps_the_logits(params):
  """Upcycled-like: every expert is the same function f, the router is random. A renormalised router's k
  weights sum to 1, so the layer computes f(x) for any E' >= 1 and any top_k <= E' (lowered to E' when needed):
  merging to fewer experts keeps the logits. Not so for `topk` (unnormalised): its output is f(x) times the
  chosen probabilities' sum, which grows when the softmax runs over fewer experts."""
  moe = params["layers"]["moe"]
  same = {n: np.repeat(np.asarray(moe[n])[:, :1], CFG.num_experts, axis=1) for n in ("w1", "w3", "w2")}
  tree = _with_experts(params, **same)
  freqs = np.random.default_rng(5).random((3, 7))
  full = _logits(CFG, tree)
  merged, cfg = surgery.merge(tree, CFG, [[[0, 3], [1, 2, 6], [4, 5]]] * 3, freqs)
  assert cfg.num_experts == 3 and rel_err(_logits(cfg, merged), full) <= TOL
  with pytest.warns(UserWarning, match="top_k lowered"):
    merged, cfg = surgery.merge(tree, CFG, [[list(range(7))]] * 3, freqs)
  assert (cfg.num_experts, cfg.top_k) == (1, 1) and rel_err(_logits(cfg, merged), full) <= TOL
  unnormalised = CFG.replace(router="topk")
  merged, cfg = surgery.merge(tree, unnormalised, [[[0, 3], [1, 2, 6], [4, 5]]] * 3, freqs)
  assert rel_err(_logits(cfg, merged), _logits(unnormalised, tree)) > 1e-3


# ----------------------------------------------------------------------------------------------------- CLI

CALIBRATION = ("def route(tokens, experts):\n    return sorted(experts, key=len)\n\n"
               "The router sends every token to two of its seven experts.\n\n") * 6


def _run(*argv):
  return cli.main([str(a) for a in argv])


def _calibration_args(text_file):
  return ["--calibration", text_file, "--tokens", 200, "--seq-len", 24, "--batch-size", 3, "--tokenizer", "bytes"]


def _size(path):
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("surgery")
  (root / "cal.txt").write_text(CALIBRATION)
  src = checkpoint.save_model(root / "src", build(CFG, seed=7))
  return root, src


@pytest.fixture(scope="module")
def outputs(saved):
  root, src = saved
  out = {}
  for command, extra in (("prune", []), ("merge", ["--perplexity"])):
    dst = root / command
    assert _run(command, src, dst, "--experts", 3, *_calibration_args(root / "cal.txt"), *extra) == 0
    out[command] = dst
  return out


def test_cli_writes_smaller_checkpoints_that_load_and_generate(saved, outputs, capsys):
  root, src = saved
  for command, dst in outputs.items():
    meta = checkpoint.load_metadata(dst)
    assert meta["model"]["num_experts"] == 3 and meta["model"]["top_k"] == 2
    assert _size(dst) < 0.8 * _size(src)
    source = meta["source"]
    assert source["surgery"] == command and source["criterion"] == "frequency"
    assert ("perplexity" in source) == (command == "merge")  # --perplexity: before and after, both finite
    assert command == "prune" or all(1 < p < 1e4 for p in source["perplexity"])
    assert source["num_experts"] == [7, 3] and source["calibration"]["tokens"] == 216  # 3 rows x 24 x 3 batches
    model = checkpoint.load_model(dst)
    logits = np.asarray(_model_logits(model, jnp.asarray(TOKENS)))
    assert logits.shape == (2, 11, CFG.vocab_size) and np.all(np.isfinite(logits))
    out = sampling.generate(model, [[1, 40, 41], [1, 42]], 4)
    assert out.shape == (2, 7) and int(out.max()) < CFG.vocab_size


def test_cli_result_is_the_library_surgery_on_the_same_calibration(saved, outputs):
  root, src = saved
  cfg, state = checkpoint.restore_state(src)
  from mixtral_jax.training import data
  batches = cli.calibration_batches(data.read_documents(str(root / "cal.txt")), data.load_tokenizer("bytes"),
                                    tokens=200, seq_len=24, batch_size=3)
  usage = cli.calibrate(cli._model(cfg, state), batches)
  source = checkpoint.load_metadata(outputs["prune"])["source"]
  keep = surgery.choose_pruned(usage, 3)
  assert source["kept"] == keep.tolist()
  np.testing.assert_allclose(source["frequency"], usage.frequency, atol=1e-6)
  want, _ = surgery.prune(state, cfg, keep)
  _, got = checkpoint.restore_state(outputs["prune"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  source = checkpoint.load_metadata(outputs["merge"])["source"]
  groups = surgery.choose_groups(usage, 3)
  assert source["groups"] == groups and source["aligned"] is True
  assert source["leaders"] == surgery.group_leaders(groups, usage.frequency)
  want, _ = surgery.merge(state, cfg, groups, usage.frequency)
  _, got = checkpoint.restore_state(outputs["merge"])
  for name in ("w1", "w3", "w2"):
    assert rel_err(got["layers"]["moe"][name], want["layers"]["moe"][name]) <= 1e-6


BAD = {
    "nothing to remove": (["prune", "{src}", "{dst}", "--experts", "7"], "removes nothing"),
    "no experts": (["merge", "{src}", "{dst}", "--experts", "0"], "--experts must be >= 1"),
    "unknown --by": (["prune", "{src}", "{dst}", "--experts", "3", "--by", "load"], "invalid choice: 'load'"),
    "--no-align with prune": (["prune", "{src}", "{dst}", "--experts", "3", "--no-align"], "unrecognized arguments"),
    "hash router": (["prune", "{hash}", "{dst}", "--experts", "3"], "fixed hash of the token id"),
    "missing SRC": (["merge", "{root}/nowhere", "{dst}", "--experts", "3"], "does not exist"),
    "DST exists": (["prune", "{src}", "{src}", "--experts", "3"], "already exists"),
    "missing calibration": (["prune", "{src}", "{dst}", "--experts", "3", "--calibration", "{root}/no.txt"],
                            "data file not found"),
    "tokenizer too big": (["prune", "{src}", "{dst}", "--experts", "3", "--tokenizer", "mixtral"], "32000 pieces"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(case, saved, capsys):
  root, src = saved
  hash_src = root / "hash"
  if case == "hash router" and not hash_src.exists():
    checkpoint.save_model(hash_src, build(CFG.replace(router="hash"), seed=0))
  argv, message = BAD[case]
  defaults = {"--calibration": str(root / "cal.txt"), "--tokenizer": "bytes", "--tokens": "50", "--seq-len": "16"}
  argv = [a.format(src=src, dst=root / "bad", hash=hash_src, root=root) for a in argv]
  argv += [x for flag, value in defaults.items() if flag not in argv for x in (flag, value)]
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
  assert not (root / "bad").exists()
  assert not [p for p in os.listdir(root) if p.startswith(".bad")]


def test_cli_subprocess_exit_status(saved):
  root, src = saved
  out = subprocess.run([sys.executable, "-m", "mixtral_jax.surgery", "prune", str(src), str(root / "x"),
                        "--experts", "9"], capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.startswith("error: --experts=9 removes nothing") and out.stderr.count("\n") == 1
  assert not (root / "x").exists()


@pytest.mark.slow
def test_cli_reads_a_trainer_workdir(saved, tmp_path, capsys):
  """SRC may be a training workdir (its latest full weights), like everything checkpoint.load_model reads."""
  from configs import base
  from mixtral_jax.training import train
  root, _ = saved
  config = base.get_config()
  config.mode = "train"
  config.model.update(dict(vocab_size=263, dim=40, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=12, ffn_dim=36,
                           num_experts=5, top_k=2, max_positions=64, rope_theta=10000.0))
  config.train.update(dict(steps=1, batch_size=2, seq_len=16, warmup_steps=1, log_every=1, eval_every=1, eval_batches=1,
                           checkpoint_every=1, sample_tokens=0))
  config.data.update(dict(paths=str(root / "cal.txt"), tokenizer="bytes", eval_fraction=0.0))
  config.logging.update(dict(wandb="disabled", progress=False, plot=False))
  train.train_and_evaluate(config, str(tmp_path / "run"))
  assert _run("merge", tmp_path / "run", tmp_path / "out", "--experts", 2, *_calibration_args(root / "cal.txt")) == 0
  meta = checkpoint.load_metadata(tmp_path / "out")
  assert meta["source"]["kind"] == "workdir" and meta["model"]["num_experts"] == 2
  assert checkpoint.load_model(tmp_path / "out").config.num_experts == 2
