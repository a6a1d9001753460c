"""Evaluation: perplexity, log-likelihood multiple-choice scoring, Open LLM Leaderboard v2 normalisation.

Scoring is pure given token ids; tokenisation happens at the boundary (the `eval` mode).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.modes import MODES

# The seed's Open LLM Leaderboard v2 table for Mixtral-8x7B (normalised scores, 0-100): what a run on the
# real weights should reproduce.
MIXTRAL_8X7B_LEADERBOARD = {"IFEval": 24.15, "BBH": 30.29, "MATH Lvl5": 10.20, "GPQA": 8.50,
                            "MUSR": 12.58, "MMLU-PRO": 31.66}


def normalized_score(raw: float, *, num_choices: int | None = None, lower_bound: float | None = None) -> float:
  """Leaderboard v2: (raw - 1/n) / (1 - 1/n) * 100, clamped at 0 (raw below the random baseline).

  Generative tasks (IFEval, MATH) have lower bound 0, i.e. the score is just raw * 100.
  """
  if lower_bound is None:
    lower_bound = 0.0 if num_choices is None else 1.0 / num_choices
  if raw < lower_bound:
    return 0.0
  return (raw - lower_bound) / (1.0 - lower_bound) * 100.0


def leaderboard_task_score(subtasks: Sequence[Mapping]) -> float:
  """A task with subtasks (BBH, MUSR): the mean of each subtask's normalised score.
  Each subtask: {"raw": float, "num_choices": int} or {"raw": float, "lower_bound": float}."""
  scores = [normalized_score(s["raw"], num_choices=s.get("num_choices"), lower_bound=s.get("lower_bound"))
            for s in subtasks]
  return sum(scores) / len(scores)


def leaderboard_average(task_scores: Mapping[str, float]) -> float:
  """The leaderboard's headline number: the plain mean of the normalised task scores."""
  return sum(task_scores.values()) / len(task_scores)


@dataclasses.dataclass(frozen=True)
class Choice:
  context: Sequence[int]
  continuation: Sequence[int]


def continuation_logprobs(model, requests: Sequence[Choice], *, pad_id: int = 0,
                          batch_size: int = 8) -> np.ndarray:
  """Sum of log p(continuation | context) for each request, batched with right padding.

  Right padding needs no masking: causal attention means a token never sees the padding after it.
  """
  forward = jax.jit(lambda m, t: jax.nn.log_softmax(m(t).logits, axis=-1))
  out = np.zeros(len(requests), np.float64)
  for start in range(0, len(requests), batch_size):
    chunk = requests[start:start + batch_size]
    seqs = [list(r.context) + list(r.continuation) for r in chunk]
    # Round the padded length up to a multiple of 16 so batches reuse a few compiled shapes.
    length = int(math.ceil(max(map(len, seqs)) / 16) * 16)
    tokens = np.full((batch_size, length), pad_id, np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
    logp = np.asarray(forward(model, jnp.asarray(tokens)))  # [B, T, V]
    for i, r in enumerate(chunk):
      n_ctx, n_cont = len(r.context), len(r.continuation)
      targets = np.asarray(r.continuation)
      # token at position p is predicted by the logits at p - 1
      out[start + i] = logp[i, np.arange(n_ctx - 1, n_ctx + n_cont - 1), targets].sum()
  return out


def score_multiple_choice(model, items: Sequence[Mapping], encode: Callable[[str], list],
                          *, batch_size: int = 8) -> dict:
  """items: {"context": str, "choices": [str], "gold": int}. Returns acc and acc_norm (log-likelihood
  divided by the choice's length in characters, as lm-evaluation-harness does), plus per-item predictions."""
  requests, owners = [], []
  for idx, item in enumerate(items):
    ctx = encode(item["context"], bos=True)
    for choice in item["choices"]:
      requests.append(Choice(ctx, encode(choice, bos=False)))
      owners.append(idx)
  ll = continuation_logprobs(model, requests, batch_size=batch_size)
  correct = correct_norm = 0
  predictions = []
  pos = 0
  for item in items:
    n = len(item["choices"])
    scores = ll[pos:pos + n]
    lengths = np.array([max(len(c), 1) for c in item["choices"]], np.float64)
    pred, pred_norm = int(np.argmax(scores)), int(np.argmax(scores / lengths))
    correct += pred == item["gold"]
    correct_norm += pred_norm == item["gold"]
    predictions.append(pred)
    pos += n
  return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items),
          "predictions": predictions}


