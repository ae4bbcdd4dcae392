"""The spike validation suite: health counts on hand-made spikes, the MI estimator
against exact values and its bias, the held-out pairing, the report's checks, the
pictures, and a tiny spiking RWKV end to end."""

import json

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from models import rwkv
from ponder import errors
from ponder.analysis import spikes as sp
from tests.models import test_rwkv


def _health_inputs():
  a = np.zeros((10, 4), np.float32)
  a[:, 1] = 0.7  # Saturated.
  a[[0, 4, 9], 2] = 0.7  # 3 of 10.
  a[:5, 3] = -0.7  # 5 of 10, negative spikes fire too.
  b = np.zeros((10, 2), np.float32)
  b[::2, 0] = 1.0  # 5 of 10.
  b[:, 1] = -1.0  # Saturated.
  return {"blocks_0/att/key": a, "blocks_1/ffn/key": b}


def test_health_counts_over_batches():
  spikes = _health_inputs()
  stats = sp.spike_stats_init(spikes)
  for rows in (slice(0, 3), slice(3, 10)):  # Two batches, [batch, tokens, C] and [n, C].
    batch = {k: v[rows] for k, v in spikes.items()}
    batch["blocks_0/att/key"] = batch["blocks_0/att/key"][None]
    stats = sp.spike_stats_update(stats, batch)
  h = sp.spike_health(stats)
  site = h["sites"]["blocks_0/att/key"]
  chex.assert_trees_all_close(np.array(site["channel_rates"]), np.array([0.0, 1.0, 0.3, 0.5]))
  assert (site["dead"], site["saturated"], site["tokens"], site["layer"]) == (1, 1, 10, 0)
  assert h["layers"]["0"]["dead_fraction"] == 0.25
  assert h["layers"]["1"]["saturated_fraction"] == 0.5
  assert h["layers"]["1"]["histogram"][10] == 1 and h["layers"]["1"]["histogram"][-1] == 1
  assert sum(h["layers"]["0"]["histogram"]) == 4
  o = h["overall"]
  assert o["channels"] == 6
  np.testing.assert_allclose([o["rate"], o["dead_fraction"], o["saturated_fraction"]],
                             [(0 + 1 + 0.3 + 0.5 + 0.5 + 1) / 6, 1 / 6, 2 / 6])
  with pytest.raises(errors.ShapeError, match="sites"):
    sp.spike_stats_update(stats, {"blocks_0/att/key": spikes["blocks_0/att/key"]})


def _labels(rng, n, p):
  return rng.choice(len(p), size=n, p=p).astype(np.int32)


def test_mi_of_identical_variables_is_their_entropy():
  rng = np.random.default_rng(0)
  x = _labels(rng, 5000, [0.2, 0.5, 0.3])
  p = np.bincount(x) / x.size
  want = -np.sum(p * np.log2(p))
  np.testing.assert_allclose(sp.mutual_information(x, x), want, rtol=1e-10)
  np.testing.assert_allclose(sp.entropy(x), want, rtol=1e-10)
  # A relabelling (an invertible map) keeps all of the information.
  np.testing.assert_allclose(sp.mutual_information(x, (2 - x) * 3), want, rtol=1e-10)


def test_mi_of_independent_variables_is_near_zero_and_near_the_shuffle():
  rng = np.random.default_rng(1)
  n = 20000
  x, y = _labels(rng, n, [0.3, 0.4, 0.3]), _labels(rng, n, [1 / 8] * 8)
  mi, shuffle = sp.mutual_information(x, y), sp.shuffled_mi(x, y, repeats=4)
  bias = sp.mi_bias_bits(3, 8, n)
  assert 0 <= mi < 4 * bias and abs(mi - shuffle) < 3 * bias


def test_mi_decreases_through_a_noisier_channel():
  rng = np.random.default_rng(2)
  n = 20000
  x = _labels(rng, n, [0.3, 0.4, 0.3])
  mis = []
  for noise in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
    replaced = rng.random(n) < noise
    y = np.where(replaced, _labels(rng, n, [1 / 3] * 3), x)
    mis.append(sp.mutual_information(x, y))
  assert all(a > b for a, b in zip(mis, mis[1:])), mis
  assert mis[-1] < 0.002


def test_miller_madow_reduces_the_small_sample_bias():
  rng = np.random.default_rng(3)
  n, reps = 300, 200
  x = rng.integers(0, 3, (n, reps)).astype(np.int32)  # reps independent pairs, as columns.
  y = rng.integers(0, 8, (n, reps)).astype(np.int32)
  plug = sp.mutual_information(x, y).mean()
  mm = sp.mutual_information(x, y, correction="miller_madow").mean()
  bias = sp.mi_bias_bits(3, 8, n)  # 14 / (600 ln 2) = 0.034 bits
  assert 0.7 * bias < plug < 1.3 * bias
  assert abs(mm) < 0.2 * plug


