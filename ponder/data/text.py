"""Text sources and language-model batches.

Sources (the `source` string of a config):
  * "local:DIR" (or a bare directory): the WikiText layout, one file per split named
    `train.txt`/`valid.txt`/`test.txt` or, as in the official WikiText zips,
    `wiki.train.tokens`/... . The text is taken verbatim: `<unk>` and the ` = Heading = `
    lines stay, as in the word-level benchmarks (Merity et al. 2016).
  * "local:FILE" (or a bare file): one plain text file such as Tiny Shakespeare; "train"
    is its first 90% of tokens and "valid" the rest (the char-rnn/nanoGPT split).
  * "builtin:NAME": a small text shipped in `ponder/data/assets/NAME.txt` (`smoke`), so
    smoke configs run anywhere without a download or a data folder.
  * "tfds:NAME": a tfds text dataset with a `text` feature (e.g. `tiny_shakespeare`),
    read without TensorFlow through `tfds.data_source`.

Batches:
  * `lm_train_batch`: (batch, seq_len + 1) windows of the token stream. Each epoch visits
    every non-overlapping window once in a shuffled order with a random phase, and the
    order is a pure function of (seed, step): a resumed run sees the same batches.
  * `lm_eval_batches`: the whole split in non-overlapping or strided windows, with a mask
    that scores every token except the first exactly once (the sliding-window perplexity
    of the Hugging Face guide when stride < seq_len).
"""

import os
import pathlib
from typing import Iterator, Optional

import numpy as np

from ponder import errors
from ponder.data import tokenizers

SPLITS = ("train", "valid", "test")
_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
_SPLIT_FILES = ("{split}.txt", "wiki.{split}.tokens")
_TFDS_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise errors.unknown_key("split", split, SPLITS)


def wikitext_file(directory: str | os.PathLike, split: str) -> pathlib.Path:
  """The file of `split` in a WikiText-layout directory."""
  _check_split(split)
  directory = pathlib.Path(directory)
  for pattern in _SPLIT_FILES:
    path = directory / pattern.format(split=split)
    if path.is_file():
      return path
  present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
  names = " or ".join(p.format(split=split) for p in _SPLIT_FILES)
  raise errors.MissingDataError(
      f"split {split!r} not found in {directory}: expected {names}; the directory holds "
      f"{present or 'nothing'}. Full WikiText-2/103 are the zips of Merity et al. 2016 "
      "(or hub id Salesforce/wikitext); unpack one into this directory.")


def _tfds_text(name: str, split: str, data_dir: Optional[str], download: bool) -> str:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDataError(
        f"source tfds:{name} needs tensorflow-datasets (pip install -e .[tfds]); or use "
        "a local copy: source='local:/path/to/file_or_dir'.") from e
  try:
    examples = tfds.data_source(name, split=_TFDS_SPLITS[split], data_dir=data_dir,
                                download=download)
    texts = [ex["text"] for ex in examples]
  except Exception as e:  # Not prepared, offline, not array_record: one answer for all.
    raise errors.MissingDataError(
        f"tfds:{name} split {_TFDS_SPLITS[split]!r} could not be read "
        f"({type(e).__name__}: {e}). Prepare it once online (`tfds build {name} "
        "--file_format=array_record`) or use a local copy: "
        "source='local:/path/to/file_or_dir'.") from e
  return "".join(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)


def _local_path(source: str) -> pathlib.Path:
  if source.startswith("builtin:"):
    path = _ASSETS / f"{source.removeprefix('builtin:')}.txt"
    if not path.is_file():
      known = sorted(p.stem for p in _ASSETS.glob("*.txt"))
      raise errors.ConfigError(f"unknown text source {source!r}; builtin: {', '.join(known)}")
    return path
  return pathlib.Path(source.removeprefix("local:")).expanduser()


# Where to get the corpora that configs name by default, for the missing-file message.
_HOW_TO_GET = {
    "tinyshakespeare": "Tiny Shakespeare is Karpathy's char-rnn corpus: download "
                       "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt to that path, or read it from tfds "
                       "with source='tfds:tiny_shakespeare'",
    "wikitext": "WikiText-2 is the zip of Merity et al. 2016 (hub id Salesforce/wikitext): "
                "unpack train/valid/test into that directory",
}


def _missing_source(source: str, path: pathlib.Path) -> errors.MissingDataError:
  hint = next((how for key, how in _HOW_TO_GET.items() if key in str(path).lower()), "")
  return errors.MissingDataError(
      f"text source {source!r}: {path} does not exist. Put the corpus there or point "
      "--config.data.source=local:FILE (a text file) or local:DIR (train.txt/valid.txt/"
      f"test.txt) at a copy{'. ' + hint if hint else ''}.")


def has_split(source: str, split: str) -> bool:
  """Whether a text source holds `split` ("test" of a single file never exists: a file
  is split into train and valid only)."""
  _check_split(split)
  if source.startswith("tfds:"):
    return True
  path = _local_path(source)
  if path.is_dir():
    return any((path / p.format(split=split)).is_file() for p in _SPLIT_FILES)
  return split != "test"


def source_text(source: str) -> str:
  """All the text of a local source (every split of a WikiText directory), e.g. to build
  a character vocabulary that covers each split."""
  if source.startswith("tfds:"):
    return "".join(_tfds_text(source.removeprefix("tfds:"), s, None, True)
                   for s in ("train", "valid", "test"))
  path = _local_path(source)
  if path.is_dir():
    files = [wikitext_file(path, s) for s in SPLITS if any(
        (path / f.format(split=s)).is_file() for f in _SPLIT_FILES)]
    return "".join(f.read_text(encoding="utf-8") for f in files)
  if not path.is_file():
    raise _missing_source(source, path)
  return path.read_text(encoding="utf-8")


