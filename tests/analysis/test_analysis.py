"""ponder.analysis against independent references; the PyTorch ViT peer against ponder's.

FLOPs: the analytic ViT count must equal the matmul work read off the traced program
(every dot_general and convolution in the jaxpr), and sit within a few percent of
XLA's compiled count, which adds the elementwise work. The PyTorch peer must have the
same parameter count and, with ponder's weights, the same logits: that is what makes
benchmarks/vit_throughput.py compare like with like.
"""

import math

import chex
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from models import vit
from ponder import analysis
from ponder import errors

SEED_CLAIM = 321_558_272  # The seed document's "FLOPs: 321,558,272 (0.32 GFLOPs)".
# (image, channels, patch, width, depth, heads, classes, qkv_bias); the first is the seed's.
CONFIGS = [(32, 3, 4, 256, 6, 8, 10, False), (8, 1, 2, 64, 4, 4, 10, True),
           (28, 1, 7, 48, 2, 3, 100, True)]


def _vit(image, channels, patch, width, depth, heads, classes, qkv_bias):
  model = vit.ViT(num_classes=classes, patch=patch, width=width, depth=depth, heads=heads,
                  qkv_bias=qkv_bias)
  shape = (1, image, image, channels)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  kwargs = dict(image_size=image, patch=patch, channels=channels, width=width, depth=depth,
                mlp_dim=4 * width, num_classes=classes)
  return model, params, jax.ShapeDtypeStruct(shape, jnp.float32), kwargs


def _jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of every dot_general and convolution, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += out * math.prod(lhs[d] for d in contract)
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += out * math.prod(kernel) // out_features
    total += sum(_jaxpr_macs(sub) for sub in jex.jaxprs_in_params(eqn.params))
  return total


def test_count_params_concrete_and_abstract():
  tree = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "nested": [jnp.ones((2, 2, 2)), jnp.ones(())]}
  assert analysis.count_params(tree) == 12 + 4 + 8 + 1
  assert analysis.count_params(jax.eval_shape(lambda: tree)) == 25


def test_count_params_seed_vit_matches_seed_document():
  _, params, _, _ = _vit(*CONFIGS[0])
  assert analysis.count_params(params) == 4_766_474  # The seed document's count.


def test_compiled_flops_of_a_matmul_plain_and_jitted():
  a, b = jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32)
  assert analysis.compiled_flops(jnp.matmul, a, b) == 2 * 64 * 32 * 16
  assert analysis.compiled_flops(jax.jit(jnp.matmul), a, b) == 2 * 64 * 32 * 16


class _FakeCompiled:

  def __init__(self, analysis_):
    self._analysis = analysis_

  def cost_analysis(self):
    return self._analysis


def test_cost_of_merges_per_module_lists_and_rejects_missing_flops():
  merged = analysis.cost_of(_FakeCompiled([{"flops": 3.0}, {"flops": 4.0, "bytes accessed": 8.0}]))
  assert merged == {"flops": 7.0, "bytes accessed": 8.0}
  with pytest.raises(errors.PonderError, match="no FLOP count"):
    analysis.cost_of(_FakeCompiled(None))


@pytest.mark.parametrize("config", CONFIGS)
def test_vit_macs_equal_the_traced_matmul_work(config):
  model, params, image, kwargs = _vit(*config)
  traced = jax.make_jaxpr(lambda p, x: model.apply(p, x))(params, image)
  assert analysis.vit_macs(**kwargs) == _jaxpr_macs(traced.jaxpr)
  assert analysis.vit_flops(**kwargs) == 2 * analysis.vit_macs(**kwargs)


def test_vit_flops_within_a_few_percent_of_compiled_on_the_seed_config():
  model, params, image, kwargs = _vit(*CONFIGS[0])
  compiled = analysis.compiled_flops(lambda p, x: model.apply(p, x), params, image)
  analytic = analysis.vit_flops(**kwargs)
  # XLA also counts norms, softmax, GELU and additions, which the analytic count omits.
  assert analytic <= compiled <= 1.06 * analytic


def test_seed_claim_is_a_mac_count():
  macs = analysis.vit_macs(**_vit(*CONFIGS[0])[3])
  assert macs == 320_476_672
  # The claim is 0.34% above the MAC count and half the FLOP count: it counts MACs.
  assert abs(SEED_CLAIM / macs - 1) < 0.005
  assert abs(SEED_CLAIM / (2 * macs) - 0.5) < 0.005


def test_vit_macs_rejects_a_patch_that_does_not_tile_the_image():
  with pytest.raises(errors.ConfigError, match="not divisible"):
    analysis.vit_macs(image_size=30, patch=4, channels=3, width=8, depth=1, mlp_dim=32,
                      num_classes=2)


