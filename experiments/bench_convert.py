"""Conversion at full width: peak memory and throughput of `python -m mixtral_jax.convert` on a synthetic
Mixtral checkpoint with the real layer sizes (D=4096, F=14336, 32/8 heads, 8 experts, vocab 32000) but
2 layers, in bfloat16 and HF's sharded legacy layout (what the Hub holds).

    python experiments/bench_convert.py [--workdir /tmp/bench_convert] [--layers 2] [--skip-peer]

Measured, each in its own process (peak RSS from wait4): HF -> Orbax (bf16), HF -> Orbax widened to
float32, Orbax -> HF (--to-hf), and the peer: transformers' from_pretrained + save_pretrained of the same
weights. The round trip is checked bit for bit (every tensor of the --to-hf output equals the source).
Ceilings measured in the same run: memory read GB/s (experiments.roofline) and sequential disk
write/read MB/s of a file the size of one shard. Writes experiments/results/bench_convert.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixtral_jax.checkpoints import formats  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2)


def synthetic_tensors(layers: int):
  """(name, shape) of an HF legacy Mixtral checkpoint."""
  v, d, f, h, k, dh, e = (SIZES[n] for n in ("vocab_size", "hidden_size", "intermediate_size",
                                              "num_attention_heads", "num_key_value_heads", "head_dim",
                                              "num_local_experts"))
  out = [("model.embed_tokens.weight", (v, d))]
  for i in range(layers):
    p = f"model.layers.{i}."
    out += [(p + "self_attn.q_proj.weight", (h * dh, d)), (p + "self_attn.k_proj.weight", (k * dh, d)),
            (p + "self_attn.v_proj.weight", (k * dh, d)), (p + "self_attn.o_proj.weight", (d, h * dh)),
            (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
            (p + "block_sparse_moe.gate.weight", (e, d))]
    for j in range(e):
      out += [(f"{p}block_sparse_moe.experts.{j}.w1.weight", (f, d)),
              (f"{p}block_sparse_moe.experts.{j}.w2.weight", (d, f)),
              (f"{p}block_sparse_moe.experts.{j}.w3.weight", (f, d))]
  return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_synthetic(src: Path, layers: int, shard_bytes: int) -> int:
  """Streams random bf16 tensors (N(0, 0.02), norms near 1) into sharded safetensors + index."""
  src.mkdir(parents=True)
  rng = np.random.default_rng(0)
  specs = [(n, s, BF16) for n, s in synthetic_tensors(layers)]
  shards = formats.plan_shards(specs, shard_bytes)
  weight_map = {}
  for s, members in enumerate(shards):
    name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
    chosen = [specs[i] for i in members]
    arrays = ((rng.standard_normal(shape, np.float32) * (0.1 if len(shape) == 1 else 0.02)
               + (1.0 if len(shape) == 1 else 0.0)).astype(BF16) for _, shape, _ in chosen)
    formats.write_safetensors(src / name, chosen, arrays, metadata={"format": "pt"})
    weight_map.update({n: name for n, _, _ in chosen})
  total = sum(int(np.prod(s)) * 2 for _, s, _ in specs)
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}))
  config = dict(SIZES, architectures=["MixtralForCausalLM"], model_type="mixtral", num_hidden_layers=layers,
                rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, max_position_embeddings=32768,
                tie_word_embeddings=False, hidden_act="silu", dtype="bfloat16")
  (src / "config.json").write_text(json.dumps(config, indent=2))
  return total


def measured(cmd) -> dict:
  """Runs cmd in its own process; wall seconds, its peak RSS (GB, via a wrapper's RUSAGE_CHILDREN), stdout."""
  wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", wrapper, *map(str, cmd)], capture_output=True, text=True,
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
  rss = int(re.search(r"MAXRSS_KB (\d+)", proc.stdout).group(1)) / 1e6
  return {"wall_s": wall, "rss_gb": rss, "stdout": re.sub(r"\s*MAXRSS_KB \d+", "", proc.stdout).strip()}


def converter_seconds(stdout: str) -> float:
  m = re.search(r" in ([\d.]+) s", stdout)
  return float(m.group(1)) if m else float("nan")


def disk_gbps(path: Path, nbytes: int) -> dict:
  """Sequential write (with fsync) and re-read of one file of nbytes: the disk ceiling here."""
  block = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8)
  t0 = time.perf_counter()
  with open(path, "wb") as f:
    for _ in range(max(1, nbytes // block.size)):
      f.write(block)
    f.flush()
    os.fsync(f.fileno())
  write = time.perf_counter() - t0
  t0 = time.perf_counter()
  with open(path, "rb") as f:
    while f.readinto(block):
      pass
  read = time.perf_counter() - t0
  size = path.stat().st_size
  path.unlink()
  return {"disk_write_mbps": size / write / 1e6, "disk_read_mbps": size / read / 1e6}


def verify_round_trip(src: Path, back: Path) -> int:
  """Every tensor of the --to-hf output equals the source, bit for bit; returns the count."""
  a = formats.safetensors_reader([], src / "model.safetensors.index.json")
  b = formats.safetensors_reader([], back / "model.safetensors.index.json")
  assert sorted(a.names()) == sorted(b.names())
  for name in a.names():
    x, y = a.read(name), b.read(name)
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint16), y.view(np.uint16)), name
  return len(a.names())


