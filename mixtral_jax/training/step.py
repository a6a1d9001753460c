"""The jitted pieces of training: the model to train (`build_setup`), the loss, `make_train_step`,
`make_eval_step` and a greedy sample. `train.py` runs them in its loop (data, checkpoints, logging).

Everything here is a pure function of pytrees: the train state is a dict (`step`, `params` = the trainable
tree, `opt_state`, `rng`, `rest` = non-parameter model state) and `Setup` holds what does not change.
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mixtral_jax.training import lora
from mixtral_jax.config import ConfigError, ModelConfig, model_config_from
from mixtral_jax.execution import Execution, execution_from, resolve
from mixtral_jax.moe.adapted import takes_adapters
from mixtral_jax.moe.losses import LOSSES
from mixtral_jax.moe.metrics import moe_metrics
from mixtral_jax.model import abstract_model, init_state, subtree
from mixtral_jax.moe.routers import ROUTERS
from mixtral_jax.training.run_checkpoints import load_pretrained

# Model fields a fine-tuning run may change on a loaded checkpoint: training options of the router, not
# its shape. (How the model runs -- dispatch, remat, dtype, layout -- is config.run, never stored.)
TRAINING_FIELDS = ("router_jitter", "router_logits_cap")
# How LoRA's expert adapters run in training and evaluation forwards (Setup.lora_experts):
#   grouped  AdaptedExperts through the dispatch's own grouped matmul: x W_e + s (x A_e) B_e on routed rows
#   merged   W + s A B merged densely per expert each step (an [L, E, D, F] delta): for dispatch strategies
#            that cannot take AdaptedExperts (expert-parallel shard_map), and the benchmarks' reference
LORA_EXPERTS = ("grouped", "merged")


class Setup(NamedTuple):
  cfg: ModelConfig
  graphdef: Any             # of the stacked model running `run`
  run: Execution
  base: Any                 # every parameter (pure dict): the frozen base under LoRA, else the initial weights
  rest: Any                 # non-parameter model state (pure dict; {} for the stock routers)
  lora: Optional[dict]      # {"rank", "alpha", "targets"} or None for full training
  lora_experts: str = "grouped"  # LORA_EXPERTS: how expert adapters run (decided once, from the dispatch)


def build_setup(config) -> Setup:
  """The model to train: fresh from config.model, or config.checkpoint's weights for fine-tuning."""
  rank = config.train.lora.rank
  if "checkpoint" in config and config.checkpoint is None:
    raise ConfigError("config.checkpoint is required: --config.checkpoint=DIR (the weights to fine-tune)")
  if config.get("checkpoint"):
    # Full fine-tuning keeps float32 master weights; a LoRA base stays in its stored dtype.
    cfg, params = load_pretrained(config.checkpoint, dtype=None if rank else "float32")
    cfg = cfg.replace(**{f: config.model[f] for f in TRAINING_FIELDS if f in config.model})
  else:
    cfg, params = model_config_from(config.model), None
  if not rank:
    cfg = cfg.replace(param_dtype="float32")  # float32 master weights; compute dtype is config.run.dtype
  run = execution_from(config.get("run"))
  resolved = resolve(run, purpose="train", param_dtype=cfg.param_dtype)
  if run.prefill_dispatch == "auto":  # held-out evaluation during training runs the training dispatch
    resolved = resolved.replace(prefill_dispatch=resolved.train_dispatch)
  run = resolved
  if run.layout != "stacked":
    raise ConfigError(f"config.run.layout={run.layout!r}: training runs the stacked layout (lax.scan over layers)")
  graphdef, _, _ = nnx.split(abstract_model(cfg, run), nnx.Param, ...)
  state = init_state(cfg, config.seed)
  base = params if params is not None else subtree(state, nnx.to_pure_dict(nnx.state(abstract_model(cfg, run),
                                                                                   nnx.Param)))
  rest = subtree(state, nnx.to_pure_dict(nnx.state(abstract_model(cfg, run), nnx.Not(nnx.Param))))
  spec = None
  if rank:
    spec = dict(rank=int(rank), alpha=float(config.train.lora.alpha),
                targets=lora.parse_targets(config.train.lora.targets))
    if "router" in spec["targets"] and config.train.get("freeze_router"):
      raise ConfigError("config.train.freeze_router=True contradicts the LoRA target 'router' in "
                        "config.train.lora.targets (which trains the router); drop one of them")
  # Evaluation runs the training dispatch (above), so one decision covers both forwards.
  experts = "grouped" if takes_adapters(run.train_dispatch) else "merged"
  return Setup(cfg, graphdef, run, base, rest, spec, experts)


