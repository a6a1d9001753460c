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
  """A CPU-size Mixtral: real vocabulary (the Mixtral tokenizer), everything else small."""
  return ml_collections.ConfigDict(dict(
      vocab_size=32000, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, ffn_dim=256,
      num_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, sliding_window=0, max_positions=2048,
      router="mixtral_topk", router_options={}, dispatch="dense", capacity_factor=1.25,
      num_shared_experts=0, router_jitter=0.0, router_logits_cap=0.0, grouped_matmul="auto",
      param_dtype="float32", dtype="float32", remat="none",
      scan_layers=True))


def mixtral_8x7b_model():
  """The released Mixtral 8x7B hyperparameters (params.json / HF config.json)."""
  model = tiny_model()
  model.update(dict(dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, ffn_dim=14336,
                    max_positions=32768, param_dtype="bfloat16", dtype="bfloat16"))
  return model


def mesh():
  """How devices are arranged and what is split over them (see mixtral_jax/sharding.py).

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
  config.model = tiny_model()
  config.mesh = mesh()
  config.distributed = distributed()
  # summary mode: a forward pass on a random batch of this shape
  config.batch_size = 2
  config.seq_len = 64 if variant.runlocal else 128
  return config
