"""What a source directory holds: its format, model config, tensor layout, and a streamed parameter tree.

Four Mixtral layouts are understood (names below with `{i}` = layer, `{j}` = expert):
  legacy   HF, what the Hub holds: model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight [F, D] ...
  fused    HF transformers v5 (save_original_format=False): mlp.experts.gate_up_proj [E, 2F, D] (w1 then
           w3), mlp.experts.down_proj [E, D, F], mlp.gate.weight
  mistral  the original release: params.json + consolidated.*.pth / consolidated.safetensors with
           layers.{i}.feed_forward.experts.{j}.w1.weight; q/k rows in interleaved rotary pairs
  mistral_stacked  its early variant: layers.{i}.block_sparse_moe.w1 [E*F, D] (w2 also [E*F, D], i.e.
           already [F, D] per expert)
and two dense Mistral ones, opened with `open_source(..., dense=True)` (what `convert --upcycle` reads):
  hf_dense       HF MistralForCausalLM: model.layers.{i}.mlp.gate_proj (w1) / up_proj (w3) [F, D], down_proj (w2)
                 [D, F]; attention and norms as in legacy
  mistral_dense  the original Mistral 7B-style release (params.json without 'moe'):
                 layers.{i}.feed_forward.w1/w2/w3.weight; q/k rows interleaved like mistral
A dense source reads as a one-expert Mixtral (num_experts = top_k = 1, a zero router: the softmax of a
single logit is 1, so that model computes exactly the dense FFN).
Everything is checked (every expected tensor present with its shape, nothing unknown, layer and expert
counts agreeing with the config) before a single byte of output is written.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np

from mixtral_jax.checkpoints import formats
from mixtral_jax.checkpoints import params
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.checkpoints.formats import CheckpointError

_HF = dict(embed="model.embed_tokens.weight", norm="model.norm.weight", lm_head="lm_head.weight",
           q="model.layers.{i}.self_attn.q_proj.weight", k="model.layers.{i}.self_attn.k_proj.weight",
           v="model.layers.{i}.self_attn.v_proj.weight", o="model.layers.{i}.self_attn.o_proj.weight",
           attn_norm="model.layers.{i}.input_layernorm.weight",
           ffn_norm="model.layers.{i}.post_attention_layernorm.weight")
_MISTRAL = dict(embed="tok_embeddings.weight", norm="norm.weight", lm_head="output.weight",
                q="layers.{i}.attention.wq.weight", k="layers.{i}.attention.wk.weight",
                v="layers.{i}.attention.wv.weight", o="layers.{i}.attention.wo.weight",
                attn_norm="layers.{i}.attention_norm.weight", ffn_norm="layers.{i}.ffn_norm.weight")
NAMES = {
    "legacy": dict(_HF, router="model.layers.{i}.block_sparse_moe.gate.weight",
                   w1="model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
                   w2="model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
                   w3="model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight"),
    "fused": dict(_HF, router="model.layers.{i}.mlp.gate.weight", gate_up="model.layers.{i}.mlp.experts.gate_up_proj",
                  down="model.layers.{i}.mlp.experts.down_proj"),
    "mistral": dict(_MISTRAL, router="layers.{i}.feed_forward.gate.weight",
                    w1="layers.{i}.feed_forward.experts.{j}.w1.weight",
                    w2="layers.{i}.feed_forward.experts.{j}.w2.weight",
                    w3="layers.{i}.feed_forward.experts.{j}.w3.weight"),
    "mistral_stacked": dict(_MISTRAL, router="layers.{i}.block_sparse_moe.gate.weight",
                            w1="layers.{i}.block_sparse_moe.w1", w2="layers.{i}.block_sparse_moe.w2",
                            w3="layers.{i}.block_sparse_moe.w3"),
    "hf_dense": dict(_HF, w1="model.layers.{i}.mlp.gate_proj.weight", w2="model.layers.{i}.mlp.down_proj.weight",
                     w3="model.layers.{i}.mlp.up_proj.weight"),
    "mistral_dense": dict(_MISTRAL, w1="layers.{i}.feed_forward.w1.weight", w2="layers.{i}.feed_forward.w2.weight",
                          w3="layers.{i}.feed_forward.w3.weight"),
}
DENSE = ("hf_dense", "mistral_dense")  # no router tensor; one FFN per layer
_INTERLEAVED = ("mistral", "mistral_stacked", "mistral_dense")  # q/k rows in interleaved rotary pairs
_TOLERATED = re.compile(r".*rotary_emb\.inv_freq$")  # a derived buffer some old HF exports carry
_MOE_NAME = re.compile(r"\.(block_sparse_moe|experts)\.|feed_forward\.gate\.|mlp\.gate\.weight$")
_BLOCK_BYTES = 64 << 20  # embedding / LM head are streamed in row blocks of about this size (float32)


@dataclasses.dataclass
class Streamed:
  """An array described, not held: `blocks()` yields (index, block) pairs covering it once, each block
  one chunk of `chunks` shape. checkpoint.py writes these into Orbax one block at a time."""
  shape: Tuple[int, ...]
  dtype: np.dtype
  chunks: Tuple[int, ...]
  blocks: Callable[[], Iterator[Tuple[tuple, np.ndarray]]]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


@dataclasses.dataclass
class Source:
  path: Path
  layout: str                 # a key of NAMES
  config: ModelConfig
  config_file: str            # config.json / params.json, for messages
  reader: formats.TensorReader
  tied: bool = False          # HF tie_word_embeddings: the LM head is the embedding

  def name(self, role: str, i: int = 0, j: int = 0) -> str:
    return NAMES[self.layout][role].format(i=i, j=j)

  @property
  def dtype(self) -> np.dtype:
    """The source's parameter dtype (that of the expert weights, which are nearly all of it)."""
    return self.reader.dtype(self.name("gate_up" if self.layout == "fused" else "w1"))

  def close(self):
    self.reader.close()


