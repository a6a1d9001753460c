"""The Mixtral tokenizer against the sentencepiece library's own output on the same file, and round trips."""
import numpy as np
import pytest

from mixtral_jax.inference.tokenizer import Tokenizer

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
  assert stream.flush() == ""


def check_stream(tok, prompt_ids, generated):
  """decode(prompt) + pushes + flush() == decode(prompt + generated); after every push the text so far is
  a prefix of that, and only an unfinished character (U+FFFD in the full decode) is held back."""
  prompt_ids, generated = list(prompt_ids), list(generated)
  base, full = tok.decode(prompt_ids), tok.decode(prompt_ids + generated)
  assert full.startswith(base)
  stream, out = tok.stream(prompt_ids), ""
  for n, i in enumerate(generated, 1):
    out += stream.push(i)
    so_far = tok.decode(prompt_ids + generated[:n])[len(base):]
    assert so_far.startswith(out), (n, out, so_far)
    assert set(so_far[len(out):]) <= {"\ufffd"}, (n, out, so_far)
  out += stream.flush()
  assert base + out == full
  return out


# Prompts end at a word boundary or mid-word; continuations start a new word or not, and hold characters
# that are pieces (é, 日本語, 🙂) or byte fallback (🤖🧪, 𠀋).
PROMPTS = ["The capital of France is", "The capital of Fra", "Paris is ", "def f(x):\n    return",
           "Köln, Grüße"]
CONTINUATIONS = [" disp", "nce is a city", " Paris", "\n\n  x = 1", " café é", " 日本語", "日本語です",
                 " 🙂 ok", "🤖🧪", " 𠀋!", "e\u0301", "  two spaces"]


def test_stream_keeps_the_first_generated_space(tok):
  prompt = tok.encode("The capital of France is")
  generated = tok.encode("The capital of France is disp", bos=True)[len(prompt):]
  assert tok.pieces(generated) == ["▁disp"]
  assert tok.stream(prompt).push(*generated) == " disp"
  assert tok.stream().push(*generated) == "disp"  # no prefix: like decode(), a first piece loses its space


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("continuation", CONTINUATIONS)
def test_stream_continues_the_prompt(tok, prompt, continuation):
  # The model's ids: encode(continuation) always starts a new word ("▁" first); encode(prompt +
  # continuation) cut after the prompt's ids continues a word when the prompt ends mid-word.
  prompt_ids = tok.encode(prompt)
  assert check_stream(tok, prompt_ids, tok.encode(continuation, bos=False)) == \
      tok.decode(prompt_ids + tok.encode(continuation, bos=False))[len(prompt):]
  whole = tok.encode(prompt + continuation)
  for cut in range(1, len(whole)):  # every split of the real ids that is not inside a character
    if not tok.decode(whole[:cut]).endswith("\ufffd"):
      assert tok.decode(whole[:cut]) + check_stream(tok, whole[:cut], whole[cut:]) == prompt + continuation


def test_stream_holds_byte_fallback_characters_until_complete(tok):
  prompt = tok.encode("robot:")
  generated = tok.encode("🤖 日本 𠀋", bos=False)
  pieces = tok.pieces(generated)
  # 🤖 falls back to its 4 bytes (🙂, by contrast, is a piece of its own).
  assert "<0xF0>" in pieces and "🙂" in tok.pieces(tok.encode("🙂", bos=False))
  stream = tok.stream(prompt)
  outs = [stream.push(i) for i in generated]
  assert all("\ufffd" not in o for o in outs)
  assert outs[pieces.index("<0xF0>"):pieces.index("<0xF0>") + 4] == ["", "", "", "🤖"]
  assert "".join(outs) == " 🤖 日本 𠀋" and stream.flush() == ""


def test_flush_returns_an_unfinished_character(tok):
  prompt = tok.encode("cut:")
  robot = tok.encode("🤖", bos=False)[-4:]  # <0xF0> <0x9F> <0xA4> <0x96>
  stream = tok.stream(prompt)
  assert stream.push(*robot[:3]) == ""
  assert set(stream.flush()) == {"\ufffd"}
  assert tok.decode(prompt) + check_stream(tok, prompt, robot[:3]) == tok.decode(prompt + robot[:3])


def test_stream_equals_full_decode_on_random_ids(tok):
  """The window the stream decodes is exact for any ids: plain, "▁", bytes (valid and not), BOS/EOS, unk."""
  rng = np.random.default_rng(0)
  byte_id = {b: tok.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
  chars = "é日本語🤖🧪𠀋ß"
  for _ in range(100):
    generated = []
    while len(generated) < 30:
      kind = rng.integers(6)
      if kind == 0:
        generated += [byte_id[b] for b in rng.choice(list(chars)).encode()]
      elif kind == 1:
        generated.append(byte_id[int(rng.integers(128, 256))])
      elif kind == 2:
        generated.append(int(rng.choice([0, 1, 2, 259, 28705])))  # unk, BOS, EOS, "▁▁", "▁"
      else:
        generated.append(int(rng.integers(259, tok.vocab_size)))
    prompt = tok.encode(rng.choice(PROMPTS + [""]))
    check_stream(tok, prompt, generated)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    Tokenizer(str(bad))
