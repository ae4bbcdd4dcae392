"""The plasticity policy under train.main: a smoke run of configs/plasticity.py goes
through every phase, keeps the structure it says, and its dashboard renders in a real
browser (headless Chromium) without script errors."""

import dataclasses
import os
import re
import shutil
import subprocess

import chex
import jax
import numpy as np
import pytest

from configs import plasticity as plasticity_config
from models import gpt2
from ponder import metric_log, plasticity
from ponder.analysis import dashboard
from train import trainer

CHROMIUM_SKIP = ("headless Chromium is not installed: apt-get install -y chromium "
                 "(.ci/run installs it when it runs as root)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One GPT-2 smoke run (2 layers x 4 heads, characters): warm-up, 2 cycles (the
  preset's 3 cost a minute more on 2 cores), done."""
  workdir = str(tmp_path_factory.mktemp("plasticity") / "run")
  cfg = plasticity_config.get_config("gpt2_wt2,smoke,cycles=2")
  result = trainer.train_and_evaluate(cfg, workdir, echo=lambda s: None)
  return cfg, workdir, result


def test_every_phase_runs_and_is_logged(run):
  cfg, workdir, result = run
  state = result["policy_state"]
  events = [e["phase"] for e in state["events"]]
  assert events[:3] == ["warmup", "baseline", "prune"] and events[-1] == "done"
  assert events.count("prune") == events.count("regrow") == events.count("evaluate") == 2
  assert state["warmup_end"]["reason"] in ("plateau", "cap")
  # The trainer stopped at the policy's "done", before total_steps.
  assert int(result["state"].step) == state["events"][-1]["step"] < cfg.trainer.total_steps
  logged = [r["phase"] for r in metric_log.read_metrics(workdir, split="phase")]
  assert logged == ["prune:0", "prune:1", "done"]
  assert os.path.isdir(os.path.join(workdir, "plasticity", "baseline"))
  with open(os.path.join(workdir, "plasticity", "cycles.md")) as f:  # Written by finish.
    assert len(f.read().splitlines()) == 2 + len(state["cycles"])
  cycle_rows = metric_log.read_metrics(os.path.join(workdir, "plasticity"), split="cycle")
  assert [r["active_heads"] for r in cycle_rows] == [c["active"] for c in state["cycles"]]


def test_the_structure_is_the_mask(run):
  """Each cycle prunes what its analysis chose and revives only heads it had pruned;
  the final parameters are the structurally pruned model of the final mask, and equal
  the full model's outputs under that mask."""
  cfg, workdir, result = run
  state = result["policy_state"]
  n_head = cfg.model.n_head
  before = np.ones((cfg.model.n_layer, n_head))
  for record in state["cycles"]:
    after = before.copy()
    for layer, head in record["pruned"]:
      assert before[layer, head] == 1
      after[layer, head] = 0
    for layer, head in record["revived"]:
      assert after[layer, head] == 0
      after[layer, head] = 1
    np.testing.assert_array_equal(record["mask"], after)
    assert record["active"] == int(after.sum())
    cost = record["cost"]
    assert cost["pruned"]["params"] <= cost["baseline"]["params"]
    assert (cost["pruned"]["flops"] < cost["baseline"]["flops"]) == (after.sum() < after.size)
    before = after
  heads = [int(h) for h in before.sum(1)]
  params = result["state"].params
  for layer, h in enumerate(heads):
    rows = params[f"h_{layer}"]["attn"]["c_proj"]["kernel"].shape[0]
    assert rows == h * cfg.model.n_embd // n_head
  # The final pruned model equals the full model (every head's weights, from
  # plasticity/full/) gated by the final mask.
  fam = plasticity.family(cfg, params["wte"]["embedding"].shape[0])
  store = plasticity.PlasticityPolicy(cfg)._store(workdir, "full")
  full = store.restore(store.latest_step(), jax.eval_shape(
      lambda: fam.model.init(jax.random.key(0), *fam.inputs(1, 8))["params"]))
  store.close()
  small = gpt2.GPT2(dataclasses.replace(fam.model.config, heads_per_layer=tuple(heads)))
  ids = np.arange(16)[None] % fam.model.config.vocab_size
  chex.assert_trees_all_close(small.apply({"params": params}, ids),
                              fam.model.apply({"params": full}, ids, head_mask=before),
                              atol=1e-5)


def test_dashboard_renders_in_headless_chromium(run, tmp_path):
  _, workdir, result = run
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  if browser is None:
    pytest.skip(CHROMIUM_SKIP)
  page = dashboard.write(workdir, result["policy_state"])
  with open(page) as f:
    text = f.read()
  assert "http://" not in text and "https://" not in text  # Offline: nothing to fetch.
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
           "--window-size=1280,4000"]
  shot = tmp_path / "dashboard.png"
  done = subprocess.run([browser, *flags, f"--screenshot={shot}", f"file://{page}"],
                        capture_output=True, text=True, timeout=120)
  assert shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
  dom = subprocess.run([browser, *flags, "--enable-logging=stderr", "--dump-dom",
                        f"file://{page}"], capture_output=True, text=True, timeout=120)
  assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]  # The page's script ran ...
  assert not re.search(r"<html[^>]*data-errors", dom.stdout)  # ... and nothing threw.
  assert "Uncaught" not in dom.stderr
  assert f"{len(dashboard.SECTIONS)} sections" in dom.stdout
  for name in dashboard.SECTIONS:
    body = re.search(rf'<section class="panel" id="{name}">(.*?)</section>', dom.stdout, re.S)
    assert body is not None, name
    content = re.sub(r"<h2>.*?</h2>", "", body.group(1))
    assert re.search(r"<(svg|table|p)\b", content) and len(content) > 100, name
  # A finished run has data in every section: no placeholder is left.
  assert 'class="note waiting"' not in dom.stdout
