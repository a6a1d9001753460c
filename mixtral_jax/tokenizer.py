"""Mixtral's SentencePiece tokenizer: the file mistral-common ships (no download) or a user-given one.

Mixtral uses a 32,000-piece SentencePiece BPE model with byte fallback: any character outside the
vocabulary becomes its UTF-8 bytes (pieces `<0x00>`..`<0xFF>`, ids 3..258), so every string round-trips.
BOS is 1, EOS is 2; there is no pad piece, so batches are padded with `pad_id` (default 0, `<unk>`) and
come with a mask, and the model sees padding through segment id 0, never through the pad id itself.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

DEFAULT_FILE = "tokenizer.model.v1"  # mistral-common's copy of Mixtral 8x7B's tokenizer.model


def default_path() -> str:
  """Path of the tokenizer file inside the installed mistral-common package."""
  import mistral_common  # imported lazily: only needed for the default file
  path = os.path.join(os.path.dirname(mistral_common.__file__), "data", DEFAULT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file {path} is missing from the installed mistral-common; "
                            "pass a tokenizer.model path instead")
  return path


class Tokenizer:
  """Text <-> token ids. `Tokenizer()` loads Mixtral's; `Tokenizer(path)` any SentencePiece model."""

  def __init__(self, path: Optional[str] = None, *, pad_id: int = 0):
    import sentencepiece as spm
    path = path or default_path()
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    self.path = path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"tokenizer file {path} is not a SentencePiece model ({e})") from None
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.pad_id = pad_id

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    ids = self.sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text. BOS/EOS/pad are control pieces and decode to nothing."""
    return self.sp.decode([int(i) for i in ids])

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self.sp.id_to_piece(int(i)) for i in ids]

  def encode_batch(self, texts: Sequence[str], *, bos: bool = True, eos: bool = False, side: str = "left",
                   length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [B, T], mask int32 [B, T]) padded with pad_id to the longest (or `length`).

    side="left" keeps every prompt's last token in the last column, the layout `sampling.generate`
    uses; side="right" is the usual layout for training and scoring.
    """
    if side not in ("left", "right"):
      raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
    width = max(map(len, rows), default=0) if length is None else length
    if any(len(r) > width for r in rows):
      raise ValueError(f"a text encodes to {max(map(len, rows))} tokens, longer than length={width}")
    ids = np.full((len(rows), width), self.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
      ids[i, cols], mask[i, cols] = row, 1
    return ids, mask

  def stream(self) -> "StreamDecoder":
    return StreamDecoder(self)


class StreamDecoder:
  """Incremental detokenizer: feed ids one at a time, get the new text.

  Decoding pieces one by one is wrong twice over: SentencePiece drops a leading space of a lone `▁word`
  piece, and byte-fallback characters span several pieces. So this decodes the whole sequence and emits
  only what is new, holding back a trailing incomplete UTF-8 character (decoded as U+FFFD).
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.emitted = 0

  def push(self, *ids: int) -> str:
    self.ids.extend(int(i) for i in ids)
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
      return ""
    new, self.emitted = text[self.emitted:], len(text)
    return new