def _load_json(path: Path) -> Dict[str, Any]:
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist")
  try:
    out = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return out


def _config(build, path: Path, fields: Dict[str, Any], **kw) -> ModelConfig:
  try:
    return build(fields, **kw)
  except KeyError as e:
    raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
  except (TypeError, ValueError, ConfigError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def _hf_config(path: Path, dense: bool = False) -> Tuple[ModelConfig, bool]:
  hf = _load_json(path)
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise CheckpointError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                          "(only default rotary embeddings)")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (Mixtral uses silu)")
  kind = hf.get("model_type")
  moe = "num_local_experts" in hf or kind == "mixtral"
  if dense and moe:
    raise CheckpointError(f"{path}: already a mixture of experts (model_type {kind!r}, num_local_experts="
                          f"{hf.get('num_local_experts')}); --upcycle needs a dense Mistral checkpoint")
  if dense and kind not in (None, "mistral"):
    raise CheckpointError(f"{path}: model_type {kind!r} is not supported (expected a dense 'mistral')")
  if not dense and not moe and kind == "mistral":
    raise CheckpointError(f"{path}: model_type 'mistral' is a dense model, not a Mixtral (make one from it with "
                          f"--upcycle --num-experts E)")
  if dense:
    hf = {**hf, "num_local_experts": 1, "num_experts_per_tok": 1}
  return _config(params.config_from_hf, path, hf), bool(hf.get("tie_word_embeddings", False))


def _hf_reader(src: Path) -> formats.TensorReader:
  index = src / "model.safetensors.index.json"
  # Hub repositories of Mistral models may also hold consolidated.safetensors: not part of the HF layout.
  files = sorted(p for p in src.glob("*.safetensors") if not p.name.startswith("consolidated"))
  if not index.is_file() and not files:
    extra = " (pytorch_model*.bin is not supported: re-save with safetensors)" if any(src.glob("*.bin")) else ""
    raise CheckpointError(f"{src} has a config.json but no *.safetensors files{extra}")
  return formats.safetensors_reader(files, index if index.is_file() else None)


