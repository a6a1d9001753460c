"""The shared base config. Every config file is `get_config(arg)` returning a ConfigDict (big_vision style).

`arg` is a comma-separated list of key=value variants, e.g. `configs/tiny.py:runlocal=True`.
Anything is overridable on the command line: `--config.model.num_experts=4`.
"""
import ml_collections


def parse_arg(arg, **defaults):
  """'a=1,b=True,c=x' -> ConfigDict(a=1, b=True, c='x'), typed by the defaults given."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config variant {key!r}; known: {', '.join(sorted(defaults))}")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def tiny_model():
  """A CPU-size Mixtral: real vocabulary (the Mixtral tokenizer), everything else small. What the network
  *is*; how it runs is `run_config()`."""
  return ml_collections.ConfigDict(dict(
      vocab_size=32000, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, ffn_dim=256,
      num_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, sliding_window=0, max_positions=2048,
      router="mixtral_topk", router_options={}, num_shared_experts=0, router_jitter=0.0,
      router_logits_cap=0.0, param_dtype="float32"))


def mixtral_8x7b_model():
  """The released Mixtral 8x7B hyperparameters (params.json / HF config.json)."""
  model = tiny_model()
  model.update(dict(dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, ffn_dim=14336,
                    max_positions=32768, param_dtype="bfloat16"))
  return model


def run_config():
  """How the model runs (mixtral_jax/execution.py): never stored with the weights. "auto" (and 0) take
  the backend's measured defaults (execution.BACKENDS), every one exact: on CPU dropless for training,
  sorted_loop for prefill, routed_cond for decode, per-layer/per-expert buffers for inference.
  Override any field: --config.run.decode_dispatch=dense, --config.run.train_dispatch=capacity."""
  return ml_collections.ConfigDict(dict(
      train_dispatch="auto", prefill_dispatch="auto", decode_dispatch="auto",  # names in DISPATCHERS
      capacity_factor=1.25,   # capacity dispatch only: buffer rows per expert = factor x balanced load
      grouped_matmul="auto",  # dropless: loop (CPU) | tokamax (GPU) | megablox (TPU) | ragged_dot | blocks
      layout="auto",          # stacked (lax.scan, training) | unstacked (per-layer buffers, CPU inference)
      remat="none",           # none | full | dots | dots_with_no_batch_dims
      dtype="auto",           # compute dtype; auto = the parameters' dtype
      loop_block=0, causal_block=0,  # rows per sorted_loop block / causal attention block; 0 = auto
      rope_identity="auto",   # on | off: XLA:CPU rotary-table workaround (execution.BACKENDS)
      # mixtral_jax.attention for keys >= attention_min_len: flash | xla | cudnn | pallas_gpu | splash;
      # shorter ones and decode steps use xla (materialised scores). flash_block: rows per flash block.
      attention="auto", attention_min_len=0, flash_block=0,
      # Routing override (adaptive compute), every phase: top_k > 0 sends each token to that many experts
      # instead of config.model.top_k; top_p > 0 keeps the fewest experts whose router probabilities reach
      # top_p (Huang et al. 2024), at most top_k (else all E). 0 = as trained. Softmax-top-k routers only
      # (mixtral_topk, topk, switch, top_p). Not the sampler's config.top_k / config.top_p (generate.py).
      top_k=0, top_p=0.0,
  ))


def train_config():
  """mode=train (mixtral_jax/training/train.py). Sized for the default run: tiny model, 2 CPU cores, < 3 minutes."""
  return ml_collections.ConfigDict(dict(
      # 200 steps of 8 x 128 tokens: 2 min 54 s for the whole default run on 2 quiet CPU cores (held-out
      # perplexity 33,247 -> 434); 300 steps take ~4 min (-> 290).
      steps=200, batch_size=8, seq_len=128,
      grad_accum=1,                  # microbatches per step (batch_size rows each), summed before the update
      learning_rate=3e-3, warmup_steps=30,
      schedule="cosine",             # cosine | linear | constant after warmup
      end_lr_fraction=0.1,           # the schedule ends at learning_rate * end_lr_fraction
      b1=0.9, b2=0.95, eps=1e-8,     # AdamW; b2=0.95 is the usual LM choice (faster to adapt than 0.999)
      weight_decay=0.1,              # matrices only: never norm scales or biases
      clip_norm=1.0,                 # global-norm clipping; 0 disables
      # Auxiliary losses (mixtral_jax.moe.losses.LOSSES) and their weights, applied only in the train step.
      # Weight 0 still logs the loss. HF's Mixtral uses router_aux_loss_coef=0.02 for load_balancing.
      aux_losses=ml_collections.ConfigDict({"load_balancing": 0.02, "z_loss": 0.001}),
      freeze_router=False,           # keep every router kernel fixed
      freeze_experts="",             # e.g. "0,3": these experts' weights stay fixed (other experts train)
      lora=dict(rank=0,              # 0 = train every parameter; > 0 = LoRA adapters only
                alpha=16.0,          # update scale alpha / rank
                targets="attn"),     # attn | experts | all | comma-separated wq,wk,wv,wo,w1,w2,w3
      log_every=10, eval_every=100, eval_batches=4,
      checkpoint_every=100, keep_checkpoints=2, async_checkpoints=True,
      sample_prompt="def ", sample_tokens=48,   # a greedy sample after training (0 disables)
      export=False,                  # save the final (LoRA: merged) weights as a checkpoint WORKDIR/export
      export_hf=False,               # ... and convert them to an HF directory WORKDIR/hf
  ))


def data_config():
  return ml_collections.ConfigDict(dict(
      paths="stdlib",     # "stdlib" (the Python standard library's own .py files: no download) or
                          # comma-separated text/JSONL files, directories or globs
      tokenizer="mixtral",  # mixtral (SentencePiece v1 shipped in mistral_common) | bytes | path/to.model
      chunk_chars=4000,   # long text files are split at blank lines into documents of about this size
      eval_fraction=0.05,  # held-out share of files (or of documents when there is one file)
  ))


def logging_config():
  return ml_collections.ConfigDict(dict(
      wandb="offline",    # offline (files under WORKDIR/wandb) | online | disabled
      project="mixtral_jax", name="",
      progress=True,      # tqdm progress bar
      plot=True,          # WORKDIR/training.png: loss and expert load per layer
  ))


def mesh():
  """How devices are arranged and what is split over them (see mixtral_jax/parallel/sharding.py).

  Axis sizes multiply to the device count; -1 takes the rest. The default (fsdp=-1) splits every non-expert
  weight and the batch over all devices, which on one device is no split at all. `rules` map the logical
  axis names on parameters/activations to comma-separated mesh axes ("" = replicated).
  """
  return ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, expert=1, tensor=1,
      rules=dict(layers="", vocab="tensor", embed="fsdp,expert", heads="tensor", kv_heads="tensor", head_dim="",
                 mlp="tensor", expert="expert", batch="data,fsdp,expert", seq="", act_embed="",
                 act_vocab="tensor")))


def distributed():
  """Multi-process runs (jax.distributed.initialize): coordinator "host:port", process count and this
  process's id; also read from MIXTRAL_COORDINATOR / MIXTRAL_NUM_PROCESSES / MIXTRAL_PROCESS_ID.
  `auto=True` lets jax detect SLURM / TPU pods / Open MPI instead."""
  return ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1, auto=False))


def get_config(arg=None):
  variant = parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.mode = "summary"   # what run.py does; see mixtral_jax.modes.MODES
  config.seed = 0
  config.host_memory = "retain"  # keep freed host memory for reuse (mixtral_jax/hostmem.py) | default
  config.model = tiny_model()
  config.run = run_config()
  config.mesh = mesh()
  config.distributed = distributed()
  # summary mode: a forward pass on a random batch of this shape
  config.batch_size = 2
  config.seq_len = 64 if variant.runlocal else 128
  config.train = train_config()
  config.data = data_config()
  config.logging = logging_config()
  config.checkpoint = ""    # fine-tuning: weights to start from (configs/finetune.py)
  return config
