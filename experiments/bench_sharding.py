"""Train-step time on 8 simulated CPU devices for each mesh, relative to one device, and the collective
volume per step read from the compiled HLO next to the all-to-all volume theory predicts.

    python experiments/bench_sharding.py            # ~5 minutes on 2 cores; writes experiments/results/

The 8 devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8) and share this machine's
cores, so a ratio > 1 is the cost of partitioning (collectives, padding, smaller matmuls), not a speedup a
real mesh would show. The one-device run of the same dispatch strategy in the same process is the peer; the
roofline (float32 matmul GFLOP/s, measured here too) is the ceiling.
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import report  # noqa: E402
from experiments.roofline import measure  # noqa: E402
from mixtral_jax import sharding  # noqa: E402
from mixtral_jax.dispatch import expert_capacity  # noqa: E402
from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.model import build  # noqa: E402

# Unrolled layers (scan_layers=False) so every collective appears once per layer in the HLO and can be summed.
CFG = ModelConfig(vocab_size=4096, dim=256, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32, ffn_dim=512,
                  num_experts=8, top_k=2, max_positions=256, capacity_factor=1.25, scan_layers=False).replace()
BATCH, SEQ = 16, 128
MESHES = {"data8": dict(data=8, fsdp=1), "fsdp8": dict(fsdp=8), "expert8": dict(expert=8, fsdp=1),
          "data2_expert4": dict(data=2, expert=4, fsdp=1), "fsdp4_expert2": dict(fsdp=4, expert=2),
          "tensor2_expert4": dict(tensor=2, expert=4, fsdp=1)}
DISPATCHES = ("ep_capacity", "ep_dropless")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1, "s8": 1, "u8": 1}
_COLLECTIVE = re.compile(r"= (.+?) (all-to-all|all-reduce|all-gather|reduce-scatter|collective-permute)(-start)?\(")


def collective_bytes(hlo: str) -> dict:
  """Per-device result bytes of every collective in post-optimisation HLO, by kind. All-to-alls are split
  into the expert-parallel ones (inside shard_map; `(int)`: dropless counts/offsets) and those GSPMD adds by
  itself (e.g. the embedding gradient's scatter-add)."""
  out: dict = {}
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      size = math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 4)
      kind = m.group(2)
      if kind == "all-to-all":
        kind = ("ep all-to-all" if "shard_map" in line else "gspmd all-to-all") + (
            "" if dtype.startswith(("f", "bf")) else " (int)")
      out[kind] = out.get(kind, 0) + size
  return out


def model_flops_per_token(cfg) -> float:
  """Useful training FLOPs per token (3x forward: forward, and backward for inputs and weights): the matmuls
  a token really uses (k experts, not padding) plus full T x T attention scores, as this model computes."""
  d, h, kv, dh = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = 2 * d * dh * (2 * h + 2 * kv) + 2 * d * cfg.num_experts + cfg.top_k * 6 * d * cfg.ffn_dim
  per_layer += 4 * SEQ * h * dh  # scores and probs @ values over the whole sequence
  return 3 * (cfg.num_layers * per_layer + 2 * d * cfg.vocab_size)


def theory_all_to_all(dispatch: str, ep: int, tokens_per_shard: int) -> dict:
  """All-to-all bytes per device per step in theory (float32): 2 exchanges forward, their 2 transposes
  backward, per layer. `padded` is what this implementation moves on CPU; `ragged` what ragged_all_to_all
  moves (every assignment row once, data-dependent on GPU/TPU) -- both include rows that stay local."""
  if ep == 1:
    return {"padded": 0, "ragged": 0}
  n, k, e, d = tokens_per_shard, CFG.top_k, CFG.num_experts, CFG.dim
  per_exchange = {"ep_capacity": e * expert_capacity(n, e, k, CFG.capacity_factor) * d,
                  "ep_dropless": ep * n * k * d}[dispatch]
  return {"padded": 4 * CFG.num_layers * per_exchange * 4, "ragged": 4 * CFG.num_layers * n * k * d * 4}


def make_step(graphdef):
  def loss(state, tokens):
    logits = nnx.merge(graphdef, state)(tokens, train=True).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

  def step(state, tokens):  # plain SGD: the optimizer is not what is being measured
    value, grads = jax.value_and_grad(loss)(state, tokens)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, state, grads), value
  return jax.jit(step, donate_argnums=0)


def time_step(step, state, tokens, repeats=5):
  state, _ = step(state, tokens)  # warm up (compiled already)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, loss = step(state, tokens)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  return float(np.min(times))  # best of `repeats`: other jobs share these cores (as experiments/roofline.py)


