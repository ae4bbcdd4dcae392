"""PonderTTT's reconstruction-loss gate (ponder/nn/ttt.py `ttt_scan_gated`): its outputs
are the switch / per-token programs' for the steps it reports, its decisions follow
the rule replayed here in numpy from its signals, its signals are the plain inner loss,
its calibration hits the target rate (and the EMA pulls a miscalibrated gate back),
and its analytic FLOPs match XLA's count."""

import functools

import chex
import jax
import numpy as np
import pytest

from ponder.analysis import cost_of
from ponder.nn import ttt
from tests.nn.test_ttt import FAST_COMPILE, make_inputs, scan_per_token, scan_static
from tests.nn.test_ttt import scan_switch

_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
MB = 4


@functools.partial(_jit, static_argnames=("kind", "form", "mini_batch"))
def scan_gated(*args, **kw):
  return ttt.ttt_scan_gated(*args, **kw)


def _plain_signal(state, xk, xv, scale, bias):
  """log mean_{heads, tokens} ||x_k + LN(x_k W + b) - x_v||^2 (TTT-Linear), in numpy."""
  z = np.einsum("bhtd,bhde->bhte", xk, state["W1"]) + state["b1"][:, :, None]
  z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + ttt.LN_EPS)
  err = xk + z * scale[:, None] + bias[:, None] - xv
  return np.log(np.square(err).sum(-1).mean((1, 2)))


def _replay(own, gate):
  """The decisions of `gate` from the returned per mini-batch signals own [n, batch]
  (ReconGate's rule), one row at a time or on the batch mean."""
  own = np.asarray(own, np.float64)
  n, batch = own.shape
  thresholds = np.asarray(gate.thresholds, np.float64)
  k_max, target = max(gate.buckets), float(gate.target_rate)
  prev, offset, rate = np.full(batch, np.inf), np.zeros(batch), np.full(batch, target)
  steps = np.zeros((n, batch), int)
  for i in range(n):
    signal = np.full(batch, prev.mean()) if gate.granularity == "batch" else prev
    bucket = (signal[:, None] > thresholds[None] + offset[:, None]).sum(-1)
    steps[i] = np.asarray(gate.buckets)[bucket]
    rate = float(gate.ema) * rate + (1 - float(gate.ema)) * steps[i] / k_max
    offset = offset + float(gate.gain) * (rate - target)
    prev = own[i]
  return steps


@pytest.mark.parametrize("form,buckets,target,granularity", [
    ("dual", (0, 1), (0.5, 0.5), "batch"), ("grad", (0, 1), (0.5, 0.5), "batch"),
    ("dual", (0, 1, 2), (0.3, 0.4, 0.3), "example")])
def test_gate_runs_the_steps_it_reports_by_its_rule(form, buckets, target, granularity):
  n = 4  # Mini-batches per row.
  inputs = make_inputs("linear", seq=n * MB)
  kw = dict(kind="linear", form=form, mini_batch=MB)
  _, _, (_, calibration) = scan_gated(*make_inputs("linear", seed=1, seq=n * MB),
                                      ttt.always_top(buckets), **kw)
  gate = ttt.calibrate_recon_gate(calibration, buckets, target, granularity)
  z, final, (steps, own) = scan_gated(*inputs, gate, **kw)
  steps = np.asarray(steps)
  np.testing.assert_array_equal(steps, _replay(own, gate))
  assert len(np.unique(steps)) > 1  # The case exercises the choice.
  if granularity == "batch":
    z_ref, final_ref = scan_switch(*inputs, steps[:, 0], allowed_steps=buckets, **kw)
  else:
    z_ref, final_ref = scan_per_token(*inputs, np.repeat(steps.T, MB, axis=1),
                                      max_steps=max(buckets), **kw)
  chex.assert_trees_all_close((z, final), (z_ref, final_ref), atol=1e-5)
  # A signal is the plain loss at the W its mini-batch starts from: W_0 for the first,
  # the previous mini-batches' final state (the reference programs') for the last.
  state, xq, xk, xv, eta, scale, bias = inputs
  prefix = [x[:, :, :(n - 1) * MB] for x in (xq, xk, xv, eta)]
  if granularity == "batch":
    _, last = scan_switch(state, *prefix, scale, bias, steps[:-1, 0],
                          allowed_steps=buckets, **kw)
  else:
    _, last = scan_per_token(state, *prefix, scale, bias,
                             np.repeat(steps[:-1].T, MB, axis=1), max_steps=max(buckets),
                             **kw)
  for i, start in ((0, state), (n - 1, last)):
    window = slice(i * MB, (i + 1) * MB)
    expected = _plain_signal(jax.tree.map(np.asarray, start), np.asarray(xk[:, :, window]),
                             np.asarray(xv[:, :, window]), np.asarray(scale),
                             np.asarray(bias))
    np.testing.assert_allclose(own[i], expected, rtol=1e-4, atol=1e-5)


