"""GLUE SST-2 (Socher et al. 2013; Wang et al. 2019) sentences and bucketed batches.

Sources (the `source` string of a config):
  * "local:DIR" (or a bare directory): GLUE's TSV layout, one file per split,
    `train.tsv`, `dev.tsv` and optionally `test.tsv`, each with a header row. Columns are
    found by name: the label in `label`, the sentence in `sentence` (or `content`, as in
    some copies of dev.tsv). Any other `NAME.tsv` in the directory with a label column
    is the split NAME, so extra evaluation files are scored by name.
  * "tfds:glue/sst2" (when tensorflow-datasets has it prepared, or can download it):
    its train / validation / test splits, read through `tfds.data_source`; here
    "dev" = tfds "validation". GLUE's official test labels are hidden (-1), so "test"
    cannot be scored.

Splits: "train" and "valid" both come from train.tsv: `valid_fraction` (5%) of it is
set aside by a fixed permutation (the same for every run and every training seed) for
model selection, and "train" is the rest. "dev" is the GLUE dev set, to report once at
the end.

Batches are numpy dicts {input_ids, attention_mask, token_type_ids, label} (int32),
padded to the smallest length bucket (16/32/64/128) that holds the batch's longest
sentence, so a jitted step compiles once per bucket. The training order is a pure
function of (seed, step) (`vision.batch_indices`), so a resumed run sees the same
batches; evaluation batches add a float32 "mask" that is 0 at padding rows.
"""

import csv
import dataclasses
import os
import pathlib
from typing import Iterator, Optional, Sequence

import numpy as np

from ponder import errors
from ponder.data import tokenizers, vision

