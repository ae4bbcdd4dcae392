"""Every bad input a user meets ends in one `error:` line that names the field and what
to do, never a traceback (the error table of WORKSPACE.md)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env
from train import cli

VIT = "configs/vit.py:smoke"
GPT = "configs/gpt2_lm.py:smoke"

# (arguments after --workdir, exit code, texts the error must contain, devices)
CASES = {
    "unknown key, = form": ([f"--config={VIT}", "--config.no_such_key=1"], 2,
                            ["no_such_key", "valid keys there"], 1),
    "unknown key, space forms": (["--config", VIT, "--config.no_such_key", "1"], 2,
                                 ["no_such_key", "valid keys there"], 1),
    "unknown nested key, one dash": ([f"-config={VIT}", "-config.trainer.totl_steps=5"], 2,
                                     ["trainer.totl_steps", "total_steps"], 1),
    "patch that does not tile the image": ([f"--config={VIT}", "--config.model.patch=3"], 1,
                                           ["model.patch=3", "valid patch sizes: 1, 2, 4, 8"],
                                           1),
    "batch size 0": ([f"--config={VIT}", "--config.trainer.batch_size=0"], 1,
                     ["trainer.batch_size=0", "positive multiple"], 1),
    "batch not divisible by the data axis": (
        [f"--config={VIT}", "--config.trainer.batch_size=12"], 1,
        ["trainer.batch_size=12", "8 devices", "multiple of 8"], 8),
    "unknown source scheme": ([f"--config={GPT}", "--config.data.source=foo:bar"], 1,
                              ["unknown scheme 'foo'", "local:", "tfds:"], 1),
    "Tiny Shakespeare not on the machine": (
        ["--config=configs/gpt2_lm.py:shakespeare", "--config.trainer.total_steps=1"], 1,
        ["tinyshakespeare", "local:FILE", "char-rnn"], 1),
}


def run_case(name, workdir):
  args, _, _, devices = CASES[name]
  return subprocess.run([sys.executable, "-m", "train.main", f"--workdir={workdir}", *args,
                         "--noreuse_memory"], cwd=ROOT, env=subprocess_env(devices),
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(name, tmp_path):
  _, code, texts, _ = CASES[name]
  workdir = tmp_path / "run"
  out = run_case(name, workdir)
  assert out.returncode == code, out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr
  for text in texts:
    assert text in errors[0]
  assert "Traceback" not in out.stderr
  assert not workdir.exists()  # A failed start leaves nothing behind.


def test_config_args_reads_every_form_absl_accepts():
  argv = ["main", "--config", "c.py:x", "--config.a=1", "-config.b.c", "2", "--workdir=w"]
  assert cli.config_args(argv) == ("c.py:x", ["a", "b.c"])
  assert cli.config_args(["main", "-config=c.py"]) == ("c.py", [])


if __name__ == "__main__":
  # The error table of WORKSPACE.md: python -m tests.train.test_cli_errors
  import tempfile
  print("| bad input | command (after `python -m train.main --workdir=W`) | exit | first line |")
  print("|---|---|---|---|")
  for case in CASES:
    with tempfile.TemporaryDirectory() as tmp:
      result = run_case(case, f"{tmp}/run")
    lines = result.stderr.strip().splitlines() or [""]
    first = next((l for l in lines if l.startswith("error: ")), lines[0]).replace("|", "\\|")
    flags = " ".join(CASES[case][0]).replace("|", "\\|")
    devices = f" (`{CASES[case][3]}` devices)" if CASES[case][3] > 1 else ""
    print(f"| {case}{devices} | `{flags}` | {result.returncode} | {first} |")