def next_token_loss(logits, targets, mask):
  """Summed next-token cross-entropy over the mask, float32: logits [B, T, V], targets/mask [B, T]."""
  logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
  return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def effective_params(setup: Setup, trainable, base):
  """The trained weights as plain arrays (export, sampling): the trainable tree itself, or base + LoRA
  updates merged densely."""
  if setup.lora is None:
    return trainable
  return lora.merge(base, trainable, alpha=setup.lora["alpha"], rank=setup.lora["rank"])


def model_params(setup: Setup, trainable, base):
  """What training and evaluation forwards run with: the trainable tree itself, or base with LoRA applied
  (lora.apply: expert adapters on the routed rows, attention merged), or merged densely when
  setup.lora_experts == "merged"."""
  if setup.lora is None:
    return trainable
  if setup.lora_experts not in LORA_EXPERTS:
    raise ConfigError(f"Setup.lora_experts={setup.lora_experts!r} is not one of {', '.join(LORA_EXPERTS)}")
  combine = lora.apply if setup.lora_experts == "grouped" else lora.merge
  return combine(base, trainable, alpha=setup.lora["alpha"], rank=setup.lora["rank"])


def forward(setup: Setup, trainable, base, rest, batch, *, train: bool, key=None):
  model = nnx.merge(setup.graphdef, model_params(setup, trainable, base), rest)
  return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
               train=train, key=key)


def router_state_update(setup: Setup):
  """HOOK for routers with non-parameter state, updated once per step outside the gradient.

  Returns fn(rest, router, mask, step) -> rest, where router is the step's RouterOutput (leaves
  [L, B, T, ...]) and mask [B, T] marks real tokens. aux_free_bias (DeepSeek-V3's balancing bias) uses
  `routers_extra.aux_free_bias_update`; any other router class may define
  `update_state(state, *, router, mask, step) -> state` (state: its non-Param variables as a pure dict of
  [L, ...] arrays). Routers whose extra state is constant (hash tables) keep it unchanged.
  """
  router_state = setup.rest.get("layers", {}).get("moe", {}).get("router")
  router_cls = ROUTERS.get(setup.cfg.router)
  update = getattr(router_cls, "update_state", None)
  if router_state and setup.cfg.router == "aux_free_bias":
    from mixtral_jax.moe.routers_extra import aux_free_bias_update
    rate = setup.cfg.router_kwargs.get("bias_rate",
                                       inspect.signature(router_cls.__init__).parameters["bias_rate"].default)

    def update(state, *, router, mask, step):
      return {**state, "bias": aux_free_bias_update(state["bias"], router, rate=rate, mask=mask)}
  if not router_state or update is None:
    return lambda rest, router, mask, step: rest

  def apply(rest, router, mask, step):
    rest = jax.tree.map(lambda x: x, rest)  # fresh containers; leaves shared
    moe = rest["layers"]["moe"]
    moe["router"] = update(moe["router"], router=jax.lax.stop_gradient(router), mask=mask, step=step)
    return rest
  return apply