def test_measure_warms_up_syncs_every_call_and_reports_the_median():
  calls, synced = [], []
  result = analysis.measure(lambda: calls.append(1) or len(calls), warmup=2, runs=5,
                            sync=synced.append)
  assert len(calls) == 7 and synced == [1, 2, 3, 4, 5, 6, 7]
  assert len(result["times_s"]) == 5
  assert result["median_s"] == float(np.median(result["times_s"]))
  assert result["min_s"] <= result["median_s"] <= result["max_s"]
  with pytest.raises(errors.ConfigError, match="runs >= 1"):
    analysis.measure(lambda: None, runs=0)


def test_measure_interleaved_takes_turns():
  order = []
  result = analysis.measure_interleaved(
      {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, runs=2)
  assert order == ["a", "b"] * 3
  assert set(result) == {"a", "b"} and all(len(r["times_s"]) == 2 for r in result.values())


def test_op_profile_attributes_time_to_the_compiled_program_s_ops():
  """A 512^3 matmul beside a 4-element add: the profile must name instructions of the
  compiled module (with shapes and jax sources from its HLO), put the matmul first,
  and leave out a second program that runs in the same call."""
  @jax.jit
  def main(a, b, c):  # Modules are named after their function: jit_main.
    return jnp.tanh(a @ b), c + 1.0

  @jax.jit
  def other(a):
    return a * 2.0

  a, c = jnp.ones((512, 512)), jnp.ones((4,))
  compiled = main.lower(a, a, c).compile()
  run = lambda: (compiled(a, a, c), other(a))
  jax.block_until_ready(run())
  module = analysis.hlo_module_name(compiled)
  assert module == "jit_main"
  seconds = analysis.op_profile(run, module=module, runs=2)
  info = analysis.hlo_op_info(compiled)
  assert seconds and set(seconds) <= set(info), (seconds, sorted(info))
  assert list(seconds.values()) == sorted(seconds.values(), reverse=True)
  top = info[next(iter(seconds))]
  assert top["shape"] == "f32[512,512]" and "dot_general" in top["source"], top
  everything = analysis.op_profile(run, runs=1)
  assert len(everything) > len(seconds)  # The other program's multiply is in there.
  with pytest.raises(errors.ConfigError, match="runs >= 1"):
    analysis.op_profile(run, runs=0)


def test_latency_throughput_and_matmul_peak_are_positive_rates():
  speed = analysis.latency_and_throughput(lambda p, x: x @ p, jnp.ones((8, 4)), (8,),
                                          batch_size=16, warmup=1, runs=2)
  assert speed["latency_s"] > 0 and speed["items_per_s"] > 0 and speed["batch_size"] == 16
  assert 0 < analysis.matmul_peak_flops((32, 64), warmup=1, runs=2) < float("inf")


def _torch_peer(image, channels, patch, width, depth, heads, classes, qkv_bias):
  pytest.importorskip("torch", reason="the PyTorch peer needs torch: pip install -e .[bench]")
  from benchmarks import torch_vit
  return torch_vit, torch_vit.ViT(num_classes=classes, image_size=image, channels=channels,
                                  patch=patch, width=width, depth=depth, heads=heads,
                                  qkv_bias=qkv_bias)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_torch_peer_has_the_parameter_count_of_ponder_vit(qkv_bias):
  config = CONFIGS[0][:-1] + (qkv_bias,)
  _, peer = _torch_peer(*config)
  _, params, _, _ = _vit(*config)
  assert sum(p.numel() for p in peer.parameters()) == analysis.count_params(params)


@pytest.mark.parametrize("config", [CONFIGS[0], (12, 1, 3, 32, 2, 4, 7, True)])
def test_torch_peer_with_ponder_weights_gives_ponder_logits(config):
  torch_vit, peer = _torch_peer(*config)
  model, abstract, image, _ = _vit(*config)
  # Random weights everywhere: a fresh init's zero head and zero biases hide mistakes.
  # Norm scales near 1 keep the logits O(1), so the tolerance is a relative one.
  rng = np.random.default_rng(0)
  params = jax.tree.map_with_path(
      lambda path, s: (path[-1].key == "scale") + rng.normal(0, 0.05, s.shape).astype(np.float32),
      abstract)
  images = rng.normal(size=(2, *image.shape[1:])).astype(np.float32)
  torch_vit.load_flax_params(peer, params["params"])
  import torch
  with torch.no_grad():
    torch_logits = peer(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  chex.assert_trees_all_close(torch_logits, np.asarray(model.apply(params, images)),
                              atol=1e-4, rtol=0)


def test_training_curves_draws_one_panel_per_metric(tmp_path):
  rows = [dict(step=s, split="train", time=0.0, loss=1.0 / s, lr=1e-3, steps_per_s=5.0,
               finite=True) for s in (1, 2, 3)]
  rows.append(dict(step=3, split="eval", time=0.0, loss=0.5, perplexity=1.6, tokens=10))
  path = tmp_path / "curves.png"
  assert analysis.plots.training_curves(rows, str(path), title="t") == [
      "loss", "lr", "perplexity"]
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert analysis.plots.training_curves([], str(tmp_path / "none.png")) == []
  assert not (tmp_path / "none.png").exists()
