"""The Mixtral tokenizer against the sentencepiece library's own output on the same file, and round trips."""
import numpy as np
import pytest

from mixtral_jax.tokenizer import Tokenizer

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnewlines", "Grüße aus Köln — ½ € ∑",
         "你好，世界", "emoji 🤖🧪 and a rare CJK char 𠀋", "", "a" * 50, "العربية עברית ελληνικά"]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer()


def test_default_file_is_mixtral(tok):
  assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)
  # Known ids of Mixtral's tokenizer ("▁Hello" = 22557): catches a different file shipping by default.
  assert tok.encode("Hello, world!") == [1, 22557, 28725, 1526, 28808]


def test_ids_equal_sentencepiece_library(tok):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  for text in TEXTS:
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]


def test_ids_equal_mistral_common(tok):
  from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
  ref = SentencePieceTokenizer(tok.path)
  for text in TEXTS[:5]:
    assert tok.encode(text, bos=True, eos=False) == ref.encode(text, bos=True, eos=False)


@pytest.mark.parametrize("text", TEXTS)
def test_unicode_round_trip(tok, text):
  assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_byte_fallback(tok):
  ids = tok.encode("🤖", bos=False)
  pieces = tok.pieces(ids)
  assert [p for p in pieces if p.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
  assert all(3 <= i <= 258 for i, p in zip(ids, pieces) if p.startswith("<0x"))


def test_batch_encode_pads_and_masks(tok):
  texts = ["a longer prompt here", "hi"]
  ids, mask = tok.encode_batch(texts)  # left padding by default
  lens = [len(tok.encode(t)) for t in texts]
  assert ids.shape == mask.shape == (2, max(lens)) and mask.sum(1).tolist() == lens
  assert ids[1, :max(lens) - lens[1]].tolist() == [tok.pad_id] * (max(lens) - lens[1])
  assert ids[1, -lens[1]:].tolist() == tok.encode("hi")
  right, rmask = tok.encode_batch(texts, side="right", length=9)
  assert right.shape == (2, 9) and right[1, :lens[1]].tolist() == tok.encode("hi")
  np.testing.assert_array_equal(rmask[1], [1] * lens[1] + [0] * (9 - lens[1]))
  with pytest.raises(ValueError, match="longer than length=2"):
    tok.encode_batch(texts, length=2)


def test_stream_decoder_equals_full_decode(tok):
  text = "Stream: héllo 🤖 world,  spaced"
  stream, out = tok.stream(), []
  for i in tok.encode(text):
    out.append(stream.push(i))
  assert "".join(out) == text
  assert "\ufffd" not in "".join(out)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    Tokenizer(str(bad))
