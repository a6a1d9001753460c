"""Run modes `generate` (stream text from a checkpoint) and `plan` (memory planner), and model loading.

    python run.py --config=configs/generate.py --config.checkpoint=DIR --config.prompt="The capital of"
    python run.py --config=configs/generate.py --config.checkpoint=DIR --config.quant=q4
    python run.py --config=configs/plan.py --config.plan.quant=q4 --config.plan.batch=4

`checkpoint` may be anything mixtral_jax.checkpoints.loading reads (a converted or quantized checkpoint, a training
workdir, an HF directory, a Mistral release); empty = random weights for `config.model` (a smoke test).
How it runs is `config.run` (mixtral_jax/execution.py): by default the backend's fastest exact strategy.
"""
from __future__ import annotations

import sys
import time

import jax

from mixtral_jax.inference import quant as quant_lib
from mixtral_jax.inference import sampling
from mixtral_jax.config import ConfigError, model_config_from
from mixtral_jax.modes import MODES
from mixtral_jax.inference.planner import format_plan, plan


def load_for_inference(config):
  """config.checkpoint (+ config.quant, config.run) -> a model ready for sampling.generate: any kind of
  checkpoint (mixtral_jax.checkpoints.loading), running the backend's fastest exact inference unless config.run says
  otherwise. No checkpoint: random weights for config.model (a smoke test of the pipeline)."""
  from mixtral_jax.checkpoints import loading
  from mixtral_jax.execution import execution_from
  from mixtral_jax.checkpoints.formats import CheckpointError
  from mixtral_jax.model import build
  path, dtype = config.checkpoint, config.model.param_dtype
  quant = None if config.get("quant") in ("", "none", None) else config.quant
  if quant is not None and quant not in quant_lib.LEVELS:
    raise ConfigError(f"config.quant={config.quant!r} is not one of none, {', '.join(quant_lib.LEVELS)}")
  run = execution_from(config.get("run"))
  if not path:
    print(f"no config.checkpoint: random weights for config.model (seed {config.seed})", file=sys.stderr)
    model = build(model_config_from(config.model), seed=config.seed, execution=run)
    return quant_lib.quantize_model(model, quant) if quant else model
  try:
    return loading.load(path, dtype=dtype, execution=run, quant=quant)
  except CheckpointError as e:
    raise ConfigError(f"config.checkpoint: {e}") from None


@MODES.register("generate")
def generate_mode(config, workdir):
  """Streams the continuation of config.prompt and reports prefill and decode tokens per second. Both
  programs are compiled ahead of time (reported separately), then run once, streamed."""
  from mixtral_jax.inference.tokenizer import Tokenizer
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
  eos = tok.eos_id if config.stop_at_eos else None
  try:
    t0 = time.perf_counter()
    run_prefill = sampling.prefill(model, ids, n_new, prompt_mask=mask, key=key, chunk=config.prefill_chunk,
                                   compile_only=True, **options)
    compile_prefill = time.perf_counter() - t0
  except sampling.GenerationError as e:
    raise ConfigError(f"generation: {e}") from None
  t0 = time.perf_counter()
  state = jax.block_until_ready(run_prefill())
  prefill_s = time.perf_counter() - t0

  prompt_ids = tok.encode(config.prompt, bos=True)
  stream = tok.stream(prompt_ids)  # seeded with the prompt: the first word keeps its leading space

  def on_token(step, tokens):  # called on the host for every new token, from inside the jitted loop
    print(stream.push(int(tokens[0])), end="", flush=True)

  t0 = time.perf_counter()
  run_decode = sampling.decode(model, state, eos_id=eos, callback=on_token, compile_only=True, **options)
  compile_decode = time.perf_counter() - t0
  print(config.prompt, end="", flush=True)
  t0 = time.perf_counter()
  out = run_decode().tokens
  out.block_until_ready()
  decode_s = time.perf_counter() - t0
  print(stream.flush() if hasattr(stream, "flush") else "")
  generated = int(sampling.generated_lengths(out, ids.shape[1], eos).max())
  steps = max(generated - 1, 1)  # the first token comes from the prefill
  run = model.execution
  routing = "".join(f", run.{name}={getattr(run, name)}" for name in ("top_k", "top_p") if getattr(run, name))
  print(f"[{getattr(model, 'quant', None) or cfg.param_dtype}; {run.layout}, prefill {run.prefill_dispatch}, "
        f"decode {run.decode_dispatch}{routing}] prefill: {ids.size} tokens in {prefill_s * 1e3:.1f} ms = "
        f"{ids.size / prefill_s:.1f} tok/s | decode: {steps} steps x batch {len(prompts)} in "
        f"{decode_s * 1e3:.1f} ms = {steps * len(prompts) / decode_s:.1f} tok/s ({decode_s / steps * 1e3:.2f} "
        f"ms/step) | compile: prefill {compile_prefill:.1f} s, decode {compile_decode:.1f} s", file=sys.stderr)


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
