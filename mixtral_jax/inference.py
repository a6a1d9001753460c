"""Run modes `generate` (stream text from a checkpoint) and `plan` (memory planner), and model loading.

    python run.py --config=configs/generate.py --config.checkpoint=DIR --config.prompt="The capital of"
    python run.py --config=configs/generate.py --config.checkpoint=DIR --config.quant=q4
    python run.py --config=configs/plan.py --config.plan.quant=q4 --config.plan.batch=4

`checkpoint` may be a mixtral_jax checkpoint (written by `python -m mixtral_jax.convert` or
save_model), a quantized checkpoint (quant.save_quantized), or an HF directory (config.json +
*.safetensors); empty = random weights for `config.model` (a smoke test of the pipeline).
"""
from __future__ import annotations

import os
import sys
import time

import jax

from mixtral_jax import quant as quant_lib
from mixtral_jax import sampling
from mixtral_jax.config import ConfigError, model_config_from
from mixtral_jax.modes import MODES
from mixtral_jax.planner import format_plan, plan


def load_hf_dir(path: str, dtype: str = "float32"):
  """An HF Mixtral directory (config.json + *.safetensors, sharded or not) -> Mixtral, through the
  converter's reader (sources.py): the same layouts and the same checks, tensor by tensor."""
  from mixtral_jax import sources
  from mixtral_jax.model import from_params
  source = sources.open_source(path, "hf")
  try:
    cfg = source.config.replace(param_dtype=dtype, dtype=dtype)
    params = sources.read_tree(source, cfg.jnp_param_dtype)
  finally:
    source.close()
  return from_params(cfg, params)


def _user_error(load):
  """Runs load(); a CheckpointError (a bad file, named in its message) becomes the ConfigError run.py
  reports as one line."""
  from mixtral_jax.formats import CheckpointError
  try:
    return load()
  except CheckpointError as e:
    raise ConfigError(f"config.checkpoint: {e}") from None


def load_for_inference(config):
  """config.checkpoint (+ config.quant) -> a model ready for sampling.generate, in the inference layout."""
  path, dtype = config.checkpoint, config.model.param_dtype
  if config.quant not in ("", "none", None) and config.quant not in quant_lib.LEVELS:
    raise ConfigError(f"config.quant={config.quant!r} is not one of none, {', '.join(quant_lib.LEVELS)}")
  if not path:
    from mixtral_jax.model import build
    print(f"no config.checkpoint: random weights for config.model (seed {config.seed})", file=sys.stderr)
    model = build(model_config_from(config.model), seed=config.seed)
  elif not os.path.isdir(path):
    raise ConfigError(f"config.checkpoint={path} is not a directory")
  elif quant_lib.is_quantized_checkpoint(path):
    model = quant_lib.load_quantized(path)
  elif os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "config")):
    from mixtral_jax import checkpoint
    model = _user_error(lambda: checkpoint.load_model(path, dtype=dtype))
  elif os.path.isfile(os.path.join(path, "config.json")):
    model = _user_error(lambda: load_hf_dir(path, dtype))
  else:
    raise ConfigError(f"config.checkpoint={path} holds no checkpoint (no params/, quantized.json or config.json)")
  if config.quant and config.quant != "none":
    if getattr(model, "quant", None):
      raise ConfigError(f"config.checkpoint={path} is already quantized ({model.quant}); drop config.quant")
    model = quant_lib.quantize_model(model, config.quant)
  from mixtral_jax.unstacked import unstack
  return unstack(model)  # the inference layout: per-layer, per-expert buffers (unstacked.py)


@MODES.register("generate")
def generate_mode(config, workdir):
  """Streams the continuation of config.prompt and reports prefill and decode tokens per second."""
  from mixtral_jax.tokenizer import Tokenizer
  tok = Tokenizer(config.tokenizer or None)
  model = load_for_inference(config)
  cfg = model.config
  if tok.vocab_size > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is {cfg.vocab_size}")
  prompts = [config.prompt] * config.batch_size
  ids, mask = tok.encode_batch(prompts)
  n_new = config.max_new_tokens
  options = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
  key = jax.random.key(config.seed)
  chunk = config.prefill_chunk
  eos = tok.eos_id if config.stop_at_eos else None

  t0 = time.perf_counter()
  state = sampling.prefill(model, ids, n_new, prompt_mask=mask, key=key, chunk=chunk, **options)
  jax.block_until_ready(state)
  compile_prefill = time.perf_counter() - t0
  t0 = time.perf_counter()  # second call: compiled, the time of the prefill alone
  state = sampling.prefill(model, ids, n_new, prompt_mask=mask, key=key, chunk=chunk, **options)
  jax.block_until_ready(state)
  prefill_s = time.perf_counter() - t0

  stream, printing = tok.stream(), []

  def on_token(step, tokens):  # called on the host for every new token, from inside the jitted loop
    if printing:
      print(stream.push(int(tokens[0])), end="", flush=True)

  # The first decode call compiles (and runs silently); the second, streamed one is timed.
  t0 = time.perf_counter()
  sampling.decode(model, state, eos_id=eos, callback=on_token, **options).tokens.block_until_ready()
  compile_decode = time.perf_counter() - t0
  state = sampling.prefill(model, ids, n_new, prompt_mask=mask, key=key, chunk=chunk, **options)
  printing.append(True)
  print(config.prompt, end="", flush=True)
  t0 = time.perf_counter()
  out = sampling.decode(model, state, eos_id=eos, callback=on_token, **options).tokens
  out.block_until_ready()
  decode_s = time.perf_counter() - t0
  print()
  generated = int(sampling.generated_lengths(out, ids.shape[1], eos).max())
  steps = max(generated - 1, 1)  # the first token comes from the prefill
  print(f"[{getattr(model, 'quant', None) or cfg.param_dtype}] prefill: {ids.size} tokens in "
        f"{prefill_s * 1e3:.1f} ms = {ids.size / prefill_s:.1f} tok/s | decode: {steps} steps x batch "
        f"{len(prompts)} in {decode_s * 1e3:.1f} ms = {steps * len(prompts) / decode_s:.1f} tok/s "
        f"({decode_s / steps * 1e3:.2f} ms/step) | compile+first run: prefill {compile_prefill:.1f} s, "
        f"decode {compile_decode:.1f} s", file=sys.stderr)


@MODES.register("plan")
def plan_mode(config, workdir):
  """Prints weight, KV-cache and activation memory and which devices the total fits."""
  cfg = model_config_from(config.model)
  p = config.plan
  q = None if p.quant in ("", "none", None) else p.quant
  try:
    result = plan(cfg, quant=q, batch=p.batch, context=p.context, chunk=p.chunk or None)
  except (quant_lib.QuantError, ValueError) as e:
    raise ConfigError(str(e)) from None
  print(format_plan(result))