def test_always_top_is_fixed_k():
  inputs = make_inputs("linear", seq=3 * MB)
  z, final, (steps, _) = scan_gated(*inputs, ttt.always_top((1, 2)), kind="linear",
                                    form="dual", mini_batch=MB)
  assert (np.asarray(steps) == 2).all()
  chex.assert_trees_all_close((z, final), scan_static(*inputs, kind="linear", form="dual",
                                                      mini_batch=MB, steps=2), atol=1e-6)


def test_calibration_hits_the_target_rate_and_the_ema_keeps_it():
  """Calibrated on one set of sequences, gated on another (192 mini-batch decisions):
  the realised update rate is the target's; with thresholds shifted far up (almost no
  update without feedback) the EMA pulls the rate most of the way back."""
  kw = dict(kind="linear", form="dual", mini_batch=MB)
  seq, batch = 48 * MB, 4
  buckets, target = (0, 1), (0.5, 0.5)
  _, _, (_, calibration) = scan_gated(*make_inputs("linear", seed=2, batch=batch, seq=seq),
                                      ttt.always_top(buckets), **kw)
  inputs = make_inputs("linear", seed=3, batch=batch, seq=seq)
  rates = {}
  for name, shift, gain in (("percentile", 0.0, 0.0), ("ema", 0.0, 1.0),
                            ("shifted", 1.0, 0.0), ("shifted_ema", 1.0, 1.0)):
    gate = ttt.calibrate_recon_gate(calibration, buckets, target, "example", gain=gain)
    gate = gate.replace(thresholds=gate.thresholds + shift)
    _, _, (steps, _) = scan_gated(*inputs, gate, **kw)
    rates[name] = float(np.asarray(steps).mean())
  assert abs(rates["percentile"] - 0.5) < 0.1, rates
  assert abs(rates["ema"] - 0.5) < 0.06, rates
  assert rates["shifted"] < 0.1, rates  # The shift alone all but stops the updates.
  assert abs(rates["shifted_ema"] - 0.5) < 0.5 * abs(rates["shifted"] - 0.5), rates


def test_signal_flops_match_xla():
  b, d = 16, 32
  state, _, xk, xv, _, scale, bias = make_inputs("linear", batch=1, heads=1, seq=b, dim=d)
  fn = functools.partial(ttt.recon_signal, kind="linear")
  flops = cost_of(_jit(fn).lower(state, xk, xv, scale, bias).compile())["flops"] / b
  analytic = ttt.recon_signal_flops_per_token(d)
  assert abs(flops - analytic) <= 0.1 * flops, (flops, analytic)
  # Cheaper than the update it gates (the entropy signal is a whole forward pass).
  assert analytic < ttt.inner_flops_per_token(1, d, form="dual", mini_batch=b) - (
      ttt.inner_flops_per_token(0, d, form="dual", mini_batch=b))
