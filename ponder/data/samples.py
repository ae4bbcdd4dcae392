"""Small slices of real corpora shipped inside the package, for tests and examples.

Each sample is a verbatim prefix of a public dataset, kept in the same layout as the
workspace's `../shared/data`, so code that reads the full data reads a sample unchanged:

  samples.path("wikitext2")        -> a WikiText-layout directory (train.txt, valid.txt):
                                      the first 4 articles of train, the first of valid
  samples.path("tinyshakespeare")  -> a directory with input.txt (the first 993 lines)
  samples.path("sst2")             -> a directory with train.tsv (label, sentence) and
                                      dev.tsv (label, content): header + 400 rows each
  samples.root()                   -> the folder of all three, laid out as ../shared/data

For example `text.split_tokens(f"local:{samples.path('wikitext2')}", "valid", tok, ...)`.
Where each slice comes from, its licence (WikiText-2 is CC BY-SA 3.0, Tiny Shakespeare
public domain, SST-2 research use) and its checksum: assets/samples/README.md and
assets/samples/SHA256SUMS.
"""

import pathlib

from ponder import errors

_ROOT = pathlib.Path(__file__).resolve().parent / "assets" / "samples"
# Sample name -> its folder under the root (the folder names of ../shared/data).
FOLDERS = {
    "wikitext2": "wikitext-2-valsplit",
    "tinyshakespeare": "tinyshakespeare",
    "sst2": "sst-2",
}


def root() -> pathlib.Path:
  """The folder holding every sample, in the layout of the workspace's ../shared/data."""
  return _ROOT


def path(name: str) -> pathlib.Path:
  """The directory of one packaged sample (see the module docstring for the names)."""
  if name not in FOLDERS:
    raise errors.unknown_key("data sample", name, FOLDERS)
  directory = _ROOT / FOLDERS[name]
  if not directory.is_dir():
    raise errors.MissingDataError(
        f"the packaged sample {name!r} is missing from {directory}: this install of ponder "
        "was built without its data files. Reinstall from a checkout (pip install -e .) or "
        "add 'assets/samples/*/*' to setup.cfg's [options.package_data] ponder.data.")
  return directory
