"""Evaluation: `python run.py --config=configs/eval.py --config.checkpoint=DIR --config.eval.data=FILE`.

task=perplexity scores text / JSONL ({"text"} or {"prompt", "completion"}) files; task=multiple_choice
scores a JSONL of {"context", "choices", "gold"} by log-likelihood (acc, length-normalised acc_norm, and
the Open LLM Leaderboard v2 normalisation when every item has the same number of choices).
Results go to WORKDIR/eval.json.
"""
import ml_collections

from configs import base


def get_config(arg=None):
  variant = base.parse_arg(arg, task="perplexity")
  config = base.get_config()
  config.mode = "eval"
  config.checkpoint = ""            # mixtral_jax / quantized / HF directory; "" = random weights
  config.quant = "none"             # none | q8 | q6 | q5 | q4 | q3 | q2
  config.eval = ml_collections.ConfigDict(dict(
      task=variant.task,            # perplexity | multiple_choice
      data="stdlib",                # files/dirs/globs ("stdlib" = the Python standard library's sources)
      seq_len=256, batch_size=8,
      max_batches=8,                # perplexity: how many packed batches to score
  ))
  return config
