"""Long-context training: packed sequences of 32k tokens with memory-efficient attention.

    python run.py --config=configs/long_context.py --config.checkpoint=DIR --config.data.paths=long.jsonl
    python run.py --config=configs/long_context.py:lora=True,rank=16 --config.checkpoint=DIR
    python run.py --config=configs/long_context.py:size=tiny,seq=16384,steps=3   # CPU smoke run

Variants: size (8x7b: fine-tune the weights in --config.checkpoint, which also fix the model's shape |
tiny: the CPU-size model from scratch), seq (tokens per packed row, default Mixtral's 32768), batch (rows
per step), steps, lora / rank / targets (as configs/finetune.py), remat.

What makes 32k fit (plan it first: configs/plan_train.py:seq=32768,batch=8,hardware=h200):
  * attention: `flash` from execution.BACKENDS (mixtral_jax/attention) for every sequence this long:
    exact, never more than one block of scores per head group; packed documents cost only their own
    blocks (blocks another document owns are skipped);
  * remat="full": each layer keeps only its input ([B, T, D]) for the backward pass and recomputes the
    rest; without it one 8x7B layer's saved activations at 32k tokens are ~9 GB per sequence;
  * documents are not cut at 4,000 characters (data.chunk_chars): long files stay long documents, which
    is the point of long-context fine-tuning; packing still fills every row.
"""
import ml_collections

from configs import base, finetune


def get_config(arg=None):
  variant = base.parse_arg(arg, size="8x7b", seq=32768, batch=8, steps=200, lora=False, rank=16,
                           targets="all", remat="full")
  if variant.size == "8x7b":
    config = finetune.get_config(f"lora={variant.lora},rank={variant.rank},targets={variant.targets}")
  elif variant.size == "tiny":
    config = base.get_config()
    config.mode = "train"
    config.model.max_positions = variant.seq
    config.train.update(dict(eval_every=variant.steps, checkpoint_every=variant.steps, eval_batches=1,
                             sample_tokens=16, log_every=1, warmup_steps=min(30, variant.steps)))
  else:
    raise ValueError(f"unknown size {variant.size!r}; known: 8x7b, tiny")
  config.train.update(dict(steps=variant.steps, seq_len=variant.seq, batch_size=variant.batch))
  config.run.remat = variant.remat
  config.data.chunk_chars = 1_000_000  # whole files as documents
  return config
