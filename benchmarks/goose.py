"""ASNN-Goose on WikiText-2: the GPT-2 teacher and the five students at one token budget,
the spike validation report of each spiking student, and inference (packed spike memory,
recurrent decoding of the student against GPT-2 with its KV cache) in one run.

  python -m benchmarks.goose --out=results/goose --budget=short \
      [--runs=runs/goose_short] [--data=../shared/data/wikitext-2-valsplit] [--only=a,b]

Runs are `train.main` workdirs under --runs: a run with final_metrics.json is reused, an
unfinished one resumes from its checkpoint, so the benchmark can be completed across
several sittings (a SIGTERM checkpoints the current run and ends the benchmark). The
teacher is `configs/gpt2_lm.py:wikitext2`; every student is `configs/goose.py:<preset>`
with the same number of steps, batch and window, so each sees the same tokens
(steps x batch x seq_len); a student may stop earlier on its validation patience.

Perplexity protocol: the validation split is cut into non-overlapping 128-token windows
(eval_stride 0, i.e. stride = seq_len = 128), every token but each window's first is
scored once with the 0-127 tokens before it in its window; perplexity = exp(mean NLL)
over those tokens, from the checkpoint selected on that same validation NLL. (GPT-2's
published numbers use 1024-token windows; the seed's teacher used 256.)

Goals (issue 19, Must show 3): best spiking student's perplexity <= 1.5 x the teacher's;
>= 1.3 x better than the spiking student without distillation; every health check
passed, with MI above its shuffled baseline and CKA above 0.3. Reported whichever way
they fall.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging


BUDGETS = {"short": dict(steps=200, eval_every=50), "full": dict(steps=600, eval_every=50)}
STUDENTS = ("spiking_ce", "spiking_kd", "spiking_ctkd", "spiking_ctkd_fdd", "dense_ce")
PROMPT_LEN = 16
GOALS = {"teacher_ratio_max": 1.5, "distill_gain_min": 1.3, "cka_min": 0.3}


def _lengths(cfg, budget: dict):
  cfg.trainer.update(total_steps=budget["steps"], eval_every=budget["eval_every"],
                     ckpt_every=budget["eval_every"])
  return cfg


def teacher_config(data: str, budget: dict):
  from configs import gpt2_lm  # pylint: disable=g-import-not-at-top
  cfg = gpt2_lm.get_config("wikitext2")
  cfg.data.source = "local:" + os.path.abspath(data)
  return _lengths(cfg, budget)


def student_config(name: str, data: str, budget: dict, teacher_dir: str):
  from configs import goose  # pylint: disable=g-import-not-at-top
  cfg = goose.get_config(name)
  cfg.data.source = "local:" + os.path.abspath(data)
  if cfg.distill.mode != "ce":
    cfg.distill.teacher_workdir = os.path.abspath(teacher_dir)
  return _lengths(cfg, budget)


def trained(cfg, workdir: str) -> dict:
  """final_metrics.json of the run, training (or resuming) it first when it has none."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.exists(path):
    print(f"== training {workdir}", flush=True)
    common.train(cfg, workdir)
  with open(path) as f:
    return json.load(f)


def _history(workdir: str) -> list:
  """The validation perplexities of a run, [step, perplexity] per evaluation."""
  from ponder import metric_log  # pylint: disable=g-import-not-at-top
  return [[r["step"], r["perplexity"]] for r in metric_log.read_metrics(workdir)
          if r.get("split") == "eval" and "perplexity" in r]


def _train_means(workdir: str, keys=("temperature", "lambda", "fdd", "spike_rate")) -> dict:
  from ponder import metric_log  # pylint: disable=g-import-not-at-top
  rows = [r for r in metric_log.read_metrics(workdir) if r.get("split", "train") == "train"]
  return {k: [[r["step"], r[k]] for r in rows if k in r] for k in keys
          if any(k in r for r in rows)}


def spike_section(workdir: str, teacher: tuple, outdir: str, batches: int) -> dict:
  """The validation report of a spiking student run (latest checkpoint)."""
  from ponder.analysis import spikes  # pylint: disable=g-import-not-at-top
  from train import goose, trainer  # pylint: disable=g-import-not-at-top
  _, task, params, step, _ = trainer.restore_run(workdir, selected=True)
  rep = goose.spike_validation(task.model, params["student"], teacher, task.eval_batches(),
                               max_batches=batches)
  paths = spikes.write_report(rep, outdir)
  return {"step": step, "passed": rep["passed"], "checks": rep["checks"],
          "spike_density": goose.spike_density(rep),
          "mi_bits": rep["mi"]["overall"]["mi_bits"],
          "mi_shuffle_bits": rep["mi"]["overall"]["shuffle_bits"], "files": paths}


