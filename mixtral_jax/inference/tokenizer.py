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

  def stream(self, prefix_ids: Sequence[int] = ()) -> "StreamDecoder":
    """A StreamDecoder that continues `prefix_ids` (the prompt as encode() returns it, BOS included).

    Seeded with the prompt, a first generated `▁word` keeps its space; decoded alone it would lose it.
    """
    return StreamDecoder(self, prefix_ids)


class StreamDecoder:
  """Incremental detokenizer: push generated ids, get the new text; flush() at the end.

  For a prefix of whole characters, decode(prefix) + every push + flush() == decode(prefix + pushed), and
  the pushes so far are always a prefix of that. Decoding ids one by one is wrong twice over:
  SentencePiece drops the leading space of a sequence's first piece, and a byte-fallback character spans
  several pieces. So a push decodes from the last plain piece on (the new text is the same as in a decode
  of the whole sequence, at O(window) cost instead of O(sequence)) and holds back a trailing incomplete
  UTF-8 character.
  """

  def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()):
    self.tokenizer = tokenizer
    self.ids: list[int] = [int(i) for i in prefix_ids]
    self._start = 0    # window start: the sequence start or a plain piece
    self._emitted = 0  # chars of decode(ids[_start:_end]) already out; the prefix counts as out
    self._end = 0      # ids up to here are in the emitted text
    self._emit(len(self.ids) - self._incomplete_tail())

  def push(self, *ids: int) -> str:
    self.ids.extend(int(i) for i in ids)
    return self._emit(len(self.ids) - self._incomplete_tail())

  def flush(self) -> str:
    """What push held back, an unfinished character as U+FFFD: call it when the stream ends."""
    return self._emit(len(self.ids))

  def _decode(self, start: int, end: int) -> str:
    return self.tokenizer.sp.decode(self.ids[start:end])

  def _plain(self, i: int) -> bool:
    """A piece a window may start at: not a byte (part of a character), a control (invisible, the piece
    after it would decode as a sequence's first), unknown or unused id."""
    sp = self.tokenizer.sp
    return not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i))

  def _emit(self, end: int) -> str:
    end = max(end, self._end)
    text = self._decode(self._start, end)
    new, self._emitted, self._end = text[self._emitted:], len(text), end
    # Text after a plain piece decodes the same from there as from the start (only the window's first
    # piece loses its leading space, in both decodes), so later pushes need only ids[start:].
    start = next((i for i in range(end - 1, self._start, -1) if self._plain(self.ids[i])), self._start)
    if start != self._start:
      self._start, self._emitted = start, len(self._decode(start, end))
    return new

  def _incomplete_tail(self) -> int:
    """How many trailing ids are the bytes of a UTF-8 character still missing its last byte(s)."""
    sp, tail = self.tokenizer.sp, []
    for i in reversed(self.ids[-4:]):  # a character is at most 4 bytes
      if not sp.is_byte(i):
        break
      tail.insert(0, int(sp.id_to_piece(i)[1:-1], 16))  # "<0xF0>" -> 0xF0
    for n, byte in enumerate(reversed(tail), 1):
      if byte & 0xC0 != 0x80:  # not a continuation byte: the last character's first byte
        size = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return n if n < size else 0
    return 0
