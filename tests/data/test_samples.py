"""The packaged data samples: intact, small, in the shared-data layout, and installed."""

import configparser
import csv
import glob
import hashlib
import pathlib

import pytest

from ponder import errors
from ponder.data import samples
from tests.conftest import ROOT, SHARED_DATA

FILES = {"wikitext2": ("train.txt", "valid.txt"), "tinyshakespeare": ("input.txt",),
         "sst2": ("train.tsv", "dev.tsv")}


def test_every_sample_is_listed_small_and_matches_its_checksum():
  sums = dict(reversed(line.split()) for line in
              (samples.root() / "SHA256SUMS").read_text().splitlines())
  listed = set()
  for name, files in FILES.items():
    sample_bytes = 0
    for f in files:
      path = samples.path(name) / f
      rel = path.relative_to(samples.root()).as_posix()
      assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[rel], rel
      sample_bytes += path.stat().st_size
      listed.add(rel)
    assert sample_bytes < 100_000, name
  assert listed == set(sums)
  assert (samples.root() / "README.md").is_file()  # Sources and licences.


def test_sample_layouts():
  wiki = samples.path("wikitext2")
  for split in ("train", "valid"):
    lines = (wiki / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    headings = [line for line in lines if line.startswith(" = ") and not line.startswith(" = = ")]
    assert headings[0] in lines[:2] and len(headings) == {"train": 4, "valid": 1}[split]
    assert lines[-1] == " "  # Whole articles: each ends with a blank " " line.
  # SST-2: the two files name their text column differently (as the full data does).
  for f, column in (("train.tsv", "sentence"), ("dev.tsv", "content")):
    with open(samples.path("sst2") / f, encoding="utf-8", newline="") as fh:
      rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == 400 and list(rows[0]) == ["label", column], f
    assert {r["label"] for r in rows} == {"0", "1"} and all(r[column] for r in rows)


def test_samples_are_verbatim_prefixes_of_the_shared_data():
  if not SHARED_DATA.is_dir():  # A fresh clone: the checksums above still hold.
    return
  for name, files in FILES.items():
    for f in files:
      rel = samples.path(name).relative_to(samples.root()) / f
      sample = (samples.root() / rel).read_bytes()
      assert (SHARED_DATA / rel).read_bytes().startswith(sample), rel


def test_unknown_sample_lists_the_names():
  with pytest.raises(errors.ConfigError, match="sst2.*tinyshakespeare.*wikitext2"):
    samples.path("sst-2")


def test_setup_cfg_installs_the_samples():
  """A wheel or a non-editable install carries every file under ponder/data/assets
  (setuptools expands package_data with glob(recursive=True), keeping files only)."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  patterns = cfg["options.package_data"]["ponder.data"].replace(",", "\n").split()
  package = ROOT / "ponder" / "data"
  shipped = {pathlib.Path(f) for pattern in patterns
             for f in glob.glob(str(package / pattern), recursive=True)}
  missing = sorted(p.relative_to(package).as_posix() for p in (package / "assets").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p not in shipped)
  assert not missing, f"setup.cfg [options.package_data] ponder.data misses {missing}"
