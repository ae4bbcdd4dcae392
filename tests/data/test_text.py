"""Text sources and LM batches: splits, (seed, step) purity, exactly-once evaluation."""

import jax
import numpy as np
import pytest

from ponder import errors, mesh
from ponder.data import text, tokenizers
from tests.conftest import is_sample

WIKI = {"train": " = Title = \n \n The <unk> sat .\n", "valid": " = Other = \n A <unk> .\n"}


@pytest.fixture
def char_tok():
  return tokenizers.char_level("".join(WIKI.values()) + "xyz")


def test_wikitext_layout_keeps_unk_and_headings(tmp_path, char_tok):
  for split, content in WIKI.items():
    (tmp_path / f"{split}.txt").write_text(content, encoding="utf-8")
  for split, content in WIKI.items():
    ids = text.split_tokens(f"local:{tmp_path}", split, char_tok, cache_dir=tmp_path / "c")
    assert char_tok.decode(ids) == content
  with pytest.raises(errors.MissingDataError, match=r"test\.txt.*train\.txt"):
    text.split_tokens(str(tmp_path), "test", char_tok, cache_dir=tmp_path / "c")
  with pytest.raises(errors.ConfigError, match="valid"):
    text.split_tokens(str(tmp_path), "validation", char_tok, cache_dir=tmp_path / "c")


def test_official_wikitext_file_names(tmp_path):
  (tmp_path / "wiki.test.tokens").write_text(WIKI["valid"], encoding="utf-8")
  assert text.wikitext_file(tmp_path, "test").name == "wiki.test.tokens"


def test_single_file_splits_90_10(tmp_path, char_tok):
  path = tmp_path / "input.txt"
  path.write_text("xyz" * 100, encoding="utf-8")
  train = text.split_tokens(str(path), "train", char_tok, cache_dir=tmp_path / "c")
  valid = text.split_tokens(f"local:{path}", "valid", char_tok, cache_dir=tmp_path / "c")
  assert (len(train), len(valid)) == (270, 30)
  assert char_tok.decode(np.concatenate([train, valid])) == "xyz" * 100
  with pytest.raises(errors.ConfigError, match="single file"):
    text.split_tokens(str(path), "test", char_tok, cache_dir=tmp_path / "c")
  with pytest.raises(errors.MissingDataError, match="nope does not exist.*local:FILE"):
    text.split_tokens(str(tmp_path / "nope"), "train", char_tok, cache_dir=tmp_path / "c")


def test_tfds_source_without_prepared_data_says_what_to_do(tmp_path, char_tok):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(errors.MissingDataError, match="local:"):
    text.split_tokens("tfds:tiny_shakespeare", "train", char_tok, cache_dir=tmp_path,
                      data_dir=str(tmp_path), download=False)


def test_tiny_shakespeare_char_level(real_data, tmp_path):
  path = real_data / "tinyshakespeare" / "input.txt"
  content = path.read_text(encoding="utf-8")
  tok = tokenizers.char_level(content)
  train = text.split_tokens(f"local:{path}", "train", tok, cache_dir=tmp_path)
  valid = text.split_tokens(f"local:{path}", "valid", tok, cache_dir=tmp_path)
  # The full corpus: the numbers nanoGPT's shakespeare_char/prepare.py prints. The
  # packaged sample (its first 993 lines, 26,061 characters): 90% / 10% of those.
  expected = (58, 23_454, 2_607) if is_sample(real_data) else (65, 1_003_854, 111_540)
  assert (tok.vocab_size, len(train), len(valid)) == expected
  assert tok.decode(np.concatenate([train, valid])) == content


def test_wikitext_valsplit_bpe(real_data, tmp_path):
  pytest.importorskip("tokenizers")
  bpe = tokenizers.gpt2_bpe()
  source = f"local:{real_data / 'wikitext-2-valsplit'}"
  valid = text.split_tokens(source, "valid", bpe, cache_dir=tmp_path)
  path = real_data / "wikitext-2-valsplit" / "valid.txt"
  assert bpe.decode(valid) == path.read_text(encoding="utf-8")
  with pytest.raises(errors.MissingDataError, match="Salesforce/wikitext"):
    text.split_tokens(source, "test", bpe, cache_dir=tmp_path)


def test_train_batch_is_pure_in_seed_and_step():
  tokens = np.arange(1000)
  batch = text.lm_train_batch(tokens, seed=0, step=3, batch_size=4, seq_len=16)["tokens"]
  assert batch.dtype == np.int32 and batch.shape == (4, 17)
  # Every row is a contiguous window of the stream.
  np.testing.assert_array_equal(batch, batch[:, :1] + np.arange(17))
  again = text.lm_train_batch(tokens, seed=0, step=3, batch_size=4, seq_len=16)["tokens"]
  np.testing.assert_array_equal(batch, again)
  for other in (dict(seed=0, step=4), dict(seed=1, step=3)):
    different = text.lm_train_batch(tokens, batch_size=4, seq_len=16, **other)["tokens"]
    assert not np.array_equal(batch, different)


def test_train_epoch_visits_every_window_once():
  tokens = np.arange(171)  # 10 windows of 16 + 1, slack 10 for the random phase.
  starts = np.concatenate([
      text.lm_train_batch(tokens, seed=5, step=s, batch_size=5, seq_len=16)["tokens"][:, 0]
      for s in (0, 1)])
  phase = starts.min()
  assert 0 <= phase <= 10
  np.testing.assert_array_equal(np.sort(starts), phase + 16 * np.arange(10))
  # The next epoch has its own order (and phase).
  next_epoch = np.concatenate([
      text.lm_train_batch(tokens, seed=5, step=s, batch_size=5, seq_len=16)["tokens"][:, 0]
      for s in (2, 3)])
  assert not np.array_equal(starts, next_epoch)


def test_process_slices_make_the_global_batch():
  tokens = np.arange(500)
  kw = dict(seed=2, step=7, batch_size=6, seq_len=8)
  full = text.lm_train_batch(tokens, **kw)["tokens"]
  parts = [text.lm_train_batch(tokens, process_index=i, process_count=3, **kw)["tokens"]
           for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  sharded = mesh.shard_batch({"tokens": full}, mesh.make_mesh())
  assert sharded["tokens"].shape == (6, 9)
  np.testing.assert_array_equal(jax.device_get(sharded["tokens"]), full)
  with pytest.raises(errors.ShapeError, match="seq_len"):
    text.lm_train_batch(tokens[:8], **kw)


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, None), (100, 16, 5), (17, 16, 16),
                                               (18, 16, 1), (5, 16, 3)])
def test_eval_scores_every_token_once(n, seq_len, stride):
  tokens = np.arange(n) + 1000
  counts = np.zeros(n, int)
  for batch in text.lm_eval_batches(tokens, batch_size=3, seq_len=seq_len, stride=stride):
    assert batch["tokens"].shape == (3, seq_len + 1) and batch["mask"].shape == (3, seq_len)
    targets, mask = batch["tokens"][:, 1:], batch["mask"].astype(bool)
    np.add.at(counts, targets[mask] - 1000, 1)
    if stride is not None and stride < seq_len:  # Scored tokens keep their context.
      for row, m in zip(batch["tokens"], batch["mask"]):
        if m.any() and row[0] != 1000:
          assert np.argmax(m) >= seq_len - stride
  np.testing.assert_array_equal(counts, np.r_[0, np.ones(n - 1, int)])


def test_eval_rejects_a_stride_that_skips_tokens():
  with pytest.raises(errors.ConfigError, match="stride"):
    next(text.lm_eval_batches(np.arange(50), batch_size=2, seq_len=8, stride=9))