def perplexity(model, batches: Iterable[Mapping]) -> dict:
  """Packed batches {tokens, targets, loss_mask [B, T], optional positions, segment_ids} (mixtral_jax.training.data's
  layout) -> token-weighted mean NLL of the targets and its exp."""
  @jax.jit
  def nll(m, batch):
    logits = m(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")).logits
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    target = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # [B, T]
    w = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(target * w), jnp.sum(w)

  total = count = 0.0
  timed_tokens, timed_s, first_s = 0, 0.0, None
  for batch in batches:
    t0 = time.perf_counter()
    s, c = nll(model, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = total + float(s), count + float(c)
    if first_s is None:  # the first batch compiles
      first_s = time.perf_counter() - t0
    else:
      timed_s += time.perf_counter() - t0
      timed_tokens += int(np.size(batch["tokens"]))
  mean = total / max(count, 1.0)
  out = {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(count),
         "first_batch_s": first_s}
  if timed_s:  # forward tokens (every position of every row) per second after the first batch
    out["tokens_per_s"] = timed_tokens / timed_s
  return out


def read_choice_items(path: str) -> list:
  """JSONL of {"context": str, "choices": [str, ...], "gold": int}; errors name the file and line."""
  from mixtral_jax.config import ConfigError
  from mixtral_jax.training.data import jsonl_records
  if not os.path.isfile(path):
    raise ConfigError(f"config.eval.data: file not found: {path}")
  items = []
  for number, item in jsonl_records(path):
    ok = (isinstance(item, dict) and isinstance(item.get("context"), str) and isinstance(item.get("choices"), list)
          and len(item["choices"]) >= 2 and all(isinstance(c, str) for c in item["choices"])
          and isinstance(item.get("gold"), int) and 0 <= item["gold"] < len(item["choices"]))
    if not ok:
      raise ConfigError(f"{path}:{number}: expected {{\"context\": str, \"choices\": [>= 2 str], "
                        f"\"gold\": index}}")
    items.append(item)
  if not items:
    raise ConfigError(f"{path}: no items")
  return items


@MODES.register("eval")
def eval_mode(config, workdir):
  """Perplexity on text/JSONL, or multiple-choice log-likelihood scoring; results to WORKDIR/eval.json."""
  from mixtral_jax.training import data
  from mixtral_jax.inference.generate import load_for_inference
  e = config.eval
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  if e.task not in ("perplexity", "multiple_choice"):
    from mixtral_jax.config import ConfigError
    raise ConfigError(f"config.eval.task={e.task!r} is not one of perplexity, multiple_choice")
  if e.task == "multiple_choice":
    items = read_choice_items(e.data)  # bad data fails before the model loads
  else:
    docs = data.read_documents(e.data, config.data.chunk_chars)
  model = load_for_inference(config)
  if tokenizer.vocab_size > model.config.vocab_size:
    from mixtral_jax.config import ConfigError
    raise ConfigError(f"the tokenizer (config.data.tokenizer={config.data.tokenizer!r}) has {tokenizer.vocab_size} "
                      f"pieces but the model's vocab_size is {model.config.vocab_size}")
  if e.task == "perplexity":
    batches = data.eval_batches(docs, tokenizer, seq_len=e.seq_len, batch_size=e.batch_size,
                                num_batches=e.max_batches)
    result = perplexity(model, batches)
  else:
    result = score_multiple_choice(model, items, tokenizer.encode, batch_size=e.batch_size)
    counts = {len(it["choices"]) for it in items}
    if len(counts) == 1:  # one random baseline: report the leaderboard's normalised score too
      result["acc_norm_leaderboard"] = normalized_score(result["acc_norm"], num_choices=counts.pop())
    result.pop("predictions")
  # The routing override changes the model's compute and scores: the result says which ran (0 = trained).
  result.update(task=e.task, data=e.data, checkpoint=config.checkpoint,
                routing={"top_k": model.execution.top_k, "top_p": model.execution.top_p})
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  return result
