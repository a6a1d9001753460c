"""Fine-tune converted weights, fully or with LoRA:

    python run.py --config=configs/finetune.py --config.checkpoint=DIR --config.data.paths=data.jsonl
    python run.py --config=configs/finetune.py:lora=True,targets=attn,rank=16 --config.checkpoint=DIR
    python run.py --config=configs/finetune.py:lora=True,rank=16 --config.checkpoint=DIR \
        --config.train.lora.targets=experts,router

LoRA targets (config.train.lora.targets, comma-separated): attn | experts | all | wq,wk,wv,wo,w1,w3,w2, and
`router` (the router's kernel trained in full; otherwise the router stays frozen). Expert adapters are
per expert and run on the routed rows through the experts' grouped matmul (x W_e + s (x A_e) B_e, no
dense per-expert delta); attention adapters are merged into their small weights each step.

DIR is anything mixtral_jax.checkpoints.loading reads: a converted or quantized checkpoint (dequantized), a workdir of
this trainer, an HF directory or a Mistral release. The model's shape comes from DIR; `config.model` may
change only router_jitter and router_logits_cap, and `config.run` how it computes (dispatch, remat, dtype).
At the end the weights (LoRA: merged into the base) are saved as a checkpoint WORKDIR/export;
LoRA runs also convert them to an HF directory WORKDIR/hf (what `convert --to-hf` writes).
"""
import ml_collections

from configs import base


def get_config(arg=None):
  variant = base.parse_arg(arg, lora=False, rank=8, alpha=16.0, targets="attn", freeze_router=False)
  config = base.get_config()
  config.mode = "train"
  config.checkpoint = ml_collections.config_dict.placeholder(str)  # required: --config.checkpoint=DIR
  config.train.update(dict(
      steps=200, warmup_steps=20, schedule="cosine", end_lr_fraction=0.0,
      learning_rate=1e-3 if variant.lora else 1e-5,   # adapters start at zero and need a larger step
      weight_decay=0.0, freeze_router=variant.freeze_router, export=True, export_hf=variant.lora,
      eval_every=50, checkpoint_every=50))
  config.train.lora.update(dict(rank=variant.rank if variant.lora else 0, alpha=variant.alpha,
                                targets=variant.targets))
  return config
