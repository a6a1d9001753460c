"""Full training step (forward + backward + AdamW + clipping) side by side with HF transformers + torch AdamW.

Same weights (a random HF MixtralForCausalLM mapped into our tree), same batch, same loss (next-token
cross-entropy + 0.02 x the load-balancing loss, HF's router_aux_loss_coef), same optimizer settings. For
each dispatch strategy (`config.run.train_dispatch`; the rest of the execution is the backend's training
default): median step time, tokens/s, the ratio to HF, and MFU against the float32 matmul
peak measured in the same run. Model FLOPs per token (PaLM convention): 6 x active parameters (attention,
router, top_k experts, LM head; not the embedding lookup) + 12 x L x H x Dh x T for attention scores.

    python experiments/bench_train.py [--dispatch capacity,dropless,dense] [--steps 5] [--no-hf]
                                      [--preset cpu|small|gpu_slice]

cpu: D=512 F=1792 L=8 E=8 k=2 H=8 K=2 V=32000, batch 8 x 256, float32 (the issue's configuration).
small: a quick smoke configuration. gpu_slice: 4 full-width layers (D4096/F14336), bfloat16 compute
(config.run.dtype), float32 master weights, batch 4 x 2048 (for accelerators; HF is skipped there).
Our step is the trainer's own: `train_step.build_setup(config)` then `make_train_step`, as `python run.py`
builds them.
Writes experiments/results/bench_train_<preset>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import roofline  # noqa: E402
from mixtral_jax import hostmem
from mixtral_jax.training import optim
from mixtral_jax.checkpoints import params as params_lib
from mixtral_jax.training import step as train_step  # noqa: E402
from mixtral_jax.config import model_config_from, to_dict as model_dict  # noqa: E402
from mixtral_jax.execution import Execution, to_dict as execution_dict  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PRESETS = {
    "cpu": dict(model=dict(vocab_size=32000, dim=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                           ffn_dim=1792, num_experts=8, top_k=2), batch=8, seq_len=256),
    "small": dict(model=dict(vocab_size=4096, dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                             ffn_dim=256, num_experts=8, top_k=2), batch=4, seq_len=128),
    "gpu_slice": dict(model=dict(vocab_size=32000, dim=4096, num_layers=4, num_heads=32, num_kv_heads=8,
                                 head_dim=128, ffn_dim=14336, num_experts=8, top_k=2),
                      run=dict(dtype="bfloat16"), batch=4, seq_len=2048),
}
AUX_COEF = 0.02  # HF Mixtral's router_aux_loss_coef


def model_flops_per_token(cfg, seq_len: int) -> float:
  attn = cfg.dim * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * cfg.dim
  experts = cfg.top_k * 3 * cfg.dim * cfg.ffn_dim
  active = cfg.num_layers * (attn + experts + cfg.dim * cfg.num_experts) + cfg.dim * cfg.vocab_size
  return 6 * active + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def train_config(steps: int) -> ml_collections.ConfigDict:
  from configs import base
  t = base.train_config()
  t.update(dict(steps=steps, learning_rate=1e-4, warmup_steps=0, schedule="constant", b1=0.9, b2=0.95,
                eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  t.aux_losses = ml_collections.ConfigDict({"load_balancing": AUX_COEF})
  return t


def make_batch(cfg, batch: int, seq_len: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
              segment_ids=np.ones((batch, seq_len), np.int32), loss_mask=np.ones((batch, seq_len), np.float32))


def time_steps(step_fn, steps: int) -> list:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step_fn()
    times.append(time.perf_counter() - start)
  return times


def jax_run(cfg, params, batch, steps: int, run: Execution = Execution()) -> dict:
  """Our train step, built as `python run.py` builds it: train_step.build_setup from a config holding the
  model (cfg), its execution (run: config.run) and the train section, then make_train_step. `params` (a
  canonical tree, e.g. HF's weights mapped into ours) replace the setup's initial weights; None keeps them
  (build_setup's seed-0 initialisation)."""
  config = ml_collections.ConfigDict(dict(seed=0, model=model_dict(cfg), run=execution_dict(run),
                                          train=train_config(steps)))
  setup = train_step.build_setup(config)
  if params is not None:
    setup = setup._replace(base=params)  # drops the random initial weights
  params = setup.base
  opt, schedule = optim.make_optimizer(config.train, params, num_experts=setup.cfg.num_experts)
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(opt.init)(params),
               rng=jax.random.PRNGKey(0), rest=setup.rest)
  step = train_step.make_train_step(setup, config.train, opt, schedule)
  batch = jax.device_put(batch)
  holder = {"state": state}
  resolved = execution_dict(setup.run)  # what ran: the trainer's resolved execution

  def one():
    holder["state"], metrics = step(holder["state"], None, batch)
    holder["loss"] = float(metrics["loss"])  # syncs

  start = time.perf_counter()
  one()
  compile_s = time.perf_counter() - start
  first_loss = holder["loss"]
  one()  # warm-up
  times = time_steps(one, steps)
  return dict(compile_s=compile_s, first_loss=first_loss, times=times, execution=resolved)


def hf_model_and_params(cfg, seed: int, experts_implementation):
  import torch
  import transformers
  torch.manual_seed(seed)
  kwargs = dict(params_lib.config_to_hf(cfg), router_aux_loss_coef=AUX_COEF, output_router_logits=True,
                attn_implementation="sdpa")
  if experts_implementation:
    kwargs["experts_implementation"] = experts_implementation
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs))
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  ours = params_lib.from_hf(state.__getitem__, list(state), cfg)
  return model, jax.tree.map(jnp.asarray, ours)