def inference_section(student_dir: str, teacher: tuple, new_tokens: int, runs: int, *,
                      prompt_len: int = PROMPT_LEN) -> dict:
  """Packed spike memory vs float32 on one validation batch, and greedy decoding tokens/s
  of the spiking student (float and packed matmuls) and of GPT-2 with its KV cache,
  interleaved in one run (batch 1, a 16-token prompt)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from models import gpt2, rwkv  # pylint: disable=g-import-not-at-top
  from ponder import analysis  # pylint: disable=g-import-not-at-top
  from ponder import ops  # pylint: disable=g-import-not-at-top
  from ponder.analysis import spikes  # pylint: disable=g-import-not-at-top
  from train import trainer  # pylint: disable=g-import-not-at-top
  _, task, params, _, _ = trainer.restore_run(student_dir, selected=True)
  student, sp = task.model, params["student"]
  batch = next(iter(task.eval_batches()))
  codes = spikes.spiking_apply(student, sp)(batch["tokens"][:, :-1])
  f32 = sum(int(np.prod(v.shape)) * 4 for v in codes.values())
  packed = sum(int(ops.pack_ternary(jnp.sign(v).astype(jnp.int8).reshape(-1, v.shape[-1]),
                                    jnp.uint32).nbytes) for v in codes.values())
  memory = {"tokens": int(np.prod(batch["tokens"][:, :-1].shape)), "sites": len(codes),
            "float32_bytes": f32, "packed_bytes": packed, "ratio": f32 / packed}
  t_model, t_params = teacher
  packed_model = rwkv.RWKV(dataclasses.replace(student.config, spike_matmul="packed"),
                           dtype=student.dtype)
  prompt = jnp.asarray(np.asarray(batch["tokens"])[:1, :prompt_len], jnp.int32)
  key = jax.random.key(0)
  runs_by_name = {
      "teacher_kv_cache": lambda: gpt2.generate(t_model, t_params, prompt, key=key,
                                                max_new_tokens=new_tokens, temperature=0.0),
      "student_state": lambda: rwkv.generate(student, sp, prompt, key=key,
                                             max_new_tokens=new_tokens, temperature=0.0),
      "student_state_packed": lambda: rwkv.generate(packed_model, sp, prompt, key=key,
                                                    max_new_tokens=new_tokens,
                                                    temperature=0.0)}
  same = bool(jnp.array_equal(runs_by_name["student_state"](),
                              runs_by_name["student_state_packed"]()))
  times = analysis.measure_interleaved(runs_by_name, warmup=1, runs=runs)
  rates = {k: new_tokens / v["median_s"] for k, v in times.items()}
  return {"memory": memory, "decoding": {
      "batch_size": 1, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "tokens_per_s": rates, "packed_equals_float_tokens": same,
      "student_over_teacher": rates["student_state"] / rates["teacher_kv_cache"],
      "packed_student_over_teacher": rates["student_state_packed"] / rates["teacher_kv_cache"]}}


def goals(teacher_ppl: float, students: dict, reports: dict) -> dict:
  spiking = {k: v["perplexity"] for k, v in students.items() if k.startswith("spiking")}
  out = {}
  if spiking:
    best = min(spiking, key=spiking.get)
    out.update(best_spiking=best, teacher_ratio=spiking[best] / teacher_ppl,
               teacher_ratio_met=spiking[best] / teacher_ppl <= GOALS["teacher_ratio_max"])
    if "spiking_ce" in spiking:
      gain = spiking["spiking_ce"] / spiking[best]
      out.update(distill_gain=gain, distill_gain_met=gain >= GOALS["distill_gain_min"])
    if best in reports:
      r = reports[best]
      out.update(health_passed=r["passed"], mi_above_shuffle=r["mi_bits"] > r["mi_shuffle_bits"],
                 cka=r["checks"]["cka_mean"]["value"],
                 cka_met=r["checks"]["cka_mean"]["value"] > GOALS["cka_min"])
  return out


def curves_figure(runs: str, names, path: str) -> list:
  """Validation perplexity and the training CE of the teacher and each student against
  step, one line per run (`ponder.analysis.plots.compare_runs`)."""
  from ponder import metric_log  # pylint: disable=g-import-not-at-top
  from ponder.analysis import plots  # pylint: disable=g-import-not-at-top
  rows = {name: metric_log.read_metrics(os.path.join(runs, name)) for name in names}
  # The teacher's task is plain LM training: its "loss" is its cross-entropy.
  rows["teacher"] = [dict(r, ce=r["loss"]) if "loss" in r else r for r in rows["teacher"]]
  plots.compare_runs(rows, path, metrics=[("eval", "perplexity"), ("train", "ce")],
                     title="ASNN-Goose: the GPT-2 teacher and the students, same tokens")
  return [path]


def define_flags() -> None:
  """The command line's flags, defined only when this module runs as a program (so
  tests can import it beside the other benchmarks)."""
  flags.DEFINE_string("out", "results/goose", "Output directory (goose.json, "
                                      "the spike reports and their PNGs).")
  flags.DEFINE_enum("budget", "short", ["short", "full"], "short: 200 steps of "
                              "16 x 128 tokens per model; full: 600 (the teacher preset's).")
  flags.DEFINE_string("runs", "", "Directory of the runs; '' = runs/goose_<budget>.")
  flags.DEFINE_string("data", "../shared/data/wikitext-2-valsplit",
                              "WikiText-layout directory (train.txt, valid.txt).")
  flags.DEFINE_string("only", "", "Comma-separated students to train/report ('' = all); "
                              "the teacher always.")
  flags.DEFINE_integer("report_batches", 8, "Validation batches (16 x 128 "
                                         "tokens) in each spike report.")
  flags.DEFINE_integer("decode_tokens", 112, "New tokens per decoding run.")
  flags.DEFINE_integer("decode_runs", 3, "Timed decoding rounds.")
  flags.DEFINE_bool(
      "inference_only", False, "Only the inference section, on the newest checkpoint of the "
      "first spiking student in --only that has one (trained or not): train nothing "
      "(writes inference.json).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from train import goose  # pylint: disable=g-import-not-at-top
  budget = BUDGETS[flags.FLAGS.budget]
  runs = flags.FLAGS.runs or f"runs/goose_{flags.FLAGS.budget}"
  out = flags.FLAGS.out
  names = [n for n in (flags.FLAGS.only.split(",") if flags.FLAGS.only else STUDENTS) if n]
  unknown = sorted(set(names) - set(STUDENTS))
  if unknown:
    sys.exit(f"error: unknown students {unknown}; choose from {list(STUDENTS)}.")
  result = {"machine": common.machine(), "budget": flags.FLAGS.budget,
            "tokens_per_model": budget["steps"] * 16 * 128,
            "protocol": "valid perplexity over non-overlapping 128-token windows (stride "
                        "128), each token scored once, selected checkpoint"}
  teacher_dir = os.path.join(runs, "teacher")
  if flags.FLAGS.inference_only:
    teacher = goose.load_teacher(teacher_dir)[:2]
    have = [n for n in names if n.startswith("spiking")
            and os.path.isdir(os.path.join(runs, n, "checkpoints"))]
    if not have:
      sys.exit(f"error: no spiking student of {names} has a checkpoint under {runs}.")
    result.update(student=have[0], inference=inference_section(
        os.path.join(runs, have[0]), teacher, flags.FLAGS.decode_tokens, flags.FLAGS.decode_runs))
    result["machine"]["load_average_end"] = os.getloadavg()
    common.write_json(os.path.join(out, "inference.json"), result)
    print(json.dumps(result["inference"], indent=1))
    return
  t_final = trained(teacher_config(flags.FLAGS.data, budget), teacher_dir)
  result["teacher"] = {"perplexity": t_final["val"]["perplexity"],
                       "selected_step": t_final["selected_step"],
                       "history": _history(teacher_dir)}
  t_model, t_params, _ = goose.load_teacher(teacher_dir)
  teacher = (t_model, t_params)
  students, reports = {}, {}
  for name in names:
    workdir = os.path.join(runs, name)
    final = trained(student_config(name, flags.FLAGS.data, budget, teacher_dir), workdir)
    students[name] = {"perplexity": final["val"]["perplexity"], "step": final["step"],
                      "selected_step": final["selected_step"],
                      "history": _history(workdir), "train": _train_means(workdir)}
    if name.startswith("spiking"):
      reports[name] = spike_section(workdir, teacher, os.path.join(out, name),
                                    flags.FLAGS.report_batches)
      students[name]["spike_density"] = reports[name]["spike_density"]
    common.write_json(os.path.join(out, "goose.json"), dict(result, students=students,
                                                            spike_reports=reports))
  result.update(students=students, spike_reports=reports,
                goals=goals(result["teacher"]["perplexity"], students, reports))
  spiking = [n for n in names if n.startswith("spiking")]
  if spiking:
    result["inference"] = inference_section(os.path.join(runs, spiking[-1]), teacher,
                                            flags.FLAGS.decode_tokens, flags.FLAGS.decode_runs)
  result["machine"]["load_average_end"] = os.getloadavg()
  result["pictures"] = curves_figure(runs, ["teacher", *names], os.path.join(out, "curves.png"))
  common.write_json(os.path.join(out, "goose.json"), result)
  print(f"\nteacher GPT-2: valid ppl {result['teacher']['perplexity']:.1f}")
  for name, s in students.items():
    extra = f"  spikes {s['spike_density']:.1%}" if "spike_density" in s else ""
    print(f"{name:18} valid ppl {s['perplexity']:8.1f}  "
          f"({s['perplexity'] / result['teacher']['perplexity']:.2f}x teacher){extra}")
  print(json.dumps(result["goals"], indent=1))
  if "inference" in result:
    print(json.dumps(result["inference"], indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