def _planted(seed=4, n=4000, d=16, noise=0.5):
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(n, d))
  planted = np.array([7, 2, 11, 7])
  drive = teacher[:, planted] + noise * rng.normal(size=(n, planted.size))
  spikes = np.sign(drive) * (np.abs(drive) >= 0.5)
  return spikes.astype(np.float32), teacher.astype(np.float32), planted


def test_pairing_picks_the_planted_teacher_unit():
  spikes, teacher, planted = _planted()
  index, corr = sp.pair_channels(spikes, teacher)
  np.testing.assert_array_equal(index, planted)
  assert (np.abs(corr) > 0.5).all()
  r = sp.spike_teacher_mi(spikes, teacher, bins=8)
  np.testing.assert_array_equal(r["teacher_index"], planted)
  assert (r["excess"] > 0.3).all() and (np.abs(r["shuffle"]) < 0.02).all()
  assert r["tokens"] == 2000
  # A spiking channel driven by the teacher's first principal component.
  mix = np.random.default_rng(5).normal(size=(16, 16))
  pc = sp.teacher_directions(teacher @ mix, directions="pca", n_components=4)[1][:, 0]
  pc_spikes = np.sign((teacher @ mix - (teacher @ mix).mean(0)) @ pc)[:, None]
  r = sp.spike_teacher_mi(pc_spikes, teacher @ mix, directions="pca", n_components=4)
  assert r["teacher_index"][0] == 0 and r["excess"][0] > 0.7


def test_held_out_pairing_does_not_inflate_mi_of_independent_spikes():
  """Choosing the best of 64 teacher units for each channel would find chance
  dependence on the tokens it was chosen on; measured on the other half, the MI of
  independent spikes is as large as its shuffle."""
  rng = np.random.default_rng(6)
  spikes = rng.integers(-1, 2, (2000, 32)).astype(np.float32)
  teacher = rng.normal(size=(2000, 64))
  r = sp.spike_teacher_mi(spikes, teacher)
  assert abs(r["excess"].mean()) < 0.3 * r["bias_bits"]
  assert abs(r["mi"].mean() - r["bias_bits"]) < 0.3 * r["bias_bits"]


def _report_inputs(dead=0.0, saturated=0.0, rate=0.4, excess=0.3, cka=0.5):
  health = {"overall": {"channels": 10, "rate": rate, "dead_fraction": dead,
                        "saturated_fraction": saturated},
            "layers": {"0": {"rate": rate, "dead_fraction": dead,
                             "saturated_fraction": saturated,
                             "histogram": [0] * 8 + [10] + [0] * 11}},
            "bins": sp.RATE_BINS.tolist()}
  mi = {"overall": {"excess_bits": excess}}
  cka_ = sp.cka_summary([[cka, 0.1], [0.2, cka]], [0, 1], {0: 0, 1: 1})
  return health, mi, cka_


def test_report_checks_against_the_seed_thresholds():
  rep = sp.report(*_report_inputs())
  assert rep["passed"] and all(c["pass"] for c in rep["checks"].values())
  assert rep["thresholds"] == sp.THRESHOLDS
  failing = {"dead_fraction": dict(dead=0.05), "saturated_fraction": dict(saturated=0.12),
             "mi_excess_bits": dict(excess=0.1), "cka_mean": dict(cka=0.29),
             "firing_rate": dict(rate=0.65)}
  for name, kw in failing.items():
    rep = sp.report(*_report_inputs(**kw))
    assert not rep["passed"]
    assert [k for k, c in rep["checks"].items() if not c["pass"]] == [name]
  assert not sp.report(*_report_inputs(rate=0.1))["checks"]["firing_rate"]["pass"]
  assert sp.report(*_report_inputs(rate=0.65), thresholds={"rate_max": 0.7})["passed"]


