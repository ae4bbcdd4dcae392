"""Every notebook in notebooks/ runs top to bottom on CPU in smoke mode.

Each notebook executes with nbclient in a kernel of this very interpreter (a kernelspec
written to a temporary folder, so no installed `python3` spec of another environment
can be picked up), with SMOKE = True injected after its `parameters` cell, in a
temporary working directory (its runs/ lands there), with HTTP(S) pointed at a dead
proxy so nothing can download. Smoke configs train 3 steps; a notebook takes about a
minute on 2 CPU cores, nearly all of it JAX compiling. PONDER_NOTEBOOK_OUT=DIR also
writes the executed notebooks there (e.g. as CI artifacts, to look at the plots).
"""

import json
import os
import pathlib
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
from jupyter_client.manager import AsyncKernelManager

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell: a smoke cell takes under a minute on 2 idle cores, far
                     # longer when other jobs share them; this only catches a hang
KERNEL = "ponder-test-python"
# Per notebook: text its outputs must hold beyond the generic checks, and how many
# images (the read_metrics plot and curves.png of the smoke run, plus the pictures).
EXPECTED = {
    "vit_colab_tpu.ipynb": (["final: accuracy="], 2),
    "dendritic_liquid_vit_colab_tpu.ipynb": (["final: accuracy=", "corruption_mean"], 4),
    "ponder_ttt_colab_tpu.ipynb": (["final: nll=", "nll_hard"], 2),
    "dendritic_bert_colab_tpu.ipynb": (["final: accuracy=", "dendrite phases:",
                                       "perforation goals:"], 5),
    "goose_colab_tpu.ipynb": (["final: nll=", "spikes_passed"], 4),
    "plasticity_colab_tpu.ipynb": (["final: nll=", "plasticity phases:", "speed-up"], 2),
}
PROBE = "import sys\nprint(sys.prefix)\nprint(sys.executable)"


def _read(path: pathlib.Path):
  return nbformat.read(path, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
  return tagged[0]


def test_every_notebook_is_covered():
  assert {p.name for p in NOTEBOOKS} == set(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
  nb = _read(path)
  nbformat.validate(nb)
  params = nb.cells[_parameters_index(nb)]
  assert params.cell_type == "code" and "SMOKE = True" in params.source
  assert any(c.cell_type == "code" and "if not SMOKE:" in c.source for c in nb.cells), \
      "the full-size runs must be guarded by `if not SMOKE:`"
  assert nb.metadata.kernelspec.name == "python3"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":  # Committed clean: no stale outputs in diffs.
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]
      # Plain Python (no ! or % lines), so even the full-size cells that CI never runs
      # at least compile.
      compile(cell.source, f"{path.name}[{i}]", "exec")


def _kernel_manager(tmp: pathlib.Path) -> AsyncKernelManager:
  spec = tmp / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python (the test's interpreter)", "language": "python"}))
  return AsyncKernelManager(kernel_name=KERNEL,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def _kernel_env() -> dict:
  env = dict(os.environ)
  env.pop("MPLBACKEND", None)  # The kernel's inline backend turns figures into outputs.
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
             HF_HUB_OFFLINE="1", PIP_NO_INDEX="1")
  for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    env[proxy] = "http://127.0.0.1:9"  # No network: a download fails at once.
  env["no_proxy"] = env["NO_PROXY"] = "localhost,127.0.0.1"
  return env


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  if output.output_type in ("execute_result", "display_data"):
    return output.data.get("text/plain", "")
  return ""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
  nb = _read(path)
  at = _parameters_index(nb) + 1
  nb.cells.insert(at, nbformat.v4.new_code_cell(
      "SMOKE = True  # injected by tests/notebooks/test_notebooks.py",
      metadata={"tags": ["injected-parameters"]}))
  nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(tmp_path), kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(workdir)}})
  start = time.perf_counter()
  client.execute(env=_kernel_env())  # Raises CellExecutionError on the first failing cell.
  print(f"{path.name}: {time.perf_counter() - start:.1f} s")
  if os.environ.get("PONDER_NOTEBOOK_OUT"):
    out = pathlib.Path(os.environ["PONDER_NOTEBOOK_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out / path.name)

  prefix, executable = nb.cells[0].outputs[0].text.split()
  assert prefix == sys.prefix, f"the kernel ran {executable}, not this interpreter"
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(_text(o) for o in outputs)
  needles, images = EXPECTED[path.name]
  assert re.search(r'"step": [1-9]', text), f"{path.name}: train.evaluate printed no step"
  for needle in ["final: "] + needles:  # train.main's, and the notebook's own
    assert needle in text, f"{path.name}: no {needle!r} in the outputs"
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) >= images, f"{path.name}: {len(pngs)} images, expected {images}"
  # The runs landed in the temporary working directory, not in the checkout.
  assert (workdir / "runs").is_dir() and any((workdir / "runs").iterdir())
