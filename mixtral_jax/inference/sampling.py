"""Autoregressive generation: one jitted prefill, then the whole decode loop inside one jitted while_loop.

    out = generate(model, prompts, max_new_tokens=32)                    # greedy
    out = generate(model, prompts, 32, temperature=0.8, top_p=0.9, key=jax.random.key(0), eos_id=2)

`prompts` is a list of token-id lists (any lengths) or an int array [B, T] with an optional
`prompt_mask` [B, T] (1 = real token). Rows are left-aligned internally: real tokens are moved to the
right end of the row (left padding), so every row's next token goes to the same cache slot and a
rolling cache always holds each row's most recent tokens. Padding is segment 0 (never attended to) and
positions count real tokens only, so a padded batch computes exactly what each prompt computes alone.

Returns int32 [B, T + max_new_tokens]: row b is its prompt left-padded with `pad_id` to T, then the
generated tokens; after a row emits `eos_id` (kept), the rest of the row is `pad_id`.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p
(nucleus) filtering, then a categorical draw with `jax.random.fold_in(key, step)`: the same key gives
the same tokens.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import io_callback

from mixtral_jax.model import KVCache

# The model decides how it runs: its execution's prefill dispatch for the prompt, its decode dispatch for
# each new token (mixtral_jax/execution.py). To generate with other strategies, generate with
# model.with_execution(model, prefill_dispatch=..., decode_dispatch=...).


class GenerationError(ValueError):
  """A user-caused generation error (prompt too long, bad sampling arguments); one sentence."""


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries. N = max_new_tokens."""
  tokens: jax.Array    # [B, T + N] int32 output buffer: prompt, then generated tokens (pad after EOS)
  cache: KVCache
  last: jax.Array      # [B] int32 the token to feed next
  lengths: jax.Array   # [B] int32 real prompt tokens per row
  done: jax.Array      # [B] bool: row has emitted EOS
  step: jax.Array      # [] int32 number of tokens generated so far
  key: jax.Array       # PRNG key (unused when greedy)


# ----------------------------------------------------------------------------------------------------
# Sampling rules (pure)

def sample_logits(logits, key, *, temperature=0.0, top_k=0, top_p=1.0):
  """logits [B, V] float32 -> tokens [B] int32. temperature=0: argmax (first index on ties).

  temperature, top_k (0 = off) and top_p (1 = off) may be traced scalars, so one compiled decode loop
  serves every sampling setting; only greedy vs sampled is a separate program (greedy skips the sort).
  """
  if isinstance(temperature, (int, float)) and temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V] descending
  # top-k: keep logits >= the k-th largest (ties at the threshold are kept).
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take(sorted_logits, k - 1, axis=-1)[:, None]  # [B, 1]
  sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
  # top-p: the smallest most-likely prefix whose mass reaches top_p (the top token always stays).
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass strictly before each sorted token
  kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1] smallest kept logit
  logits = jnp.where((logits >= threshold) & (logits >= kth), logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling(temperature, top_k, top_p, key):
  if temperature < 0:
    raise GenerationError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise GenerationError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
  if temperature > 0 and key is None:
    raise GenerationError("sampling with temperature > 0 needs an explicit PRNG key (key=jax.random.key(0))")


# ----------------------------------------------------------------------------------------------------
# Prompt layout

def left_align(tokens, prompt_mask=None, pad_id: int = 0):
  """Prompts -> (tokens int32 [B, T] left-padded with pad_id, lengths int32 [B]) as numpy arrays.

  tokens: a list of id lists, or an array [B, T] whose real tokens are marked by prompt_mask.
  """
  if isinstance(tokens, (list, tuple)) and (not tokens or not np.isscalar(tokens[0])):
    rows = [np.asarray(r, np.int64).reshape(-1) for r in tokens]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
      out[i, width - len(r):] = r
    lengths = np.asarray([len(r) for r in rows], np.int32)
  else:
    out = np.asarray(tokens, np.int32)
    if out.ndim != 2:
      raise GenerationError(f"tokens must be [batch, length], got shape {out.shape}")
    mask = np.ones_like(out) if prompt_mask is None else np.asarray(prompt_mask).astype(bool)
    if mask.shape != out.shape:
      raise GenerationError(f"prompt_mask shape {mask.shape} != tokens shape {out.shape}")
    order = np.argsort(mask, axis=1, kind="stable")  # padding first, real tokens keep their order
    out = np.where(np.take_along_axis(mask, order, 1), np.take_along_axis(out, order, 1), pad_id)
    lengths = mask.sum(1).astype(np.int32)
  if out.shape[0] == 0 or lengths.min() == 0:
    raise GenerationError("every prompt needs at least one token (start it with BOS)")
  return out.astype(np.int32), lengths


def cache_size(config, prompt_len: int, max_new_tokens: int) -> int:
  """Cache slots: the whole sequence, or only `sliding_window` slots (rolling) when that is smaller."""
  total = prompt_len + max_new_tokens
  return min(total, config.sliding_window) if config.sliding_window else total


# ----------------------------------------------------------------------------------------------------
# The two jitted pieces

def head_logits(model, hidden):
  """Final-normed hidden [B, D] -> logits [B, V] float32 (only the positions we sample from)."""
  dt = model.dtype
  return jnp.einsum("bd,dv->bv", hidden.astype(dt), model.lm_head[...].astype(dt),
                    preferred_element_type=jnp.float32)


def _sampler(greedy: bool, options):
  """options: (temperature, top_k, top_p) as traced scalars; ignored when greedy."""
  if greedy:
    return functools.partial(sample_logits, temperature=0.0)
  temperature, top_k, top_p = options
  return functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _ahead_of_time(fn, args, static):
  """Compiles fn(*args, **static) now; returns a callable running it (args[0], the graphdef, is static)."""
  compiled = fn.lower(*args, **static).compile()
  run = functools.partial(compiled, *args[1:])
  run.compiled = compiled
  return run


def _options(temperature, top_k, top_p):
  return (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "size", "greedy", "pad_id", "chunk"))