PEER = """
import sys, torch, transformers
m = transformers.MixtralForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], max_shard_size="2GB")
"""


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", default="/tmp/bench_convert")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--skip-peer", action="store_true")
  ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_convert"))
  args = ap.parse_args()
  work = Path(args.workdir)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  from experiments import roofline
  result = {"machine": roofline.measure(), "load_avg_start": os.getloadavg()}
  result["machine"].update(disk_gbps(work / "disk.bin", 2 << 30))
  src = work / "hf_src"
  t0 = time.perf_counter()
  total = write_synthetic(src, args.layers, shard_bytes=2 << 30)
  result["source"] = {"layers": args.layers, **SIZES, "bytes": total, "files": len(list(src.glob("*.safetensors"))),
                      "one_layer_bytes": (total - 2 * 32000 * 4096 * 2) // args.layers,
                      "write_s": time.perf_counter() - t0}
  conv = [sys.executable, "-m", "mixtral_jax.convert"]
  runs = {
      "hf_to_orbax_bf16": conv + [src, work / "orbax_bf16"],
      "hf_to_orbax_float32": conv + [src, work / "orbax_f32", "--dtype", "float32"],
      "orbax_to_hf": conv + ["--to-hf", work / "orbax_bf16", work / "hf_back"],
  }
  if not args.skip_peer:
    runs["peer_transformers_load_save"] = [sys.executable, "-c", PEER, src, work / "hf_peer"]
  for name, cmd in runs.items():
    res = measured(cmd)
    res["converter_s"] = res["wall_s"] if name.startswith("peer") else converter_seconds(res["stdout"])
    res["source_mb_per_s"] = total / res["converter_s"] / 1e6
    res["rss_over_checkpoint"] = res["rss_gb"] * 1e9 / total
    result[name] = res
    print(name, json.dumps({k: v for k, v in res.items() if k != "stdout"}), flush=True)
    if name == "hf_to_orbax_float32":
      shutil.rmtree(work / "orbax_f32")  # 12 GB we do not need again
  result["round_trip_tensors_bit_equal"] = verify_round_trip(src, work / "hf_back")
  result["orbax_bf16_bytes_on_disk"] = sum(p.stat().st_size for p in (work / "orbax_bf16").rglob("*") if p.is_file())
  result["load_avg_end"] = os.getloadavg()
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
  out.with_suffix(".md").write_text(report(result) + "\n")
  print(report(result))
  shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> str:
  gb = r["source"]["bytes"] / 1e9
  m = r["machine"]
  lines = [
      f"# Checkpoint conversion at full width ({r['source']['layers']} layers, D=4096, F=14336, bf16)",
      "",
      f"Source: HF legacy layout, {r['source']['files']} safetensors shards + index, {gb:.2f} GB "
      f"(one decoder layer {r['source']['one_layer_bytes'] / 1e9:.2f} GB). Machine: {m['cpu_count']} CPUs, "
      f"load average {r['load_avg_start'][0]:.1f} at start, {r['load_avg_end'][0]:.1f} at end (shared machine).",
      "",
      "| run | wall s | converter s | MB/s (source bytes) | peak RSS GB | RSS / checkpoint |",
      "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name in ("hf_to_orbax_bf16", "hf_to_orbax_float32", "orbax_to_hf", "peer_transformers_load_save"):
    if name in r:
      x = r[name]
      lines.append(f"| {name} | {x['wall_s']:.1f} | {x['converter_s']:.1f} | {x['source_mb_per_s']:.0f} | "
                   f"{x['rss_gb']:.2f} | {x['rss_over_checkpoint']:.2f} |")
  bf = r["hf_to_orbax_bf16"]
  lines += [
      "",
      f"Ceilings in the same run: memory read {m['read_gbps']:.1f} GB/s, matmul {m['matmul_gflops']:.0f} GFLOP/s, "
      f"disk write {m['disk_write_mbps']:.0f} MB/s (fsync), disk re-read {m['disk_read_mbps']:.0f} MB/s.",
      f"HF -> Orbax runs at {bf['source_mb_per_s'] / m['disk_write_mbps']:.2f}x the disk write ceiling "
      f"(Orbax compresses with zstd: {r['orbax_bf16_bytes_on_disk'] / 1e9:.2f} GB on disk).",
  ]
  if "peer_transformers_load_save" in r:
    p = r["peer_transformers_load_save"]
    lines.append(f"Versus the peer (transformers from_pretrained + save_pretrained of the same weights): "
                 f"{bf['rss_gb'] / p['rss_gb']:.2f}x its peak RSS, {p['wall_s'] / bf['wall_s']:.2f}x its speed (wall).")
  lines.append(f"Round trip HF -> Orbax -> HF: all {r['round_trip_tensors_bit_equal']} tensors bit-identical.")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
