"""Train-step time on 8 simulated CPU devices for each mesh, relative to one device, and the collective
volume per step read from the compiled HLO next to the all-to-all volume theory predicts.

    python experiments/bench_sharding.py            # ~5 minutes on 2 cores; writes experiments/results/
    python experiments/bench_sharding.py --quick --out DIR   # 1 device + expert8 per dispatch, 1 repeat

The 8 devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8) and share this machine's
cores, so a ratio > 1 is the cost of partitioning (collectives, padding, smaller matmuls), not a speedup a
real mesh would show. The one-device run of the same dispatch strategy in the same process is the peer; the
roofline (float32 matmul GFLOP/s, measured here too) is the ceiling.

The model runs as the trainer runs it: the stacked layout (one lax.scan over the layers; the one a mesh
splits) with `Execution.everywhere(dispatch)`. A scanned layer is one while-loop body in the compiled HLO,
so the HLO columns count every computation as often as it runs (`hlo_counts`: while bodies times their
known trip count), not once per appearance; XLA's own cost_analysis counts a loop body once.
"""
import argparse
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
from mixtral_jax.parallel import placement, sharding  # noqa: E402
from mixtral_jax.moe.dispatch import expert_capacity  # noqa: E402
from mixtral_jax.config import ModelConfig  # noqa: E402
from mixtral_jax.execution import Execution, to_dict  # noqa: E402
from mixtral_jax.model import build  # noqa: E402

CFG = ModelConfig(vocab_size=4096, dim=256, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32, ffn_dim=512,
                  num_experts=8, top_k=2, max_positions=256)
CAPACITY_FACTOR = 1.25
BATCH, SEQ = 16, 128
MESHES = {"data8": dict(data=8, fsdp=1), "fsdp8": dict(fsdp=8), "expert8": dict(expert=8, fsdp=1),
          "data2_expert4": dict(data=2, expert=4, fsdp=1), "fsdp4_expert2": dict(fsdp=4, expert=2),
          "tensor2_expert4": dict(tensor=2, expert=4, fsdp=1)}