def _mistral_reader(src: Path) -> formats.TensorReader:
  single = src / "consolidated.safetensors"
  pths = sorted(src.glob("consolidated*.pth"))
  if single.is_file():
    return formats.safetensors_reader([single])
  if pths:
    return formats.torch_reader(pths)
  raise CheckpointError(f"{src} has a params.json but neither consolidated.safetensors nor consolidated.*.pth")


def open_source(src, fmt: str = "auto", *, dense: bool = False) -> Source:
  """Detects the format of directory `src`, parses its config, opens its tensors and validates them.
  dense: expect a dense Mistral (layouts hf_dense / mistral_dense) instead of a Mixtral; either way the
  other kind is refused in one sentence."""
  src = Path(src)
  if not src.exists():
    raise CheckpointError(f"{src} does not exist")
  if not src.is_dir():
    raise CheckpointError(f"{src} is not a directory (expected an HF or Mistral checkpoint directory)")
  if fmt == "auto":
    fmt = "hf" if (src / "config.json").is_file() else "mistral" if (src / "params.json").is_file() else None
    if fmt is None:
      raise CheckpointError(f"{src} holds neither config.json (HF) nor params.json (Mistral release)")
  if fmt == "hf":
    config_path = src / "config.json"
    cfg, tied = _hf_config(config_path, dense)
    reader = _hf_reader(src)
    layout = "hf_dense" if dense else params.hf_layout(reader.names())
  elif fmt == "mistral":
    config_path, tied = src / "params.json", False
    fields = _load_json(config_path)
    moe = isinstance(fields.get("moe"), dict)
    if dense and moe:
      raise CheckpointError(f"{config_path}: already a mixture of experts (moe.num_experts="
                            f"{fields['moe'].get('num_experts')}); --upcycle needs a dense Mistral checkpoint")
    if not dense and not moe:
      raise CheckpointError(f"{config_path}: no 'moe' section, so not a Mixtral (mixture-of-experts) release "
                            f"(a dense Mistral: make a Mixtral from it with --upcycle --num-experts E)")
    if dense:
      fields = {**fields, "moe": {"num_experts": 1, "num_experts_per_tok": 1}}
    reader = _mistral_reader(src)
    embed = _MISTRAL["embed"]
    cfg = _config(params.config_from_mistral, config_path, fields,
                  vocab_size=reader.shape(embed)[0] if embed in reader.names() else None)
    stacked = any(n.endswith("block_sparse_moe.w1") for n in reader.names())
    layout = "mistral_dense" if dense else "mistral_stacked" if stacked else "mistral"
  else:
    raise CheckpointError(f"unknown format {fmt!r}: use auto, hf or mistral")
  source = Source(src, layout, cfg, config_path.name, reader, tied)
  try:
    validate(source)
  except CheckpointError:
    source.close()
    raise
  return source


def expected_shapes(source: Source) -> Dict[str, Tuple[int, ...]]:
  c = source.config
  v, d, h, k, dh, f, e = c.vocab_size, c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_dim, c.num_experts
  out = {source.name("embed"): (v, d), source.name("norm"): (d,)}
  if not source.tied:
    out[source.name("lm_head")] = (v, d)
  for i in range(c.num_layers):
    n = lambda role, j=0: source.name(role, i, j)  # noqa: E731
    out.update({n("q"): (h * dh, d), n("k"): (k * dh, d), n("v"): (k * dh, d), n("o"): (d, h * dh),
                n("attn_norm"): (d,), n("ffn_norm"): (d,)})
    if source.layout not in DENSE:
      out[n("router")] = (e, d)
    if source.layout == "fused":
      out.update({n("gate_up"): (e, 2 * f, d), n("down"): (e, d, f)})
    elif source.layout == "mistral_stacked":
      out.update({n("w1"): (e * f, d), n("w2"): (e * f, d), n("w3"): (e * f, d)})
    else:
      for j in range(e):
        out.update({n("w1", j): (f, d), n("w2", j): (d, f), n("w3", j): (f, d)})
  return out


