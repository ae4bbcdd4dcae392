"""benchmarks/goose.py: every model of a budget sees the same tokens, and the goal checks."""

from benchmarks import goose


def test_teacher_and_students_share_the_token_budget(tmp_path):
  budget = goose.BUDGETS["short"]
  teacher = goose.teacher_config(str(tmp_path), budget)
  tokens = lambda c: (c.trainer.total_steps, c.trainer.batch_size, c.data.seq_len)
  for name in goose.STUDENTS:
    cfg = goose.student_config(name, str(tmp_path), budget, str(tmp_path / "teacher"))
    assert tokens(cfg) == tokens(teacher) == (200, 16, 128)
    assert cfg.data.source == teacher.data.source
    assert cfg.data.tokenizer == teacher.data.tokenizer
    assert cfg.data.eval_stride == teacher.data.eval_stride == 0  # Same protocol.
    assert bool(cfg.distill.teacher_workdir) == (cfg.distill.mode != "ce")


def _report(passed, mi, shuffle, cka):
  return {"passed": passed, "mi_bits": mi, "mi_shuffle_bits": shuffle,
          "checks": {"cka_mean": {"value": cka}}}


def test_goals_pick_the_best_spiking_student():
  students = {"dense_ce": {"perplexity": 100.0}, "spiking_ce": {"perplexity": 300.0},
              "spiking_ctkd": {"perplexity": 200.0}, "spiking_kd": {"perplexity": 250.0}}
  reports = {"spiking_ctkd": _report(False, 0.2, 0.05, 0.4)}
  g = goose.goals(150.0, students, reports)
  assert g["best_spiking"] == "spiking_ctkd"  # The dense student is not a candidate.
  assert abs(g["teacher_ratio"] - 200 / 150) < 1e-12 and g["teacher_ratio_met"]
  assert g["distill_gain"] == 1.5 and g["distill_gain_met"]
  assert not g["health_passed"] and g["mi_above_shuffle"] and g["cka_met"]
  g = goose.goals(100.0, students, {})
  assert not g["teacher_ratio_met"] and "health_passed" not in g


def test_curves_figure_draws_the_teacher_ce_from_its_loss(tmp_path, monkeypatch):
  from ponder import metric_log  # pylint: disable=g-import-not-at-top
  from ponder.analysis import plots  # pylint: disable=g-import-not-at-top
  for name, train in (("teacher", {"loss": 6.0}), ("spiking_ce", {"loss": 5.5, "ce": 5.0})):
    writer = metric_log.MetricWriter(str(tmp_path / name), tensorboard=False)
    for step in (10, 20):
      writer.write(step, train)
      writer.write(step, {"perplexity": 300.0 - step}, split="eval")
  drawn = []
  draw = plots.compare_runs
  monkeypatch.setattr(plots, "compare_runs",
                      lambda *a, **k: drawn.append((a[0], draw(*a, **k))))
  path = str(tmp_path / "curves.png")
  assert goose.curves_figure(str(tmp_path), ["teacher", "spiking_ce"], path) == [path]
  assert open(path, "rb").read()[:4] == b"\x89PNG"
  rows, panels = drawn[0]
  assert panels == [("eval", "perplexity"), ("train", "ce")]
  ce = {name: [r["ce"] for r in run if r["split"] == "train"] for name, run in rows.items()}
  assert ce == {"teacher": [6.0, 6.0], "spiking_ce": [5.0, 5.0]}