DISPATCHES = ("ep_capacity", "ep_dropless")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1, "s8": 1, "u8": 1}
_COLLECTIVE = re.compile(r"= (.+?) (all-to-all|all-reduce|all-gather|reduce-scatter|collective-permute)(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLED = re.compile(r"(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
                     r"|(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _dims(text: str) -> list:
  return [int(d) for d in text.split(",") if d]


def _computations(hlo: str):
  """{name: (parameter shapes {name: (dtype, dims)}, instruction lines)} and the entry's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      params = {p: (t, _dims(d)) for p, t, d in re.findall(r"([\w.\-]+): (\w+)\[([\d,]*)\]", m.group(2))}
      comps[current] = (params, [])
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      comps[current][1].append(line)
  return comps, entry


def _collective(line: str, sizes: dict) -> None:
  """Adds one instruction's collective result bytes (if it is one) to sizes, by kind."""
  c = _COLLECTIVE.search(line)
  if not c:
    return
  for dtype, dims in _SHAPE.findall(c.group(1)):
    kind = c.group(2)
    if kind == "all-to-all":
      kind = ("ep all-to-all" if "shard_map" in line else "gspmd all-to-all") + (
          "" if dtype.startswith(("f", "bf")) else " (int)")
    sizes[kind] = sizes.get(kind, 0) + math.prod(_dims(dims)) * _BYTES.get(dtype, 4)


def hlo_counts(hlo: str) -> tuple:
  """(collective bytes by kind, matmul FLOPs) per device per call of post-optimisation HLO, every
  computation counted as often as it runs: a while loop's body and condition times its known trip count
  (a scanned layer once per layer), fusions and calls once, a conditional as its costliest branch (what
  XLA's cost analysis does). Collectives: result bytes; all-to-alls are split into the expert-parallel ones
  (inside shard_map; `(int)`: dropless counts/offsets) and those GSPMD adds by itself (e.g. the embedding
  gradient's scatter-add). FLOPs: 2 x output elements x contracted size of every dot."""
  comps, entry = _computations(hlo)
  memo: dict = {}

  def cost(name):  # (collectives, flops) of one run of computation `name`
    if name in memo:
      return memo[name]
    params, lines = comps[name]
    shapes = {p: dims for p, (_, dims) in params.items()}
    sizes, flops = {}, 0
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      result = _SHAPE.match(m.group(2).lstrip("("))
      shapes[m.group(1)] = _dims(result.group(2)) if result else []
      if m.group(3) == "dot":
        lhs = re.match(r"%([\w.\-]+)", m.group(4)).group(1)
        contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1))
        flops += 2 * math.prod(shapes[m.group(1)]) * math.prod(shapes[lhs][i] for i in contracting)
      _collective(line, sizes)
      trip = _TRIP_COUNT.search(line)
      callees, branches = [], []  # (computation, times it runs); a conditional's branches
      for c in _CALLED.finditer(line):
        kind, names = (c.group(1), [c.group(2)]) if c.group(1) else (
            c.group(3), [t.strip().lstrip("%") for t in c.group(4).split(",")])
        if kind in ("true_computation", "false_computation", "branch_computations"):
          branches += names
        else:  # a while loop's body and condition run trip-count times, anything else once
          callees += [(n, int(trip.group(1)) if kind in ("body", "condition") and trip else 1) for n in names]
      runs = [(cost(n), times) for n, times in callees if n in comps]
      options = [cost(n) for n in branches if n in comps]
      if options:
        runs.append((max(options, key=lambda o: o[1]), 1))
      for (sub_sizes, sub_flops), times in runs:
        flops += times * sub_flops
        for kind, size in sub_sizes.items():
          sizes[kind] = sizes.get(kind, 0) + times * size
    memo[name] = (sizes, flops)
    return memo[name]

  return cost(entry)


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
  per_exchange = {"ep_capacity": e * expert_capacity(n, e, k, CAPACITY_FACTOR) * d,
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


def time_step(step, state, tokens, repeats):
  state, _ = step(state, tokens)  # warm up (compiled already)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, loss = step(state, tokens)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  return float(np.min(times))  # best of `repeats`: other jobs share these cores (as experiments/roofline.py)


def execution_for(dispatch: str) -> Execution:
  """The strategy under test for every phase, in the stacked layout a mesh splits (the trainer's)."""
  return Execution.everywhere(dispatch, capacity_factor=CAPACITY_FACTOR, layout="stacked")


def run_case(dispatch, mesh_name=None, repeats=5):
  run = execution_for(dispatch)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, CFG.vocab_size), np.int32)
  if mesh_name is None:
    model = jax.device_put(build(CFG, 0, run), jax.devices()[0])
    graphdef, state = nnx.split(model)
    step = make_step(graphdef)
    compiled = step.lower(state, tokens).compile()
    seconds = time_step(step, state, jnp.asarray(tokens), repeats)
    shape = {}
  else:
    mesh_cfg = sharding.mesh_config_from(MESHES[mesh_name])
    mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules_dict
    with sharding.use_mesh(mesh, rules):
      model = placement.init_model(CFG, 0, mesh, rules, run)
      graphdef, state = nnx.split(model)
      step = make_step(graphdef)
      batch = sharding.put_batch(tokens, mesh, rules)
      compiled = step.lower(state, batch).compile()
      seconds = time_step(step, state, batch, repeats)
    shape = dict(mesh.shape)
  collectives, flops = hlo_counts(compiled.as_text())
  ep = shape.get("expert", 1)
  shards = math.prod(shape.get(a, 1) for a in ("data", "fsdp", "expert"))
  return dict(mesh=mesh_name or "1 device", dispatch=dispatch, step_ms=seconds * 1e3, hlo_flops_per_device=flops,
              collectives=collectives, theory=theory_all_to_all(dispatch, ep, BATCH * SEQ // shards),
              execution=to_dict(model.execution))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="1 device and expert8 per dispatch, 1 timed step")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                "bench_sharding"), help="results path without extension")
  args = ap.parse_args(argv)
  meshes, repeats = (["expert8"], 1) if args.quick else (list(MESHES), 5)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  roof = measure(quick=args.quick)
  rows = []
  for dispatch in DISPATCHES:
    base = run_case(dispatch, repeats=repeats)
    rows.append(base)
    print(json.dumps(base), flush=True)
    for name in meshes:
      row = run_case(dispatch, name, repeats=repeats)
      rows.append(row)
      print(json.dumps(row), flush=True)
  step_flops = model_flops_per_token(CFG) * BATCH * SEQ
  lines = [f"# Train step on 8 simulated CPU devices vs 1 device\n",
           f"Model D={CFG.dim} F={CFG.ffn_dim} E={CFG.num_experts} top-{CFG.top_k} L={CFG.num_layers} "
           f"V={CFG.vocab_size}, batch {BATCH}x{SEQ} tokens, float32, capacity_factor {CAPACITY_FACTOR}, stacked "
           f"layers (lax.scan), SGD step (forward + backward + update). Machine: {roof['cpu_count']} cores, "
           f"matmul roofline {roof['matmul_gflops']:.1f} GFLOP/s, load {roof['load_avg_1m']:.2f} at start.\n",
           "The 8 devices share the machine's cores: ratios show partitioning overhead, not speedup. "
           f"GFLOP/s = useful model FLOPs ({step_flops / 1e9:.1f} GFLOP per step: active experts only) / step "
           "time; `XLA GFLOP` = the matmul FLOPs the compiled program computes per device (padding, and on CPU "
           "ragged_dot's dense lowering, included). Collective columns are per device per step, from the compiled "
           "HLO; both count each computation as often as it runs (a scanned layer once per layer); "
           "`EP a2a` are the expert-parallel all-to-alls, `theory padded` what this implementation must move "
           "(fixed-size buffers), `theory ragged` what ragged_all_to_all moves on GPU/TPU (each routed row "
           "once); `GSPMD a2a` is resharding XLA adds itself (the embedding gradient).\n",
           f"| dispatch | mesh | step ms (best of {repeats}) | vs 1 device | GFLOP/s | % roofline | XLA GFLOP/device | "
           "EP a2a MB | theory padded MB | theory ragged MB | EP a2a int KB | GSPMD a2a MB | all-reduce MB | "
           "all-gather MB |",
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
  report.write_results(args.out, {
      "roofline": roof, "rows": rows, "model_flops_per_step": step_flops, "quick": args.quick,
      "config": dict(batch=BATCH, seq=SEQ, model=str(CFG), capacity_factor=CAPACITY_FACTOR)}, lines)


if __name__ == "__main__":
  main()