def validate(source: Source) -> None:
  """Raises CheckpointError naming the first tensor, file or config field that does not fit."""
  r, c, cf = source.reader, source.config, source.config_file
  hf = source.layout in ("legacy", "fused", "hf_dense")
  layers_field, experts_field = ("num_hidden_layers", "num_local_experts") if hf else ("n_layers", "moe.num_experts")
  names = [n for n in r.names() if not _TOLERATED.match(n)]
  if source.layout in DENSE:
    mixed = next((n for n in names if _MOE_NAME.search(n)), None)
    if mixed:
      raise CheckpointError(f"{source.path}: already a mixture of experts (tensor {mixed} in {r.where(mixed)}); "
                            f"--upcycle needs a dense Mistral checkpoint")
  found = {int(m.group(1)) for m in map(re.compile(r"(?:^|\.)layers\.(\d+)\.").search, names) if m}
  if found and found != set(range(c.num_layers)):
    raise CheckpointError(f"{source.path} holds layers {_ranges(found)} but {cf} says {layers_field}={c.num_layers}")
  if source.layout in ("legacy", "mistral"):
    experts = {int(m.group(1)) for m in map(re.compile(r"\.experts\.(\d+)\.").search, names) if m}
    if experts and experts != set(range(c.num_experts)):
      raise CheckpointError(f"{source.path} holds experts {_ranges(experts)} per layer but {cf} says "
                            f"{experts_field}={c.num_experts}")
  router = source.name("router") if source.layout not in DENSE else None
  if router in r.files and len(r.shape(router)) == 2 and r.shape(router)[0] != c.num_experts:
    raise CheckpointError(f"tensor {router} in {r.where(router)} routes to {r.shape(router)[0]} experts but {cf} "
                          f"says {experts_field}={c.num_experts}")
  expected = expected_shapes(source)
  for name, shape in expected.items():
    if name not in r.files:
      raise CheckpointError(f"missing tensor {name}: no file in {source.path} holds it")
    got = r.shape(name)
    if got != shape:
      if source.layout == "fused" and name.endswith("_proj") and got[:1] != shape[:1]:
        raise CheckpointError(f"tensor {name} in {r.where(name)} holds {got[0]} experts but {cf} says "
                              f"{experts_field}={c.num_experts}")
      raise CheckpointError(f"tensor {name} in {r.where(name)} has shape {got}, but {cf} implies {shape}")
    if r.dtype(name).kind != "f" and r.dtype(name) != formats.FLOAT_DTYPES["bfloat16"]:
      raise CheckpointError(f"tensor {name} in {r.where(name)} has dtype {r.dtype(name)}, expected a float type")
  for name in names:
    if name not in expected and not (source.tied and name == source.name("lm_head")):
      what = "Mistral" if source.layout in DENSE else "Mixtral"
      raise CheckpointError(f"unknown tensor {name} in {r.where(name)} (not part of a {source.layout} {what} "
                            f"checkpoint as described by {cf})")