def _prefill(graphdef, state, tokens, lengths, key, options, *, max_new_tokens, size, greedy, pad_id, chunk):
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape
  cols = jnp.arange(t, dtype=jnp.int32)[None]  # [1, T]
  seg = (cols >= t - lengths[:, None]).astype(jnp.int32)  # [B, T] 1 = real token (left padding)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)  # [B, T] positions count real tokens only
  cache = KVCache.for_model(model, b, size)
  # Chunked prefill bounds the activations; attention holds [B, H, chunk, slots + chunk] scores only
  # below attention_min_len keys (flash above: one block per head; see planner.py).
  for start in range(0, t, chunk or t):
    cols = slice(start, min(start + (chunk or t), t))
    out = model(tokens[:, cols], positions=pos[:, cols], segment_ids=seg[:, cols], cache=cache,
                return_hidden=True)
    cache = out.cache
  logits = head_logits(model, out.hidden[:, -1])  # [B, V]; the unused full logits are pruned by XLA
  first = _sampler(greedy, options)(logits, jax.random.fold_in(key, 0))
  buf = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
  buf = buf.at[:, t].set(first)
  return DecodeState(tokens=buf, cache=out.cache, last=first, lengths=lengths,
                     done=jnp.zeros((b,), bool), step=jnp.ones((), jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "pad_id", "callback"),
                   donate_argnames=("state",))
def _decode(graphdef, params, state: DecodeState, options, eos_id, *, greedy, pad_id, callback):
  model = nnx.merge(graphdef, params)
  sample = _sampler(greedy, options)
  b, width = state.tokens.shape
  max_new = width - state.cache.index  # cache.index == T after prefill, whatever the cache size

  def finish(s: DecodeState, token):
    """Record `token` as generated token number s.step; rows already done get pad_id."""
    done = s.done
    token = jnp.where(done, pad_id, token)
    done = done | (token == eos_id)  # eos_id -1 (none) never matches
    if callback is not None:
      io_callback(callback, None, s.step, token, ordered=True)
    return token, done

  def cond(s: DecodeState):
    return (s.step < max_new) & ~jnp.all(s.done)

  def body(s: DecodeState):
    pos = (s.lengths + s.step - 1)[:, None]  # [B, 1] position of the token being fed
    out = model(s.last[:, None], positions=pos, segment_ids=jnp.ones((b, 1), jnp.int32), cache=s.cache)
    token = sample(out.logits[:, -1], jax.random.fold_in(s.key, s.step))  # [B]
    token, done = finish(s, token)
    col = width - max_new + s.step
    tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, col))
    return s.replace(tokens=tokens, cache=out.cache, last=token, done=done, step=s.step + 1)

  # The first token came from the prefill: mark EOS rows and stream it before looping.
  first, done = finish(state.replace(step=jnp.zeros((), jnp.int32)), state.last)
  state = state.replace(done=done, last=first)
  return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------------------------------