def split_tokens(source: str, split: str, tokenizer: tokenizers.Tokenizer, *,
                 cache_dir: str | os.PathLike, valid_fraction: float = 0.1,
                 data_dir: Optional[str] = None, download: bool = True) -> np.ndarray:
  """The token ids of one split of a text source, encoded once and then cached.

  Args:
    source: "local:PATH", a bare PATH, or "tfds:NAME" (see the module docstring).
    split: "train", "valid" or "test".
    tokenizer: see `ponder.data.tokenizers`.
    cache_dir: where encoded corpora are kept (`tokenizers.encode_corpus`).
    valid_fraction: for a single file, the share of tokens at its end that form "valid".
    data_dir, download: passed to tfds for "tfds:" sources.
  """
  _check_split(split)
  if source.startswith("tfds:"):
    name = source.removeprefix("tfds:")
    text = _tfds_text(name, split, data_dir, download)
    return tokenizers.encode_text(text, tokenizer, cache_dir, stem=f"{name}-{split}")
  path = _local_path(source)
  if path.is_dir():
    return tokenizers.encode_corpus(wikitext_file(path, split), tokenizer, cache_dir)
  if not path.is_file():
    raise _missing_source(source, path)
  if split == "test":
    raise errors.ConfigError(
        f"{path} is a single file, split into 'train' and 'valid' only; evaluate on "
        "'valid', or give a directory with train.txt/valid.txt/test.txt.")
  tokens = tokenizers.encode_corpus(path, tokenizer, cache_dir)
  cut = int(len(tokens) * (1.0 - valid_fraction))  # As nanoGPT cuts Tiny Shakespeare.
  return tokens[:cut] if split == "train" else tokens[cut:]


def lm_train_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                   seq_len: int, process_index: int = 0,
                   process_count: int = 1) -> dict[str, np.ndarray]:
  """Training windows for `step`: {"tokens": int32 [batch_size / process_count, seq_len + 1]}.

  Row r of the global batch is sample `step * batch_size + r` of an endless sequence of
  epochs. Epoch e cuts the stream into its (len - 1) // seq_len non-overlapping windows,
  shifted by a random phase in [0, slack] so that window boundaries differ between
  epochs, and visits them in a random permutation; both are drawn from (seed, e).

  With several hosts, each passes its `process_index` and gets its contiguous slice of
  the global batch (what `ponder.mesh.shard_batch` expects).
  """
  n_windows = (len(tokens) - 1) // seq_len
  if n_windows < 1:
    raise errors.ShapeError(
        f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1}; lower seq_len.")
  if batch_size % process_count:
    raise errors.ConfigError(
        f"batch size {batch_size} is not divisible by {process_count} processes.")
  local = batch_size // process_count
  sample = np.int64(step) * batch_size + process_index * local + np.arange(local)
  epoch, within = np.divmod(sample, n_windows)
  slack = len(tokens) - 1 - n_windows * seq_len
  starts = np.empty(local, np.int64)
  for e in np.unique(epoch):
    rng = np.random.default_rng([seed, int(e)])
    phase = rng.integers(0, slack + 1)
    order = rng.permutation(n_windows)
    rows = epoch == e
    starts[rows] = phase + order[within[rows]] * seq_len
  return {"tokens": np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], np.int32)}


def _eval_windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
  """(begin, scored_from, end): a window reads tokens[begin:end + 1] and scores the
  targets at positions (scored_from, end]; together they cover 1..n_tokens-1 once."""
  begin, scored = 0, 0
  while scored < n_tokens - 1:
    end = min(begin + seq_len, n_tokens - 1)
    yield begin, scored, end
    begin, scored = begin + stride, end


def lm_eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                    stride: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """A whole split as {"tokens": int32 [B, seq_len + 1], "mask": float32 [B, seq_len]}.

  Window k reads tokens[begin_k : begin_k + seq_len + 1], begin_k = k * stride, and its
  mask scores only the targets that no earlier window scored, so every token after the
  first is scored exactly once. stride = seq_len (the default) gives non-overlapping
  windows; a smaller stride gives each scored token at least seq_len - stride tokens of
  context, the sliding-window evaluation of the Hugging Face perplexity guide. The last
  window and batch are padded with zeros under a zero mask, so all shapes are static.
  """
  stride = seq_len if stride is None else stride
  if not 0 < stride <= seq_len:
    raise errors.ConfigError(f"stride {stride} must be in [1, seq_len = {seq_len}].")
  rows, masks = [], []
  for begin, scored, end in _eval_windows(len(tokens), seq_len, stride):
    row = np.zeros(seq_len + 1, np.int32)
    row[:end + 1 - begin] = tokens[begin:end + 1]
    # Target j of the window is token begin + 1 + j.
    target = begin + 1 + np.arange(seq_len)
    rows.append(row)
    masks.append(((target > scored) & (target <= end)).astype(np.float32))
    if len(rows) == batch_size:
      yield {"tokens": np.stack(rows), "mask": np.stack(masks)}
      rows, masks = [], []
  if rows:
    pad = batch_size - len(rows)
    yield {"tokens": np.pad(np.stack(rows), ((0, pad), (0, 0))),
           "mask": np.pad(np.stack(masks), ((0, pad), (0, 0)))}