BUCKETS = (16, 32, 64, 128)
_TEXT_COLUMNS = ("sentence", "content")
_LABEL_COLUMN = "label"
_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
_TFDS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_CARVE_SEED = 0x5572  # Fixed: the valid carve must not move with the training seed.
_HOW_TO_GET = (
    "Download SST-2 from GLUE (https://gluebenchmark.com/tasks, SST-2.zip) and unpack "
    "it so that DIR/train.tsv and DIR/dev.tsv exist (tab-separated, header row with "
    "'sentence' and 'label'), then use source='local:DIR'; or, online with "
    "tensorflow-datasets installed, source='tfds:glue/sst2'.")


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """Sentences and their int32 labels (1 = positive for SST-2)."""
  name: str
  texts: tuple[str, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """A split's token ids, [CLS] ... [SEP] and truncated, stored flat: example i is
  tokens[offsets[i]:offsets[i + 1]]."""
  name: str
  tokens: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray
  pad_id: int

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def example(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def read_tsv(path: str | os.PathLike, name: Optional[str] = None) -> TextSplit:
  """One GLUE-layout TSV file: the sentence and label columns, found by header name."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingDataError(f"{path} not found. {_HOW_TO_GET}")
  with open(path, encoding="utf-8", newline="") as f:
    # GLUE's files are not quoted: a sentence may hold '"'.
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows:
    raise errors.MissingDataError(f"{path} is empty. {_HOW_TO_GET}")
  header = [h.strip() for h in rows[0]]
  text_col = next((header.index(c) for c in _TEXT_COLUMNS if c in header), None)
  if text_col is None or _LABEL_COLUMN not in header:
    hidden = " (GLUE's official test.tsv has no labels: it cannot be scored)" if (
        text_col is not None) else ""
    raise errors.MissingDataError(
        f"{path}: header {header} lacks a sentence column ({' or '.join(_TEXT_COLUMNS)}) "
        f"and a {_LABEL_COLUMN!r} column{hidden}.")
  label_col = header.index(_LABEL_COLUMN)
  texts, labels = [], []
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    try:
      texts.append(row[text_col])
      labels.append(int(row[label_col]))
    except (IndexError, ValueError) as e:
      raise errors.MissingDataError(
          f"{path}, line {line}: {row!r} has no sentence or integer label ({e}).") from None
  return TextSplit(name or path.stem, tuple(texts), np.asarray(labels, np.int32))


def _carve(train: TextSplit, valid_fraction: float) -> tuple[TextSplit, TextSplit]:
  if not 0 < valid_fraction < 1:
    raise errors.ConfigError(f"valid_fraction={valid_fraction} is not in (0, 1).")
  n_valid = max(1, int(round(len(train) * valid_fraction)))
  order = np.random.default_rng(_CARVE_SEED).permutation(len(train))
  # Both parts keep the file's order, so the carve is a set, not a shuffle.
  valid, rest = np.sort(order[:n_valid]), np.sort(order[n_valid:])
  pick = lambda name, idx: TextSplit(name, tuple(train.texts[i] for i in idx),
                                     train.labels[idx])
  return pick("train", rest), pick("valid", valid)


def _tfds_split(name: str, split: str, data_dir: Optional[str]) -> TextSplit:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDataError(
        f"source tfds:{name} needs tensorflow-datasets (pip install -e .[tfds]). "
        f"{_HOW_TO_GET}") from e
  if split not in _TFDS_SPLITS:
    raise errors.unknown_key(f"tfds:{name} split", split, ("train", "valid", "dev", "test"))
  try:
    examples = tfds.data_source(name, split=_TFDS_SPLITS[split], data_dir=data_dir)
    rows = [(ex["sentence"], int(ex["label"])) for ex in examples]
  except Exception as e:  # Not prepared, offline, not array_record: one answer for all.
    raise errors.MissingDataError(
        f"tfds:{name} split {_TFDS_SPLITS[split]!r} could not be read "
        f"({type(e).__name__}: {e}). Prepare it once online (`tfds build {name} "
        f"--file_format=array_record`). {_HOW_TO_GET}") from e
  texts = tuple(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t, _ in rows)
  labels = np.asarray([l for _, l in rows], np.int32)
  if split == "test" and (labels < 0).all():
    raise errors.MissingDataError(
        f"tfds:{name} test labels are hidden (-1): GLUE scores test on its server.")
  return TextSplit(split, texts, labels)


def load_split(source: str, split: str, *, valid_fraction: float = 0.05,
               data_dir: Optional[str] = None) -> TextSplit:
  """One split of SST-2: "train" (train.tsv less the carve), "valid" (the carve),
  "dev", "test", or any NAME with a NAME.tsv beside them (local sources).

  Args:
    source: "local:DIR", a bare DIR, or "tfds:glue/sst2" (see the module docstring).
    split: the split's name.
    valid_fraction: the share of train.tsv set aside as "valid".
    data_dir: tfds's data_dir for "tfds:" sources.
  """
  if source.startswith("tfds:"):
    name = source.removeprefix("tfds:")
    if split in ("train", "valid"):
      return _carve(_tfds_split(name, "train", data_dir), valid_fraction)[
          split == "valid"]
    return _tfds_split(name, split, data_dir)
  directory = pathlib.Path(source.removeprefix("local:")).expanduser()
  if not directory.is_dir():
    raise errors.MissingDataError(
        f"SST-2 source {source!r}: {directory} is not a directory. {_HOW_TO_GET}")
  if split in ("train", "valid"):
    return _carve(read_tsv(directory / _FILES["train"], "train"), valid_fraction)[
        split == "valid"]
  path = directory / _FILES.get(split, f"{split}.tsv")
  if not path.is_file():
    present = sorted(p.stem for p in directory.glob("*.tsv"))
    raise errors.MissingDataError(
        f"split {split!r}: {path} not found; {directory} has the splits "
        f"{['train', 'valid'] + [p for p in present if p != 'train'] if present else 'none'}"
        f". {_HOW_TO_GET}")
  return read_tsv(path, split)


def load_sst2(source: str, *, valid_fraction: float = 0.05,
              data_dir: Optional[str] = None) -> dict[str, TextSplit]:
  """{"train", "valid", "dev"} of SST-2 (see `load_split`), train.tsv read once."""
  dev = load_split(source, "dev", data_dir=data_dir)  # Checks the source first.
  if source.startswith("tfds:"):
    train = _tfds_split(source.removeprefix("tfds:"), "train", data_dir)
  else:
    train = read_tsv(pathlib.Path(source.removeprefix("local:")).expanduser()
                     / _FILES["train"], "train")
  train, valid = _carve(train, valid_fraction)
  return {"train": train, "valid": valid, "dev": dev}


def encode(split: TextSplit, tokenizer: tokenizers.WordPieceTokenizer, *,
           max_len: int = 128) -> EncodedSplit:
  """Tokenizes every sentence once: [CLS] word pieces [SEP], at most max_len ids."""
  seqs = tokenizer.encode_many(split.texts, max_len)
  lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.fromiter((t for s in seqs for t in s), np.int32, int(offsets[-1]))
  return EncodedSplit(split.name, tokens, offsets, split.labels, tokenizer.pad_id)


def bucket_length(longest: int, buckets: Sequence[int] = BUCKETS) -> int:
  """The smallest bucket that holds `longest` tokens."""
  for b in sorted(buckets):
    if longest <= b:
      return b
  raise errors.ShapeError(
      f"a sequence of {longest} tokens exceeds the largest bucket {max(buckets)}; encode "
      f"with max_len <= {max(buckets)} or add a bucket.")


def _batch(split: EncodedSplit, index: np.ndarray, buckets: Sequence[int],
           rows: Optional[int] = None) -> dict[str, np.ndarray]:
  seqs = [split.example(i) for i in index]
  length = bucket_length(max(len(s) for s in seqs), buckets)
  rows = len(seqs) if rows is None else rows
  seqs += [seqs[0][:0]] * (rows - len(seqs))  # Empty rows: all [PAD], mask 0.
  batch = tokenizers.pad_batch(seqs, length, split.pad_id)
  batch["label"] = np.pad(split.labels[index], (0, rows - len(index))).astype(np.int32)
  return batch


def train_batch(split: EncodedSplit, *, seed: int, step: int, batch_size: int,
                buckets: Sequence[int] = BUCKETS) -> dict[str, np.ndarray]:
  """Training batch `step`, a pure function of (seed, step): rows from
  `vision.batch_indices` (every example once per epoch, a new permutation per epoch),
  padded to the bucket of the batch's longest sentence."""
  index = vision.batch_indices(len(split), seed=seed, step=step, batch_size=batch_size)
  return _batch(split, index, buckets)


def eval_batches(split: EncodedSplit, *, batch_size: int, buckets: Sequence[int] = BUCKETS,
                 pad_to_multiple: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The split in order, each batch padded to its bucket; the last batch is filled with
  all-[PAD] rows (label 0, "mask" 0.0), so a metric sums `mask * value` and divides by
  `mask.sum()`. The batch size is rounded up to a multiple of `pad_to_multiple` (the
  mesh's data axis), so every batch shards evenly."""
  size = -(-batch_size // pad_to_multiple) * pad_to_multiple
  for start in range(0, len(split), size):
    index = np.arange(start, min(start + size, len(split)))
    batch = _batch(split, index, buckets, rows=size)
    batch["mask"] = np.pad(np.ones(len(index), np.float32), (0, size - len(index)))
    yield batch