# Public API

def prefill(model, tokens, max_new_tokens: int, *, prompt_mask=None, key=None, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0, pad_id: int = 0, chunk: int = 0,
            compile_only: bool = False) -> DecodeState:
  """Runs the prompt through the model into a fresh cache (in chunks of `chunk` tokens; 0 = all at
  once) and samples the first new token. compile_only: compile ahead of time, run nothing, and return a
  zero-argument callable that runs this very call (no retracing; `.compiled` is the XLA program)."""
  check_sampling(temperature, top_k, top_p, key)
  tokens, lengths = left_align(tokens, prompt_mask, pad_id)
  cfg = model.config
  if max_new_tokens < 1:
    raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  longest = int(lengths.max())
  if longest + max_new_tokens > cfg.max_positions:
    raise GenerationError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
                          f"{longest + max_new_tokens} exceeds the model's max_positions={cfg.max_positions}")
  if tokens.max() >= cfg.vocab_size or tokens.min() < 0:
    raise GenerationError(f"token ids must be in [0, {cfg.vocab_size}), got {tokens.min()}..{tokens.max()}")
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  args = (graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), key, _options(temperature, top_k, top_p))
  static = dict(max_new_tokens=max_new_tokens, size=cache_size(cfg, tokens.shape[1], max_new_tokens),
                greedy=temperature == 0, pad_id=pad_id, chunk=int(chunk))
  if compile_only:
    return _ahead_of_time(_prefill, args, static)
  return _prefill(*args, **static)


def decode(model, state: DecodeState, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: Optional[int] = None, pad_id: int = 0,
           callback: Optional[Callable[[jax.Array, jax.Array], None]] = None,
           compile_only: bool = False) -> DecodeState:
  """Generates the remaining tokens in one jitted while_loop. `callback(step, tokens [B])`, if given,
  is called on the host for every new token (in order) and is how text is streamed. `state` is
  donated: its cache buffer is reused (not with compile_only, which compiles ahead of time and runs
  nothing)."""
  graphdef, params = nnx.split(model)
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  args = (graphdef, params, state, _options(temperature, top_k, top_p), eos)
  static = dict(greedy=temperature == 0, pad_id=pad_id, callback=callback)
  if compile_only:
    return _ahead_of_time(_decode, args, static)
  return _decode(*args, **static)


def generate(model, tokens, max_new_tokens: int, temperature: float = 0.0, *, top_k: int = 0,
             top_p: float = 1.0, key=None, eos_id: Optional[int] = None, pad_id: int = 0,
             prompt_mask=None, callback=None, prefill_chunk: int = 0) -> jax.Array:
  """Prompt + continuation, int32 [B, T + max_new_tokens] (see the module docstring for the layout)."""
  options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  state = prefill(model, tokens, max_new_tokens, prompt_mask=prompt_mask, key=key, pad_id=pad_id,
                  chunk=prefill_chunk, **options)
  return decode(model, state, eos_id=eos_id, pad_id=pad_id, callback=callback, **options).tokens


def generated_lengths(out: jax.Array, prompt_len: int, eos_id: Optional[int]) -> np.ndarray:
  """[B] number of generated tokens per row, counting the EOS (all of them if no EOS)."""
  new = np.asarray(out)[:, prompt_len:]
  if eos_id is None:
    return np.full(new.shape[0], new.shape[1])
  hit = new == eos_id
  return np.where(hit.any(1), hit.argmax(1) + 1, new.shape[1])


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """Ragged id lists -> (tokens [B, T] left-padded, lengths [B]), numpy."""
  return left_align(list(prompts), None, pad_id)