def _ranges(ids) -> str:
  ids = sorted(ids)
  return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def stream_tree(source: Source, dtype) -> Dict[str, Any]:
  """Our parameter tree (the structure of model.params_of) as Streamed leaves reading `source` lazily:
  attention, norms and router one layer at a time, experts one expert at a time, embedding and LM head in
  row blocks. Q/K rows of the Mistral layouts are permuted from interleaved to rotate-half pairs."""
  c, r, dt = source.config, source.reader, np.dtype(dtype)
  d, h, k, dh, f, e, big_l = c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_dim, c.num_experts, c.num_layers
  interleaved = source.layout in _INTERLEAVED
  get = lambda role, i=0, j=0, index=(): r.read(source.name(role, i, j), index)  # noqa: E731
  t = lambda a: formats.transposed(a, dt)  # noqa: E731 -- transpose and cast in one pass

  def per_layer(shape, fn):
    return Streamed((big_l, *shape), dt, (1, *shape), lambda: (((i,), fn(i)) for i in range(big_l)))

  def per_expert(shape, fn):
    return Streamed((big_l, e, *shape), dt, (1, 1, *shape),
                    lambda: (((i, j), fn(i, j)) for i in range(big_l) for j in range(e)))

  def rows(role, heads, i):
    w = get(role, i)
    return params.interleaved_to_half(w, heads) if interleaved else w

  def expert(name, i, j):  # -> [D, F] for w1/w3, [F, D] for w2
    if source.layout == "fused":
      if name == "w2":
        return t(get("down", i, index=(j,)))  # [D, F] -> [F, D]
      half = slice(0, f) if name == "w1" else slice(f, 2 * f)  # gate_up rows: w1 then w3
      return t(get("gate_up", i, index=(j, half)))
    if source.layout == "mistral_stacked":  # [E*F, D]: every expert's block is [F, D]
      block = get(name, i, index=(slice(j * f, (j + 1) * f),))
      return block if name == "w2" else t(block)
    return t(get(name, i, j))  # w1/w3 [F, D] -> [D, F]; w2 [D, F] -> [F, D]

  vocab = c.vocab_size
  step = max(1, _BLOCK_BYTES // (4 * d))  # rows per block
  head_name = "embed" if source.tied else "lm_head"
  embed = Streamed((vocab, d), dt, (min(step, vocab), d), lambda: (
      ((slice(a, min(a + step, vocab)),), get("embed", index=(slice(a, a + step),)))
      for a in range(0, vocab, step)))
  lm_head = Streamed((d, vocab), dt, (d, min(step, vocab)), lambda: (
      ((slice(None), slice(a, min(a + step, vocab))), t(get(head_name, index=(slice(a, a + step),))))
      for a in range(0, vocab, step)))
  return {
      "embed": embed,
      "final_norm": {"scale": Streamed((d,), dt, (d,), lambda: iter([((), get("norm"))]))},
      "lm_head": lm_head,
      "layers": {
          "attn": {
              "wq": per_layer((d, h, dh), lambda i: t(rows("q", h, i)).reshape(d, h, dh)),  # [H*Dh, D] -> [D, H, Dh]
              "wk": per_layer((d, k, dh), lambda i: t(rows("k", k, i)).reshape(d, k, dh)),
              "wv": per_layer((d, k, dh), lambda i: t(get("v", i)).reshape(d, k, dh)),
              "wo": per_layer((h, dh, d), lambda i: t(get("o", i)).reshape(h, dh, d)),  # [D, H*Dh] -> [H, Dh, D]
          },
          "attn_norm": {"scale": per_layer((d,), lambda i: get("attn_norm", i))},
          "ffn_norm": {"scale": per_layer((d,), lambda i: get("ffn_norm", i))},
          "moe": {
              "router": {"kernel": per_layer((d, e), lambda i: np.zeros((d, e), dt) if source.layout in DENSE
                                             else get("router", i).T)},  # [E, D] -> [D, E]
              "w1": per_expert((d, f), lambda i, j: expert("w1", i, j)),
              "w3": per_expert((d, f), lambda i, j: expert("w3", i, j)),
              "w2": per_expert((f, d), lambda i, j: expert("w2", i, j)),
          },
      },
  }


def read_tree(source: Source, dtype) -> Dict[str, Any]:
  """stream_tree(source, dtype) read into memory: the same tree with np.ndarray leaves (for loading a
  source directly into a model; the converter streams instead). Peak: the result plus one block."""
  def fill(leaf):
    if isinstance(leaf, dict):
      return {k: fill(v) for k, v in leaf.items()}
    out = np.empty(leaf.shape, leaf.dtype)
    for index, block in leaf.blocks():
      out[index] = block
    return out
  return fill(stream_tree(source, dtype))