def test_write_report_writes_json_and_pictures(tmp_path):
  health = sp.spike_health(sp.spike_stats_update(
      sp.spike_stats_init(_health_inputs()), _health_inputs()))
  _, mi, cka_ = _report_inputs()
  paths = sp.write_report(sp.report(health, mi, cka_), tmp_path / "eval")
  assert json.loads((tmp_path / "eval" / "spikes.json").read_text())["checks"]
  for name in ("firing_rates.png", "cka.png"):
    data = (tmp_path / "eval" / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
  assert set(paths) == {"json", "firing_rates", "cka"}


def test_default_layer_map_is_proportional_depth():
  assert sp.default_layer_map([0, 1], 3) == {0: 1, 1: 2}
  # A 5-layer student of a 12-layer teacher (13 hidden states): the seed's {0: 2, 2: 7}.
  assert sp.default_layer_map(range(5), 13) == {0: 2, 1: 5, 2: 7, 3: 10, 4: 12}


def test_spike_report_end_to_end_on_a_tiny_spiking_rwkv(tmp_path):
  """A tiny spiking RWKV against its dense counterpart (the same random parameters) as
  the teacher, each student layer paired with the teacher's input to that block: the
  attention sites' spikes are thresholded mixes of that hidden state, so their MI is
  far above the shuffle, and CKA is well above 0. The collected spikes agree
  with the rates the layers sow."""
  sd = test_rwkv.random_state_dict(seed=3)  # 2 layers, width 32, channel-mix width 80.
  student, params = rwkv.from_state_dict(sd, spike="ternary")
  teacher, teacher_params = rwkv.from_state_dict(sd)
  ids = jax.random.randint(jax.random.key(0), (4, 4, 32), 0, student.config.vocab_size)
  hidden = jax.jit(lambda b: teacher.apply({"params": teacher_params}, b,
                                           output_hidden_states=True)[1]["hidden_states"])
  apply = sp.spiking_apply(student, params)

  got = apply(ids[0])
  assert sorted(got) == sorted(f"blocks_{i}/{m}/{p}" for i in range(2)
                               for m, p in (("att", "key"), ("att", "value"),
                                            ("att", "receptance"), ("ffn", "key"),
                                            ("ffn", "value")))
  chex.assert_shape(got["blocks_1/ffn/value"], (4, 32, 80))
  _, inter = jax.jit(lambda b: student.apply({"params": params}, b,
                                           mutable=["intermediates"]))(ids[0])
  sown = inter["intermediates"]["blocks_0"]["att"]["key"]["spike_rate"][0]
  np.testing.assert_allclose(np.mean(np.asarray(got["blocks_0/att/key"]) != 0), sown,
                             rtol=1e-6)

  rep = sp.spike_report(apply, hidden, ids, layer_map={0: 0, 1: 1}, mi_bins=4,
                        cka_tokens=64, max_batches=3)
  assert rep["health"]["sites"]["blocks_0/att/key"]["tokens"] == 3 * 128
  for site in ("blocks_0/att/key", "blocks_0/att/value", "blocks_0/att/receptance"):
    r = rep["mi"]["sites"][site]
    assert r["excess_bits"] > 0.3 and abs(r["shuffle_mm_bits"]) < 0.02
  assert rep["cka"]["pairs"] == [["0", 0], ["1", 1]] and rep["cka"]["batches"] == 3
  m = np.asarray(rep["cka"]["matrix"])
  assert m.shape == (2, 3) and np.isfinite(m).all()
  assert (m > 0).all() and (m <= 1).all() and rep["cka"]["mean"] > 0.3
  assert set(rep["checks"]) == {"dead_fraction", "saturated_fraction", "mi_excess_bits",
                                "cka_mean", "firing_rate"}
  assert rep["passed"] == all(c["pass"] for c in rep["checks"].values())
  sp.write_report(rep, tmp_path)
  assert {p.name for p in tmp_path.iterdir()} == {"spikes.json", "firing_rates.png",
                                                  "cka.png"}
  with pytest.raises(errors.ConfigError, match="layer_map"):
    sp.spike_report(apply, hidden, ids, layer_map={0: 5}, max_batches=1)


def test_spiking_apply_collects_lif_spikes():
  """LIF spikes (binary, membranes carried along the tokens) are collected as the
  layers fire them: their rates equal the sown spike_rate of every site."""
  sd = test_rwkv.random_state_dict(seed=5, layers=1)
  for key in sd:  # Larger mixes of the input so that LIF neurons fire.
    if key.endswith(("key.weight", "value.weight", "receptance.weight")):
      sd[key] = 3 * sd[key]
  model, params = rwkv.from_state_dict(sd, spike="lif")
  ids = jax.random.randint(jax.random.key(0), (2, 12), 0, model.config.vocab_size)
  got = sp.spiking_apply(model, params)(ids)
  _, inter = jax.jit(lambda b: model.apply({"params": params}, b,
                                           mutable=["intermediates"]))(ids)
  sown = {"/".join(p[:-1]): v[0] for p, v in
          traverse_util.flatten_dict(inter["intermediates"]).items()}
  assert set(got) == set(sown) and len(got) == 5
  for k, s in got.items():
    s = np.asarray(s)
    assert set(np.unique(s)) <= {0.0, 1.0}
    np.testing.assert_allclose(np.mean(s != 0), sown[k], rtol=1e-6, err_msg=k)
  assert any(np.asarray(s).any() for s in got.values())