def hf_run(model, batch, steps: int, threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          foreach=True)
  tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
  targets = torch.as_tensor(batch["targets"], dtype=torch.long)
  holder = {}

  def one():
    out = model(input_ids=tokens, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets.reshape(-1))
    loss = ce + AUX_COEF * out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    holder["loss"] = float(ce)

  start = time.perf_counter()
  one()
  first = time.perf_counter() - start
  first_loss = holder["loss"]
  times = time_steps(one, steps)
  return dict(compile_s=first, first_loss=first_loss, times=times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--dispatch", default="capacity,dropless,dense")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--no-hf", action="store_true")
  parser.add_argument("--hf-experts", default="default,grouped_mm",
                      help="HF experts_implementation values to try; the fastest is the peer")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--host-memory", default="retain", choices=hostmem.POLICIES,
                      help="malloc policy for the whole process, so for HF and ours alike (mixtral_jax/hostmem.py)")
  parser.add_argument("--out", default="", help="results path without extension (default results/bench_train_PRESET)")
  args = parser.parse_args(argv)
  host_memory = hostmem.apply(args.host_memory)  # the policy in effect
  preset = PRESETS[args.preset]
  base_cfg = model_config_from({**preset["model"], "max_positions": max(4096, preset["seq_len"])})
  batch = make_batch(base_cfg, preset["batch"], preset["seq_len"])
  tokens = preset["batch"] * preset["seq_len"]
  flops = model_flops_per_token(base_cfg, preset["seq_len"]) * tokens
  load_before = os.getloadavg()[0]
  peak = roofline.measure()
  use_hf = not args.no_hf and jax.default_backend() == "cpu"
  rows, params, hf_model = [], None, None
  if use_hf:
    for impl in args.hf_experts.split(","):
      model, ours = hf_model_and_params(base_cfg, 0, None if impl == "default" else impl)
      params = ours if params is None else params
      result = hf_run(model, batch, args.steps, args.threads)
      rows.append(dict(name=f"HF transformers ({impl} experts) + torch AdamW", kind="hf", **result))
      hf_model = model
      print(f"{rows[-1]['name']}: median {np.median(result['times']):.3f}s/step", flush=True)
    del hf_model
  base_run = Execution(**preset.get("run", {}))
  for dispatch in args.dispatch.split(","):
    run = base_run.replace(train_dispatch=dispatch)
    # The step donates its state: each run gets its own copy of HF's weights (None: build_setup's own).
    result = jax_run(base_cfg, None if params is None else jax.tree.map(jnp.copy, params), batch, args.steps, run)
    rows.append(dict(name=f"mixtral_jax ({dispatch} dispatch)", kind="jax", dispatch=dispatch, **result))
    print(f"{rows[-1]['name']}: median {np.median(result['times']):.3f}s/step "
          f"(compile {result['compile_s']:.1f}s)", flush=True)

  hf_rows = [r for r in rows if r["kind"] == "hf"]
  hf_best = min((np.median(r["times"]) for r in hf_rows), default=None)
  for r in rows:
    median = float(np.median(r["times"]))
    r.update(median_s=median, tokens_per_s=tokens / median, model_gflops=flops / median / 1e9,
             mfu=flops / median / 1e9 / peak["matmul_gflops"], vs_hf=(hf_best / median) if hf_best else None)
  out = dict(preset=args.preset, model=preset["model"], batch=preset["batch"], seq_len=preset["seq_len"],
             model_gflop_per_step=flops / 1e9, roofline=peak, load_avg_before=load_before,
             load_avg_after=os.getloadavg()[0], steps=args.steps, host_memory=host_memory, rows=rows)
  stem = args.out or os.path.join(RESULTS, f"bench_train_{args.preset}")
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(out, f, indent=2, default=float)
  with open(stem + ".md", "w") as f:
    f.write(markdown(out))
  print(markdown(out))


def markdown(out: dict) -> str:
  peak = out["roofline"]
  lines = [
      f"# Train step: {out['preset']} preset, batch {out['batch']} x {out['seq_len']}",
      "",
      f"Model: {out['model']}. {out['model_gflop_per_step']:.1f} model GFLOP per step. Matmul peak measured in "
      f"this run: {peak['matmul_gflops']:.0f} GFLOP/s ({peak['device']}, {peak['cpu_count']} cores); load "
      f"average {out['load_avg_before']:.2f} before, {out['load_avg_after']:.2f} after. Median of "
      f"{out['steps']} steps after warm-up. Host memory policy for the whole process (HF and ours alike): "
      f"{out.get('host_memory', 'default')} (mixtral_jax/hostmem.py).",
      "",
      "| implementation | s/step | tokens/s | model GFLOP/s | MFU | vs HF | first step (compile) s | first loss |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in out["rows"]:
    vs = f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-"
    lines.append(f"| {r['name']} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {r['model_gflops']:.0f} | "
                 f"{r['mfu']:.0%} | {vs} | {r['compile_s']:.1f} | {r['first_loss']:.4f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
