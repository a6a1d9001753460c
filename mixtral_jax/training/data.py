"""Training data: documents from text / JSONL files -> tokens -> packed, shuffled, checkpointable batches.

Pipeline (grain): documents --shuffle(seed), a fresh permutation per epoch--> repeat --tokenize (lazily)-->
concat-then-split packing into rows of `seq_len` --> batch. Every row carries `segment_ids` (1, 2, ... per
document piece; 0 = padding) and `positions` restarting at 0 for each piece, so attention never crosses
documents. The iterator's position is grain iterator state, saved beside the model by Orbax
(`grain.checkpoint.CheckpointSave`), so a resumed run sees exactly the batches it would have seen.

Inputs and targets are shifted *per document* before packing, so no target ever comes from another
document. `loss_mask` is 0 on padding and on prompt tokens of `{"prompt", "completion"}` JSONL records.

Batch (numpy): tokens, targets, positions, segment_ids int32 [B, T]; loss_mask float32 [B, T].

The default corpus (`paths="stdlib"`) is the Python standard library's own top-level source files: every
Python installation carries them, so the default run needs no download.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from typing import Iterator, NamedTuple, Optional

import grain
import numpy as np

from mixtral_jax.config import ConfigError

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
_FEATURES = ("inputs", "targets", "loss_mask")


class DataError(ConfigError):
  """A user-caused data problem (missing file, empty data, malformed JSONL); one line naming the file."""


class Document(NamedTuple):
  text: str
  prompt: str = ""   # instruction data: the prompt is context, not a training target
  group: int = 0     # documents of one group (a file, a JSONL line) are held out together


# ---------------------------------------------------------------------------------------------- tokenizer

class ByteTokenizer:
  """UTF-8 bytes + 3 specials (pad 0, bos 1, eos 2): a 259-token vocabulary for fast tests."""
  vocab_size, pad_id, bos_id, eos_id = 259, 0, 1, 2

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """The same signature as mixtral_jax.inference.tokenizer.Tokenizer.encode."""
    ids = [b + 3 for b in text.encode("utf-8")]
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids) -> str:
    """Specials and ids past the byte range (a model's vocabulary may be padded wider) decode to nothing."""
    return bytes(int(i) - 3 for i in ids if 3 <= int(i) < self.vocab_size).decode("utf-8", errors="replace")


def load_tokenizer(name: str):
  """'mixtral' | 'bytes' | a path to a SentencePiece .model file.

  SentencePiece files load through mixtral_jax.inference.tokenizer.Tokenizer (the same class generation uses).
  """
  if name == "bytes":
    return ByteTokenizer()
  from mixtral_jax.inference.tokenizer import Tokenizer, default_path
  path = default_path() if name == "mixtral" else name
  if not os.path.isfile(path):
    raise DataError(f"config.data.tokenizer: tokenizer file not found: {path}")
  return Tokenizer(path)


# ---------------------------------------------------------------------------------------------- documents

def split_text(text: str, chunk_chars: int) -> list[str]:
  """Splits a long text at blank lines into pieces of about chunk_chars (0 = never split), so shuffling
  mixes long files instead of emitting hundreds of consecutive rows from one of them."""
  if chunk_chars <= 0 or len(text) <= chunk_chars:
    return [text] if text.strip() else []
  pieces, current, size = [], [], 0
  for block in text.split("\n\n"):
    if size and size + len(block) > chunk_chars:
      pieces.append("\n\n".join(current))
      current, size = [], 0
    current.append(block)
    size += len(block) + 2
  pieces.append("\n\n".join(current))
  return [p for p in pieces if p.strip()]


def jsonl_records(path: str):
  """(line number, parsed JSON) for every non-blank line of `path`; a malformed line raises DataError
  naming file and line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: malformed JSONL line ({e.msg})") from None


def _read_jsonl(path: str, group_start: int) -> list[Document]:
  docs = []
  for number, record in jsonl_records(path):
    if isinstance(record, dict) and isinstance(record.get("text"), str):
      docs.append(Document(record["text"], group=group_start + number))
    elif (isinstance(record, dict) and isinstance(record.get("prompt"), str)
          and isinstance(record.get("completion"), str)):
      docs.append(Document(record["completion"], prompt=record["prompt"], group=group_start + number))
    else:
      raise DataError(f'{path}:{number}: a JSONL record needs a "text" string or "prompt" and '
                      f'"completion" strings')
  return docs


def resolve_paths(paths: str) -> list[str]:
  """'stdlib' or comma-separated files / directories / globs -> sorted file list (errors name the path)."""
  if paths == "stdlib":
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  files = []
  for item in filter(None, (p.strip() for p in paths.split(","))):
    if os.path.isdir(item):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                     if name.endswith(TEXT_EXTENSIONS + (".jsonl",)))
      if not found:
        raise DataError(f"config.data.paths: directory {item} holds no .txt/.md/.py/.rst/.jsonl files")
      files += found
    elif any(c in item for c in "*?["):
      found = sorted(glob.glob(item, recursive=True))
      if not found:
        raise DataError(f"config.data.paths: no file matches {item!r}")
      files += found
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise DataError(f"config.data.paths: data file not found: {item}")
  if not files:
    raise DataError("config.data.paths is empty: name files, directories, globs or 'stdlib'")
  return files


def read_documents(paths: str, chunk_chars: int = 4000) -> list[Document]:
  """Text files are documents (long ones split at blank lines); JSONL lines are documents."""
  docs = []
  for index, path in enumerate(resolve_paths(paths)):
    if path.endswith(".jsonl"):
      docs += _read_jsonl(path, group_start=index << 32)
      continue
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError:
      raise DataError(f"{path}: not UTF-8 text") from None
    docs += [Document(piece, group=index << 32) for piece in split_text(text, chunk_chars)]
  if not docs:
    raise DataError(f"config.data.paths={paths!r}: no documents (all files are empty)")
  return docs


def split_heldout(docs: list[Document], fraction: float, seed: int):
  """(train, eval) documents. Whole groups (files, JSONL lines) are held out, chosen by seed; a single
  group is split by document instead. Returns eval=[] when fraction is 0."""
  if fraction <= 0:
    return docs, []
  groups = sorted({d.group for d in docs})
  by_document = len(groups) < 2
  keys = list(range(len(docs))) if by_document else groups
  if len(keys) < 2:
    raise DataError("config.data.eval_fraction > 0 needs at least 2 documents")
  rng = np.random.default_rng(seed)
  count = min(len(keys) - 1, max(1, int(round(fraction * len(keys)))))
  held = set(np.asarray(keys)[rng.permutation(len(keys))[:count]].tolist())
  pick = (lambda i, d: i in held) if by_document else (lambda i, d: d.group in held)
  train = [d for i, d in enumerate(docs) if not pick(i, d)]
  evals = [d for i, d in enumerate(docs) if pick(i, d)]
  return train, evals


# ---------------------------------------------------------------------------------------------- pipeline

def encode(doc: Document, tokenizer) -> dict:
  """Document -> per-document shifted inputs/targets and a loss mask (0 where the target is prompt)."""
  prompt = tokenizer.encode(doc.prompt, bos=False) if doc.prompt else []
  ids = np.asarray([tokenizer.bos_id] + prompt + tokenizer.encode(doc.text, bos=False) + [tokenizer.eos_id],
                   np.int32)
  mask = np.ones(len(ids) - 1, np.int32)
  mask[:len(prompt)] = 0  # targets ids[1 : 1 + len(prompt)] are prompt tokens
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask}


def _to_batch(packed: dict) -> dict:
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)  # [B, T]; 0 = padding
  return {
      "tokens": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "positions": packed["inputs_positions"].astype(np.int32),
      "segment_ids": segment_ids,
      "loss_mask": (packed["loss_mask"] * (segment_ids > 0)).astype(np.float32),
  }


def _packed(ds: grain.IterDataset, seq_len: int, batch_size: int, drop_remainder: bool) -> grain.IterDataset:
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={k: seq_len for k in _FEATURES})
  return ds.batch(batch_size, drop_remainder=drop_remainder).map(_to_batch)


def train_dataset(docs: list[Document], tokenizer, *, seq_len: int, batch_size: int,
                  seed: int) -> grain.IterDataset:
  """An endless, deterministic stream of packed batches; iter() of it is checkpointable."""
  if not docs:
    raise DataError("no training documents (config.data.paths)")
  ds = grain.MapDataset.source(docs).shuffle(seed=seed).repeat(None)  # a new permutation each epoch
  ds = ds.map(lambda doc: encode(doc, tokenizer))
  # One reader thread: tokenizing is cheap next to a train step, and the step needs the cores.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))
  return _packed(ds, seq_len, batch_size, drop_remainder=True)


def eval_batches(docs: list[Document], tokenizer, *, seq_len: int, batch_size: int,
                 num_batches: int) -> list[dict]:
  """The first num_batches packed batches of the held-out documents, in a fixed order; the last one is
  padded with empty rows (loss_mask 0) so every batch has the same shape."""
  if not docs:
    return []
  ds = grain.MapDataset.source(docs).map(lambda doc: encode(doc, tokenizer)).to_iter_dataset()
  batches = []
  for batch in _packed(ds, seq_len, batch_size, drop_remainder=False):
    missing = batch_size - batch["tokens"].shape[0]
    if missing:
      batch = {k: np.concatenate([v, np.zeros((missing, seq_len), v.dtype)]) for k, v in batch.items()}
    batches.append(batch)
    if len(batches) == num_batches:
      break
  return batches


def batches(ds: grain.IterDataset, state: Optional[dict] = None) -> Iterator[dict]:
  """A checkpointable iterator over ds, optionally positioned at a saved grain state."""
  iterator = iter(ds)
  if state is not None:
    iterator.set_state(state)
  return iterator
