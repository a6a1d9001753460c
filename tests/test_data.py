"""Data pipeline: packing masks, prompt masking, deterministic shuffling, checkpointable position, errors."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mixtral_jax.training import data
from mixtral_jax.model import build

TOK = data.ByteTokenizer()


def _docs(n, length=13):
  return [data.Document("".join(chr(97 + (i + j) % 26) for j in range(length + i)), group=i) for i in range(n)]


def test_packing_segments_positions_and_targets_stay_inside_documents():
  docs = [data.Document("abcde"), data.Document("xy", prompt="Q?"), data.Document("hello world")]
  batch = data.eval_batches(docs, TOK, seq_len=11, batch_size=3, num_batches=1)[0]
  seg, pos, tok, tgt, mask = (batch[k] for k in ("segment_ids", "positions", "tokens", "targets", "loss_mask"))
  assert seg.shape == (3, 11) and mask.dtype == np.float32
  for row in range(3):
    for s in set(seg[row].tolist()) - {0}:
      where = np.flatnonzero(seg[row] == s)
      assert np.array_equal(pos[row, where], np.arange(len(where)))  # positions restart per document piece
      assert tok[row, where[0]] == TOK.bos_id or pos[row, where[0]] == 0
  # Document 1: bos a b c d e eos -> inputs bos..e, targets a..eos; the last target is EOS, never the next doc.
  first = seg[0] == 1
  assert TOK.decode(tok[0][first]) == "abcde" and tgt[0][first][-1] == TOK.eos_id
  # Document 2 (prompt "Q?", completion "xy"): targets Q ? are masked, x y eos are trained.
  second = seg[0] == 2
  assert TOK.decode(tgt[0][second]) == "Q?xy"
  assert mask[0][second].tolist() == [0, 0, 1, 1, 1]
  assert np.all(mask[seg == 0] == 0) and np.all(tok[seg == 0] == 0)  # padding is inert


def test_packed_rows_give_the_same_logits_as_documents_alone():
  """Attention never crosses documents: a packed row equals each document run on its own (one batch:
  row 0 packed, row i the i-th document alone, padded)."""
  cfg = tiny_config(vocab_size=TOK.vocab_size)
  model = build(cfg, seed=1)
  docs = [data.Document("first doc"), data.Document("second!"), data.Document("3rd")]
  packed = data.eval_batches(docs, TOK, seq_len=32, batch_size=1, num_batches=1)[0]
  rows = {k: [v[0]] for k, v in packed.items()}
  for doc in docs:
    single = data.eval_batches([doc], TOK, seq_len=32, batch_size=1, num_batches=1)[0]
    for k in rows:
      rows[k].append(single[k][0])
  batch = {k: jnp.asarray(np.stack(v)) for k, v in rows.items()}  # [4, 32]
  logits = jax.jit(lambda m, b: m(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]).logits)(
      model, batch)
  for s in range(1, len(docs) + 1):
    where = np.flatnonzero(packed["segment_ids"][0] == s)
    # float32, same math on different rows: equal up to a few ulps
    np.testing.assert_allclose(logits[0, where], logits[s, :len(where)], rtol=1e-5, atol=1e-5)


def test_shuffling_is_deterministic_by_seed_and_reshuffles_each_epoch():
  docs = _docs(6)
  take = lambda seed, n=8: [b["tokens"] for _, b in zip(range(n), data.batches(  # noqa: E731
      data.train_dataset(docs, TOK, seq_len=16, batch_size=2, seed=seed)))]
  a, b, c = take(0), take(0), take(1)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  import grain
  order = grain.MapDataset.source(list(range(6))).shuffle(seed=0).repeat(None)
  epochs = [[order[e * 6 + i] for i in range(6)] for e in range(3)]
  assert all(sorted(e) == list(range(6)) for e in epochs) and epochs[0] != epochs[1]


def test_iterator_position_restores_exactly():
  ds = data.train_dataset(_docs(5), TOK, seq_len=16, batch_size=2, seed=3)
  it = data.batches(ds)
  for _ in range(7):  # crosses an epoch boundary and leaves a split document in the packing buffer
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = data.batches(ds, state)
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_heldout_split_keeps_files_whole(tmp_path):
  for i in range(10):
    (tmp_path / f"f{i}.txt").write_text(f"file {i}\n\n" + "x" * 50 + "\n\n" + "y" * 50)
  docs = data.read_documents(str(tmp_path), chunk_chars=40)
  train, held = data.split_heldout(docs, 0.2, seed=0)
  assert len(train) + len(held) == len(docs) and held
  assert not {d.group for d in train} & {d.group for d in held}
  one = data.read_documents(str(tmp_path / "f0.txt"), chunk_chars=40)
  train, held = data.split_heldout(one, 0.5, seed=0)  # one file: split by document
  assert train and held


def test_default_corpus_is_the_standard_library():
  files = data.resolve_paths("stdlib")
  assert len(files) > 50 and all(f.endswith(".py") for f in files)
  docs = data.read_documents("stdlib")
  assert len(docs) > len(files) and max(len(d.text) for d in docs) < 40_000


def test_jsonl_text_and_prompt_completion(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
  docs = data.read_documents(str(path))
  assert docs[0].text == "plain" and docs[0].prompt == "" and (docs[1].prompt, docs[1].text) == ("p", "c")
  assert docs[0].group != docs[1].group


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": broken}\n', r"d\.jsonl:2: malformed JSONL line"),
    ('{"text": "ok"}\n\n{"prompt": "only"}\n', r"d\.jsonl:3: a JSONL record needs"),
    ("\n\n", r"no documents"),
])
def test_data_errors_name_file_and_line(tmp_path, content, match):
  path = tmp_path / "d.jsonl"
  path.write_text(content)
  with pytest.raises(data.DataError, match=match):
    data.read_documents(str(path))


def test_missing_files_and_globs(tmp_path):
  with pytest.raises(data.DataError, match="data file not found: .*nope.txt"):
    data.read_documents(str(tmp_path / "nope.txt"))
  with pytest.raises(data.DataError, match="no file matches"):
    data.read_documents(str(tmp_path / "*.txt"))
  (tmp_path / "empty.txt").write_text("   \n")
  with pytest.raises(data.DataError, match="no documents"):
    data.read_documents(str(tmp_path / "empty.txt"))
  with pytest.raises(data.DataError, match="tokenizer file not found"):
    data.load_tokenizer(str(tmp_path / "t.model"))


def test_mixtral_tokenizer_ships_with_mistral_common():
  tok = data.load_tokenizer("mixtral")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
  assert tok.decode(tok.encode("def f(x):\n  return x")) == "def f(x):\n  return x"


def test_run_py_data_error_is_one_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a"}\nnot json\n')
  out = subprocess.run([sys.executable, "run.py", f"--config.data.paths={bad}", f"--workdir={tmp_path / 'w'}"],
                       capture_output=True, text=True)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == f"error: {bad}:2: malformed JSONL line (Expecting value)"


def test_byte_tokenizer_round_trip_and_ids_past_its_vocabulary():
  text = "naïve 🙂 code"
  assert TOK.decode(TOK.encode(text, eos=True)) == text
  assert TOK.decode([1, 300, *TOK.encode("ok", bos=False), 0, 258 + 1]) == "ok"  # a padded model vocabulary