def run_case(dispatch, mesh_name=None):
  cfg = CFG.replace(dispatch=dispatch)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size), np.int32)
  if mesh_name is None:
    model = jax.device_put(build(cfg, 0), jax.devices()[0])
    graphdef, state = nnx.split(model)
    step = make_step(graphdef)
    compiled = step.lower(state, tokens).compile()
    seconds = time_step(step, state, jnp.asarray(tokens))
    shape = {}
  else:
    mesh_cfg = sharding.mesh_config_from(MESHES[mesh_name])
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
    with sharding.use_mesh(mesh, rules):
      model = sharding.init_model(cfg, 0, mesh, rules)
      graphdef, state = nnx.split(model)
      step = make_step(graphdef)
      batch = sharding.put_batch(tokens, mesh, rules)
      compiled = step.lower(state, batch).compile()
      seconds = time_step(step, state, batch)
    shape = dict(mesh.shape)
  flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  ep = shape.get("expert", 1)
  shards = math.prod(shape.get(a, 1) for a in ("data", "fsdp", "expert"))
  return dict(mesh=mesh_name or "1 device", dispatch=dispatch, step_ms=seconds * 1e3, hlo_flops_per_device=flops,
              collectives=collective_bytes(compiled.as_text()),
              theory=theory_all_to_all(dispatch, ep, BATCH * SEQ // shards))


def main():
  out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  roof = measure()
  rows = []
  for dispatch in DISPATCHES:
    base = run_case(dispatch)
    rows.append(base)
    print(json.dumps(base), flush=True)
    for name in MESHES:
      row = run_case(dispatch, name)
      rows.append(row)
      print(json.dumps(row), flush=True)
  step_flops = model_flops_per_token(CFG) * BATCH * SEQ
  lines = [f"# Train step on 8 simulated CPU devices vs 1 device\n",
           f"Model D={CFG.dim} F={CFG.ffn_dim} E={CFG.num_experts} top-{CFG.top_k} L={CFG.num_layers} "
           f"V={CFG.vocab_size}, batch {BATCH}x{SEQ} tokens, float32, capacity_factor {CFG.capacity_factor}, "
           f"SGD step (forward + backward + update). Machine: {roof['cpu_count']} cores, "
           f"matmul roofline {roof['matmul_gflops']:.1f} GFLOP/s, load {roof['load_avg_1m']:.2f} at start.\n",
           "The 8 devices share the machine's cores: ratios show partitioning overhead, not speedup. "
           f"GFLOP/s = useful model FLOPs ({step_flops / 1e9:.1f} GFLOP per step: active experts only) / step "
           "time; `XLA GFLOP` = what the compiled program computes per device (padding, and on CPU ragged_dot's "
           "dense lowering, included). Collective columns are per device per step, from the compiled HLO; "
           "`EP a2a` are the expert-parallel all-to-alls, `theory padded` what this implementation must move "
           "(fixed-size buffers), `theory ragged` what ragged_all_to_all moves on GPU/TPU (each routed row "
           "once); `GSPMD a2a` is resharding XLA adds itself (the embedding gradient).\n",
           "| dispatch | mesh | step ms (best of 5) | vs 1 device | GFLOP/s | % roofline | XLA GFLOP/device | EP a2a MB | "
           "theory padded MB | theory ragged MB | EP a2a int KB | GSPMD a2a MB | all-reduce MB | all-gather MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    base = next(b for b in rows if b["dispatch"] == r["dispatch"] and b["mesh"] == "1 device")
    gflops = step_flops / (r["step_ms"] / 1e3) / 1e9
    c = r["collectives"]
    lines.append(f"| {r['dispatch']} | {r['mesh']} | {r['step_ms']:.0f} | {r['step_ms'] / base['step_ms']:.2f}x | "
                 f"{gflops:.1f} | {100 * gflops / roof['matmul_gflops']:.0f}% | "
                 f"{r['hlo_flops_per_device'] / 1e9:.1f} | {c.get('ep all-to-all', 0) / 1e6:.2f} | "
                 f"{r['theory']['padded'] / 1e6:.2f} | {r['theory']['ragged'] / 1e6:.2f} | "
                 f"{c.get('ep all-to-all (int)', 0) / 1e3:.2f} | {c.get('gspmd all-to-all', 0) / 1e6:.2f} | "
                 f"{c.get('all-reduce', 0) / 1e6:.2f} | {c.get('all-gather', 0) / 1e6:.2f} |")
  lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.2f} (other jobs share these cores: step times "
               "are noisy; the HLO columns are exact).")
  report.write_results(os.path.join(out_dir, "bench_sharding"), {
      "roofline": roof, "rows": rows, "model_flops_per_step": step_flops,
      "config": dict(batch=BATCH, seq=SEQ, model=str(CFG))}, lines)


if __name__ == "__main__":
  main()
