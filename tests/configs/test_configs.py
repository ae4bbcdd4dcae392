"""Every config: its smoke variant runs a real train step; bad arguments are clear errors."""

import pathlib

import numpy as np
import pytest

from configs import common
from ponder import errors
from tests import fakes
from train import cli
from train import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"

# config file -> the smoke arguments that cover its presets, and the tiny dataset
# (in the real format) each preset reads, so no smoke test needs a download.
SMOKE = {
    "vit.py": {
        "digits,smoke": None,
        "fashion_mnist,smoke": lambda d: fakes.write_fashion_mnist(d),
        "cifar10,smoke": lambda d: fakes.write_cifar(d, 10),
        "cifar100,smoke": lambda d: fakes.write_cifar(d, 100),
        # cifar10_small,smoke is cifar10,smoke (smoke sets the model's size).
        "fashion_mnist_p4,smoke": lambda d: fakes.write_fashion_mnist(d),
    },
    "dendritic_liquid_vit.py": {
        # The fine-tuning default needs a trained baseline: the task test
        # (tests/train/test_dendritic_liquid_vit_task.py) runs it; here from scratch.
        # fashion_mnist differs from fashion_mnist_p4 only in the patch.
        "fashion_mnist_p4,smoke,scratch": lambda d: fakes.write_fashion_mnist(d),
        "fashion_mnist_p4,smoke,variant=dendritic_vit": lambda d: fakes.write_fashion_mnist(d),
        "cifar10_small,smoke,scratch": lambda d: fakes.write_cifar(d, 10),
    },
    # Smoke language models read the text shipped in the package (builtin:smoke).
    "gpt2_lm.py": {"wikitext2,smoke": None, "shakespeare,smoke": None},
    # The synthetic preset generates its data; adaptive exercises PonderTTT's two passes.
    "ttt_lm.py": {"synthetic,smoke": None, "synthetic,smoke,mode=adaptive": None,
                  "wikitext2,smoke,k=2": None, "shakespeare,smoke,mode=skip": None,
                  # The long-context presets and the recall task (issue 16).
                  "recall,smoke": None, "shakespeare_long,smoke": None,
                  "wikitext2_long,smoke": None},
    # SST-2 smokes read the slice packaged in ponder/data/assets/samples (sample:sst2)
    # with a vocabulary of its words and random init: offline, no MiniLM package. One
    # BERT and one DAN under the dendrite tracker (tests/train/test_phases.py runs its
    # cycles); the plain presets differ only in the policy.
    "dendritic_bert.py": {"minilm_gd,smoke": None, "dsn_cc,smoke": None},
    # ASNN-Goose: the spiking student with CTKD and FDD from an in-process random GPT-2
    # (the other presets differ only in distill.mode, model.spike and the FDD weight).
    "goose.py": {"spiking_ctkd_fdd,smoke": None},
    # Neural plasticity (issue 18): tests/test_plasticity_run.py runs the GPT-2 smoke's cycles.
    "plasticity.py": {"gpt2_wt2,smoke": None, "minilm_sst2,smoke": None},
    # MLM with learned perforation on the packaged text; no data needed.
    "perforation.py": {"mlm_perforated,smoke": None},
}


def test_every_config_file_has_a_smoke_test():
  files = {p.name for p in CONFIG_DIR.glob("*.py")} - {"__init__.py", "common.py"}
  assert files == set(SMOKE), "add the new config's smoke arguments to SMOKE"


@pytest.mark.parametrize("name,arg,make_data",
                         [(f, a, m) for f, args in SMOKE.items() for a, m in args.items()])
def test_smoke_config_runs_a_real_step(tmp_path, name, arg, make_data):
  cfg = cli.load_config_file(f"{CONFIG_DIR / name}:{arg}")
  if make_data is not None:
    cfg.data.data_dir = str(make_data(tmp_path / "data"))
    cfg.data.source = "local"
  cfg.trainer.update(total_steps=1, log_every=1, eval_every=1, ckpt_every=1)
  result = trainer.train_and_evaluate(cfg, str(tmp_path / "run"), echo=lambda s: None)
  assert int(result["state"].step) == 1
  headline = next(k for k in ("loss", "nll", "mlm_loss") if k in result)
  assert np.isfinite(result[headline])


def test_parse_arg_words_and_values():
  arg = common.parse_arg("cifar10,smoke,size=ti", preset="digits", smoke=False, size="s")
  assert (arg.preset, arg.smoke, arg.size) == ("cifar10", True, "ti")
  with pytest.raises(errors.ConfigError, match="valid: preset, size, smoke"):
    common.parse_arg("colour=red", preset="digits", smoke=False, size="s")


def test_config_overrides_are_checked_against_the_config():
  cfg = cli.load_config_file(f"{CONFIG_DIR / 'vit.py'}:smoke")
  cli.check_override(cfg, "optim.lr")
  with pytest.raises(errors.ConfigError, match="valid keys there: .*warmup_steps"):
    cli.check_override(cfg, "optim.warmup")
