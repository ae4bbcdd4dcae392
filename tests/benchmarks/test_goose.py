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