def make_train_step(setup: Setup, train_cfg, optimizer, schedule):
  cfg = setup.cfg
  weights = {name: float(w) for name, w in train_cfg.aux_losses.items()}  # weight 0: logged, not trained
  accum = train_cfg.grad_accum
  update_router_state = router_state_update(setup)

  def train_step(state, base, batch):
    key = jax.random.fold_in(state["rng"], state["step"])
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)  # [A, B, T]

    def loss_fn(trainable, mb, micro_key):
      out = forward(setup, trainable, base, state["rest"], mb, train=True, key=micro_key)
      nll, _ = next_token_loss(out.logits, mb["targets"], mb["loss_mask"])
      routed = mb["segment_ids"] > 0  # every real token is routed, prompt tokens included
      aux = {name: LOSSES.get(name)(out.router, mask=routed, num_experts=cfg.num_experts, top_k=cfg.top_k)
             for name in weights}
      # Cross-entropy is normalised by the whole batch's tokens, so accumulation equals one big batch.
      loss = nll / total_tokens + sum(w * aux[name] for name, w in weights.items() if w) / accum
      return loss, (nll, aux, moe_metrics(out.router, out.moe_stats, routed), out.router)

    def accumulate(grads, xs):
      mb, micro_key = xs
      (_, extras), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], mb, micro_key)
      return jax.tree.map(jnp.add, grads, g), extras

    micro_keys = jax.random.split(key, accum)
    if accum == 1:  # no zero-filled gradient tree to add into (a full pass over the parameters' size)
      (_, extras), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, micro_keys[0])
      nll, aux, moe, router = jax.tree.map(lambda x: x[None], extras)  # [1, ...] as the scan stacks them
    else:
      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      grads, (nll, aux, moe, router) = jax.lax.scan(accumulate, zeros, (micro, micro_keys))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    moe = jax.tree.map(lambda x: jnp.mean(x, axis=0), moe)  # [L] / [L, E] averaged over microbatches
    # The whole step's routing: [A, L, B/A, T, ...] -> [L, B, T, ...] (microbatches back into the batch).
    router = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:]), router)
    rest = update_router_state(state["rest"], router, batch["segment_ids"] > 0, state["step"])
    metrics = {"loss": jnp.sum(nll) / total_tokens, "grad_norm": optax.global_norm(grads),
               "update_norm": optax.global_norm(updates), "learning_rate": schedule(state["step"]),
               "tokens": total_tokens, **{f"aux/{name}": jnp.mean(v) for name, v in aux.items()}, **moe}
    new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state, rng=state["rng"], rest=rest)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(setup: Setup):
  def eval_step(trainable, base, rest, batch):
    out = forward(setup, trainable, base, rest, batch, train=False)
    return next_token_loss(out.logits, batch["targets"], batch["loss_mask"])
  return jax.jit(eval_step)


def evaluate(eval_step, state, base, batches) -> float:
  """Held-out cross-entropy (nats per target token) over fixed batches."""
  nll = count = 0.0
  for batch in batches:
    n, c = eval_step(state["params"], base, state["rest"], batch)
    nll, count = nll + float(n), count + float(c)
  return nll / max(count, 1.0)


def greedy_sample(setup: Setup, params, rest, tokenizer, prompt: str, num_tokens: int) -> str:
  """A greedy continuation of `prompt` through sampling.generate (the one generation loop), with the
  trained weights in the backend's inference execution."""
  from mixtral_jax.inference import sampling
  from mixtral_jax.model import abstract_model, merge_trees, with_state
  model = with_state(abstract_model(setup.cfg), merge_trees(params, rest))
  ids = tokenizer.encode(prompt, bos=True)
  eos = tokenizer.eos_id
  out = sampling.generate(model, [ids], num_tokens, eos_id=eos)
  generated = [int(t) for t in out[0, len(ids):]]
  if eos in generated:
    generated = generated[:generated.index(eos) + 1]
  return tokenizer.decode(ids[1:] + generated)
