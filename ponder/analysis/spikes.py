"""Spike health, spike-teacher mutual information and CKA: the validation suite of the
ASNN-Goose spiking student (the seed's v15 "SpikingBrain" checks), with its thresholds:

  dead channels < 5%, saturated channels < 10%, MI > 0.1 bits, CKA > 0.3,
  mean firing rate in [0.2, 0.6].

Spikes are the values a spiking unit feeds its matmul, [tokens, channels] per site
(`spiking_apply` collects them from any flax model built on
`ponder.nn.spiking.SpikingDense`, e.g. `models.rwkv` with spike="ternary"|"lif"). A
channel *fires* on a token when its spike is nonzero.

Health (`SpikeStats`, a pure accumulator of per-channel counts, so it runs over any
number of batches): a channel's firing rate is the fraction of tokens on which it
fires; it is *dead* if it never fires over the evaluation set and *saturated* if it
never stays silent. Rates are summarised per site, per layer (a histogram over fixed
bins, `RATE_BINS`) and overall (the mean over channels).

Mutual information (`spike_teacher_mi`), by binning: a spike takes one of the states
sign(s) in {-1, 0, +1} (K = 3; LIF spikes use 2 of them), the teacher feature is cut
into L equal-mass bins (quantiles, L = 8 by default), and the plug-in estimator

  I(S; H) = sum_{s,h} p(s, h) log2 p(s, h) / (p(s) p(h))

is taken on the empirical frequencies. It is biased upwards: for independent variables
on n samples its expectation is about (K - 1)(L - 1) / (2 n ln 2) bits (Miller 1955;
Panzeri & Treves 1996), 0.025 bits for K = 3, L = 8, n = 400. Two guards are reported:
the Miller-Madow correction, which subtracts (m_SH - m_S - m_H + 1) / (2 n ln 2) with m
the numbers of occupied cells (the bias above when every cell is occupied), and a
shuffled-pairs baseline, the MI of the spikes against a random permutation of the
teacher's rows: it has the same marginals and the same bias but no dependence, so only
MI above the shuffle means something. The MI check of the report uses that excess,
mean over channels of (plug-in MI - plug-in shuffled MI).

Which teacher feature a student channel is paired with: the tokens are split at random
into two halves. On the first (selection) half each spiking channel is paired with the
teacher direction whose values have the largest absolute Pearson correlation with the
channel's spike values: a hidden unit of the mapped teacher layer (directions="units"),
or one of its top principal components fitted on that half (directions="pca"). MI is
then measured on the other half only, so the search over directions, which would pick
up chance dependence, does not inflate the reported MI (nor its shuffle baseline).
Correlation finds monotone relations, which is what a thresholded (sign) code of a
linear projection of the same residual stream produces.

CKA (`ponder.analysis.cka`, minibatch CKA, debiased HSIC): a student layer's
representation is the concatenation of its sites' spike values, a teacher layer's its
hidden state; the report holds the student x teacher matrix and its check uses the
mean over the mapped pairs (`layer_map`: student layer -> teacher hidden-state index;
by default proportional depth).

`spike_report` runs all of it over batches from two callables (the student's spikes,
the teacher's hidden states), `report` turns metrics into checks and `write_report`
writes spikes.json, firing_rates.png and cka.png.
"""

import json
import math
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels import ternary as tk
from ponder import errors
from ponder.analysis import cka as cka_lib
from ponder.analysis import plots
from ponder.nn import spiking

# The seed's success criteria (v15): fractions of channels, bits, CKA, firing rate.
THRESHOLDS = {"dead_max": 0.05, "saturated_max": 0.10, "mi_min_bits": 0.1,
              "cka_min": 0.3, "rate_min": 0.2, "rate_max": 0.6}
RATE_BINS = np.linspace(0.0, 1.0, 21)  # Edges of the channel firing-rate histogram.
MI_DIRECTIONS = ("units", "pca")
SPIKE_STATES = 3  # sign(s) in {-1, 0, +1}.


def layer_index(name: str):
  """The layer of a spiking site from its module path: the first integer in it
  ("blocks_3/att/key" -> 3); a name without one is its own layer."""
  m = re.search(r"(\d+)", name)
  return int(m.group(1)) if m else name


def _flat(x) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape(-1, x.shape[-1])


# --- Collecting spikes -------------------------------------------------------------------


def _sow_spikes(next_fun, args, kwargs, context):
  """Method interceptor: after a `SpikingDense` call, sows the spikes it multiplied
  (the same function of its input and parameters as inside the layer)."""
  out = next_fun(*args, **kwargs)
  mod = context.module
  if isinstance(mod, spiking.SpikingDense) and context.method_name == "__call__":
    x = jnp.asarray(args[0]).astype(mod.dtype)
    if mod.spike == "ternary":
      p = mod.variables["params"]["spike"]
      s = p["alpha"].astype(mod.dtype) * tk.ternarize(x, p["theta"].astype(mod.dtype))
    else:
      v = args[1] if len(args) > 1 else kwargs.get("v")
      s, _ = spiking.lif(x, v, tau=mod.lif_tau, threshold=mod.lif_threshold,
                         surrogate_alpha=mod.surrogate_alpha)
    mod.sow("intermediates", "spikes", s)
  return out


def spiking_apply(model: nn.Module, params, **apply_kwargs) -> Callable:
  """A jitted `inputs -> {site: spikes [..., channels]}` for a flax model built on
  `ponder.nn.spiking.SpikingDense`: every such layer's input spikes, keyed by its
  module path ("blocks_0/att/key"). `apply_kwargs` go to `model.apply`."""
  @jax.jit
  def run(params, inputs):
    with nn.intercept_methods(_sow_spikes):
      _, state = model.apply({"params": params}, inputs, mutable=["intermediates"],
                             **apply_kwargs)
    flat = flax.traverse_util.flatten_dict(state.get("intermediates", {}))
    return {"/".join(p[:-1]): v[0] for p, v in flat.items() if p[-1] == "spikes"}

  return lambda inputs: run(params, inputs)


# --- Health ------------------------------------------------------------------------------


@flax.struct.dataclass
class SpikeStats:
  """Per site: how many tokens each channel fired on (fired [channels]) out of how many
  tokens it saw (tokens [])."""
  fired: dict
  tokens: dict


def spike_stats_init(widths: Mapping[str, Any]) -> SpikeStats:
  """Empty counts for sites {name: channels} (or {name: an array [..., channels]})."""
  widths = {k: v if isinstance(v, int) else int(np.shape(v)[-1]) for k, v in widths.items()}
  return SpikeStats({k: jnp.zeros((c,), jnp.int32) for k, c in widths.items()},
                    {k: jnp.zeros((), jnp.int32) for k in widths})


def spike_stats_update(stats: SpikeStats, spikes: Mapping[str, jax.Array]) -> SpikeStats:
  """Adds one batch: spikes {site: [..., channels]} (leading axes are tokens)."""
  if set(spikes) != set(stats.fired):
    raise errors.ShapeError(f"spike sites {sorted(spikes)} differ from the accumulator's "
                            f"{sorted(stats.fired)}.")
  fired, tokens = {}, {}
  for k, s in spikes.items():
    s = jnp.asarray(s)
    if s.shape[-1] != stats.fired[k].shape[0]:
      raise errors.ShapeError(f"{k}: {s.shape[-1]} channels, the accumulator has "
                              f"{stats.fired[k].shape[0]}.")
    s = s.reshape(-1, s.shape[-1])
    fired[k] = stats.fired[k] + jnp.sum(s != 0, axis=0, dtype=jnp.int32)
    tokens[k] = stats.tokens[k] + s.shape[0]
  return SpikeStats(fired, tokens)


def _fractions(rates: np.ndarray, fired: np.ndarray, tokens: np.ndarray) -> dict:
  return {"channels": int(rates.size), "rate": float(rates.mean()),
          "dead_fraction": float(np.mean(fired == 0)),
          "saturated_fraction": float(np.mean(fired == tokens))}


def spike_health(stats: SpikeStats, *, layer_of: Callable = layer_index,
                 bins: np.ndarray = RATE_BINS) -> dict:
  """Firing rates, dead and saturated channels per site, per layer and overall.

  Returns {"sites": {site: {layer, channels, tokens, rate, dead, saturated,
  dead_fraction, saturated_fraction, channel_rates}}, "layers": {layer: {channels,
  rate, dead_fraction, saturated_fraction, histogram}}, "overall": {...}, "bins"}.
  "rate" is the mean over channels of the channel firing rates; "histogram" counts a
  layer's channels per firing-rate bin (`bins` edges; the last bin includes 1).
  """
  sites, by_layer = {}, {}
  for k in stats.fired:
    fired = np.asarray(stats.fired[k])
    n = int(stats.tokens[k])
    if n == 0:
      raise errors.ShapeError(f"site {k} saw no tokens.")
    rates = fired / n
    layer = layer_of(k)
    sites[k] = {"layer": layer, "tokens": n, **_fractions(rates, fired, n),
                "dead": int(np.sum(fired == 0)), "saturated": int(np.sum(fired == n)),
                "channel_rates": rates.tolist()}
    by_layer.setdefault(layer, []).append((rates, fired, np.full_like(fired, n)))
  layers, everything = {}, []
  for layer, parts in by_layer.items():
    rates, fired, tokens = (np.concatenate(p) for p in zip(*parts))
    everything.append((rates, fired, tokens))
    layers[str(layer)] = {**_fractions(rates, fired, tokens),
                          "histogram": np.histogram(rates, bins)[0].tolist()}
  rates, fired, tokens = (np.concatenate(p) for p in zip(*everything))
  return {"sites": sites, "layers": layers, "overall": _fractions(rates, fired, tokens),
          "bins": np.asarray(bins).tolist()}


# --- Mutual information ------------------------------------------------------------------


def spike_states(spikes) -> np.ndarray:
  """sign(s) + 1 in {0, 1, 2} (silent = 1): the discrete states of a spike."""
  return (np.sign(np.asarray(spikes)) + 1).astype(np.int32)


def equal_mass_bins(values, bins: int = 8) -> np.ndarray:
  """Per column of values [n, d] (or [n]), labels in 0..bins-1 cutting the column at
  its empirical quantiles, so each bin holds n / bins values (ties can merge bins)."""
  values = np.asarray(values, np.float64)
  col = values.ndim == 1
  v = values[:, None] if col else values
  edges = np.quantile(v, np.arange(1, bins) / bins, axis=0)  # [bins - 1, d]
  labels = np.zeros(v.shape, np.int32)
  for e in edges:
    labels += v > e[None, :]
  return labels[:, 0] if col else labels


def _check_labels(x, name):
  x = np.asarray(x)
  if x.ndim not in (1, 2) or not np.issubdtype(x.dtype, np.integer) or (x.size and x.min() < 0):
    raise errors.ShapeError(f"{name} must be non-negative integer labels [n] or "
                            f"[n, columns]; got {x.dtype} {x.shape}.")
  return x


def _mi_columns(x, y, correction: str) -> np.ndarray:
  """MI in bits between matching columns of integer labels x, y [n, c]."""
  if correction not in ("none", "miller_madow"):
    raise errors.unknown_key("MI correction", correction, ("none", "miller_madow"))
  n, c = x.shape
  kx, ky = int(x.max()) + 1, int(y.max()) + 1
  offset = (np.arange(c) * kx * ky)[None, :]
  joint = np.bincount((x * ky + y + offset).ravel(), minlength=c * kx * ky)
  joint = joint.reshape(c, kx, ky).astype(np.float64)
  pxy = joint / n
  px, py = pxy.sum(2, keepdims=True), pxy.sum(1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(pxy > 0, pxy * np.log2(pxy / (px * py)), 0.0)
  mi = terms.sum((1, 2))
  if correction == "miller_madow":
    cells = lambda p: np.sum(p > 0, axis=tuple(range(1, p.ndim)))
    mi = mi - (cells(pxy) - cells(px) - cells(py) + 1) / (2 * n * math.log(2))
  return mi


def mutual_information(x, y, *, correction: str = "none"):
  """Plug-in MI in bits between integer labels x and y ([n], or [n, c] column by
  column: then [c]). correction="miller_madow" subtracts the first-order bias
  (m_xy - m_x - m_y + 1) / (2 n ln 2), m the occupied cells (module docstring)."""
  x, y = _check_labels(x, "x"), _check_labels(y, "y")
  if x.shape != y.shape:
    raise errors.ShapeError(f"x {x.shape} and y {y.shape} must have the same shape.")
  col = x.ndim == 1
  mi = _mi_columns(x[:, None] if col else x, y[:, None] if col else y, correction)
  return float(mi[0]) if col else mi


def entropy(x, *, correction: str = "none") -> float:
  """Plug-in entropy in bits of integer labels [n] (= I(X; X)); Miller-Madow adds
  (m - 1) / (2 n ln 2)."""
  return mutual_information(x, x, correction=correction)


def mi_bias_bits(k: int, l: int, n: int) -> float:
  """Expected plug-in MI of independent variables with k and l states on n samples,
  to first order: (k - 1)(l - 1) / (2 n ln 2) bits."""
  return (k - 1) * (l - 1) / (2 * n * math.log(2))


def shuffled_mi(x, y, *, seed: int = 0, repeats: int = 1, correction: str = "none"):
  """MI of x against y with y's rows randomly permuted (the no-dependence baseline with
  the same marginals), averaged over `repeats` permutations."""
  y = np.asarray(y)
  rng = np.random.default_rng(seed)
  values = [mutual_information(x, y[rng.permutation(y.shape[0])], correction=correction)
            for _ in range(repeats)]
  return sum(values) / repeats


def _standardise(x):
  x = x - x.mean(0, keepdims=True)
  sd = x.std(0, keepdims=True)
  return np.where(sd > 0, x / np.where(sd > 0, sd, 1.0), 0.0)


def teacher_directions(teacher, *, directions: str = "units", n_components: int = 16):
  """(mean [d], basis [d, m]) of the teacher directions to pair with: the hidden units
  (identity) or the top `n_components` principal components of teacher [n, d]."""
  if directions not in MI_DIRECTIONS:
    raise errors.unknown_key("MI teacher directions", directions, MI_DIRECTIONS)
  teacher = np.asarray(teacher, np.float64)
  mean = teacher.mean(0)
  if directions == "units":
    return mean, np.eye(teacher.shape[1])
  _, _, vt = np.linalg.svd(teacher - mean, full_matrices=False)
  return mean, vt[:n_components].T


def pair_channels(spikes, features) -> tuple[np.ndarray, np.ndarray]:
  """For each student channel of spikes [n, c], the column of features [n, m] with the
  largest |Pearson correlation| to its spike values: (index [c], correlation [c]).
  A channel or feature that is constant has correlation 0 with everything."""
  s = _standardise(np.asarray(spikes, np.float64))
  f = _standardise(np.asarray(features, np.float64))
  corr = s.T @ f / s.shape[0]  # [c, m]
  index = np.argmax(np.abs(corr), axis=1)
  return index, corr[np.arange(corr.shape[0]), index]


def spike_teacher_mi(spikes, teacher, *, bins: int = 8, seed: int = 0,
                     directions: str = "units", n_components: int = 16) -> dict:
  """MI between each spiking channel and its paired teacher direction (module docstring:
  paired on a random half of the tokens, measured on the other half).

  Args:
    spikes: [n, c] spike values of one site (or [..., c]).
    teacher: [n, d] hidden states of the mapped teacher layer for the same tokens.
    bins: equal-mass bins of the teacher feature.
    seed: the token split and the shuffle.
    directions: "units" (teacher hidden units) or "pca" (top `n_components` PCs).

  Returns:
    per channel: "mi", "mi_mm" (Miller-Madow), "shuffle", "shuffle_mm", "excess"
    (mi - shuffle), "teacher_index", "correlation" (on the selection half); and
    "tokens" (measurement half), "bias_bits" ((K-1)(L-1)/(2 n ln 2), K = 3).
  """
  spikes, teacher = _flat(spikes), _flat(teacher)
  n = spikes.shape[0]
  if teacher.shape[0] != n:
    raise errors.ShapeError(f"spikes have {n} tokens, the teacher {teacher.shape[0]}.")
  if n < 4 * bins:
    raise errors.ShapeError(f"{n} tokens are too few for MI over {bins} bins; use at least "
                            f"{4 * bins} (and thousands for a small bias).")
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  sel, meas = order[: n // 2], order[n // 2:]
  mean, basis = teacher_directions(teacher[sel], directions=directions,
                                   n_components=n_components)
  project = lambda h: (np.asarray(h, np.float64) - mean) @ basis
  index, corr = pair_channels(spikes[sel], project(teacher[sel]))
  x = spike_states(spikes[meas])
  y = equal_mass_bins(project(teacher[meas])[:, index], bins)
  y_shuffled = y[rng.permutation(y.shape[0])]
  out = {"mi": _mi_columns(x, y, "none"), "mi_mm": _mi_columns(x, y, "miller_madow"),
         "shuffle": _mi_columns(x, y_shuffled, "none"),
         "shuffle_mm": _mi_columns(x, y_shuffled, "miller_madow"),
         "teacher_index": index, "correlation": corr}
  out["excess"] = out["mi"] - out["shuffle"]
  out.update(tokens=int(len(meas)), bias_bits=mi_bias_bits(SPIKE_STATES, bins, len(meas)))
  return out


_MI_KEYS = ("mi", "mi_mm", "shuffle", "shuffle_mm", "excess")


def mi_summary(per_site: Mapping[str, dict], *, layer_of: Callable = layer_index) -> dict:
  """Means over channels of `spike_teacher_mi` results, per site, per layer and overall
  ("excess_bits" = mean of mi - shuffle, the number the MI check uses)."""
  mean = lambda parts, k: float(np.mean(np.concatenate([p[k] for p in parts])))
  summarise = lambda parts: {**{f"{k}_bits": mean(parts, k) for k in _MI_KEYS},
                             "channels": int(sum(len(p["mi"]) for p in parts))}
  sites = {k: {**summarise([r]), "layer": layer_of(k), "tokens": r["tokens"],
               "bias_bits": r["bias_bits"],
               "teacher_index": np.asarray(r["teacher_index"]).tolist(),
               "channel_mi_bits": np.asarray(r["mi"]).tolist()}
           for k, r in per_site.items()}
  by_layer = {}
  for k, r in per_site.items():
    by_layer.setdefault(str(layer_of(k)), []).append(r)
  return {"sites": sites, "layers": {l: summarise(p) for l, p in by_layer.items()},
          "overall": summarise(list(per_site.values()))}


# --- CKA ---------------------------------------------------------------------------------


def default_layer_map(student_layers: Sequence, teacher_layers: int) -> dict:
  """Proportional depth: student layer i of n (in order) -> teacher hidden state
  round((i + 1) (T - 1) / n) of T (index 0 being the embeddings)."""
  n = len(student_layers)
  return {l: int(round((i + 1) * (teacher_layers - 1) / n))
          for i, l in enumerate(student_layers)}


def cka_summary(matrix, student_layers: Sequence, layer_map: Mapping) -> dict:
  """The CKA matrix [student layers, teacher layers] with the mean over the mapped
  (student layer, teacher layer) pairs, the number the CKA check uses."""
  matrix = np.asarray(matrix, np.float64)
  rows = {l: i for i, l in enumerate(student_layers)}
  pairs = [[str(l), int(t)] for l, t in layer_map.items()]
  values = [matrix[rows[l], t] for l, t in layer_map.items()]
  return {"matrix": matrix.tolist(), "student_layers": [str(l) for l in student_layers],
          "teacher_layers": list(range(matrix.shape[1])), "pairs": pairs,
          "paired": [float(v) for v in values], "mean": float(np.mean(values))}


# --- Report ------------------------------------------------------------------------------


def report(health: Mapping, mi: Mapping, cka: Mapping, *,
           thresholds: Mapping = THRESHOLDS) -> dict:
  """The metrics, the thresholds and pass/fail per check.

  health: `spike_health`'s dict (uses "overall"); mi: `mi_summary`'s (uses
  overall "excess_bits"); cka: `cka_summary`'s (uses "mean"). Returns {"checks":
  {name: {value, threshold, pass}}, "passed", "thresholds", "health", "mi", "cka"}.
  """
  t = {**THRESHOLDS, **thresholds}
  o = health["overall"]
  checks = {
      "dead_fraction": (o["dead_fraction"], f"< {t['dead_max']}",
                        o["dead_fraction"] < t["dead_max"]),
      "saturated_fraction": (o["saturated_fraction"], f"< {t['saturated_max']}",
                             o["saturated_fraction"] < t["saturated_max"]),
      "mi_excess_bits": (mi["overall"]["excess_bits"], f"> {t['mi_min_bits']}",
                         mi["overall"]["excess_bits"] > t["mi_min_bits"]),
      "cka_mean": (cka["mean"], f"> {t['cka_min']}", cka["mean"] > t["cka_min"]),
      "firing_rate": (o["rate"], f"in [{t['rate_min']}, {t['rate_max']}]",
                      t["rate_min"] <= o["rate"] <= t["rate_max"]),
  }
  checks = {k: {"value": float(v), "threshold": s, "pass": bool(p)}
            for k, (v, s, p) in checks.items()}
  return {"checks": checks, "passed": all(c["pass"] for c in checks.values()),
          "thresholds": t, "health": dict(health), "mi": dict(mi), "cka": dict(cka)}


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.floating):
    return float(x)
  return x


def write_report(rep: Mapping, outdir: str | os.PathLike) -> dict:
  """Writes spikes.json (the report), firing_rates.png (per layer, the histogram of
  channel firing rates with the healthy band shaded) and cka.png (the CKA heatmap,
  student layers as rows, teacher layers as columns, mapped pairs boxed). Returns the
  paths by name."""
  outdir = pathlib.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  paths = {"json": outdir / "spikes.json", "firing_rates": outdir / "firing_rates.png",
           "cka": outdir / "cka.png"}
  paths["json"].write_text(json.dumps(_jsonable(rep), indent=1) + "\n")
  t = rep["thresholds"]
  plt = plots._pyplot()  # pylint: disable=protected-access

  layers = rep["health"]["layers"]
  edges = np.asarray(rep["health"]["bins"])
  cols = min(4, len(layers))
  nrows = math.ceil(len(layers) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
  for ax, (name, h) in zip(axes.flat, layers.items()):
    ax.axvspan(t["rate_min"], t["rate_max"], color="tab:green", alpha=0.12, lw=0)
    ax.bar(edges[:-1], h["histogram"], np.diff(edges), align="edge", edgecolor="white")
    ax.set_title(f"layer {name}: rate {h['rate']:.2f}, dead {h['dead_fraction']:.0%}, "
                 f"sat. {h['saturated_fraction']:.0%}", fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_xlabel("channel firing rate")
    ax.set_ylabel("channels")
    ax.grid(alpha=0.3, axis="y")
  for ax in list(axes.flat)[len(layers):]:
    ax.axis("off")
  plots._save(plt, fig, str(paths["firing_rates"]),  # pylint: disable=protected-access
              "firing rates per layer (green: healthy band)")

  c = rep["cka"]
  matrix = np.asarray(c["matrix"], np.float64)
  fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.55 * matrix.shape[1]),
                                  max(3.2, 1.2 + 0.45 * matrix.shape[0])))
  im = ax.imshow(matrix, vmin=0.0, vmax=max(1.0, float(np.nanmax(matrix))), cmap="viridis",
                 aspect="auto")
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
              color="white" if matrix[i, j] < 0.6 else "black")
  rows = {l: i for i, l in enumerate(c["student_layers"])}
  for l, tcol in c["pairs"]:
    ax.add_patch(plt.Rectangle((tcol - 0.5, rows[l] - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
  ax.set_xticks(range(matrix.shape[1]), [str(v) for v in c["teacher_layers"]])
  ax.set_yticks(range(matrix.shape[0]), c["student_layers"])
  ax.set_xlabel("teacher hidden state")
  ax.set_ylabel("student layer (spikes)")
  fig.colorbar(im, ax=ax, fraction=0.05)
  plots._save(plt, fig, str(paths["cka"]),  # pylint: disable=protected-access
              f"CKA (mean over red pairs {c['mean']:.2f})")
  return {k: str(v) for k, v in paths.items()}


# --- Driver ------------------------------------------------------------------------------


def _teacher_layers(hidden) -> list:
  if isinstance(hidden, (list, tuple)):
    return [_flat(h) for h in hidden]
  hidden = np.asarray(hidden)
  return [_flat(h) for h in hidden]


def spike_report(student_apply: Callable, teacher_hidden_fn: Callable, batches: Iterable, *,
                 layer_map: Optional[Mapping] = None, layer_of: Callable = layer_index,
                 mi_bins: int = 8, mi_tokens: int = 4096, mi_directions: str = "units",
                 mi_components: int = 16, cka_tokens: int = 512, max_batches: Optional[int] = None,
                 seed: int = 0, thresholds: Mapping = THRESHOLDS) -> dict:
  """Runs the validation suite over an evaluation set and returns `report`'s dict.

  Args:
    student_apply: batch -> {site: spike values [..., channels]} (e.g. `spiking_apply`
      of a spiking RWKV); the leading axes are the batch's tokens.
    teacher_hidden_fn: batch -> the teacher's hidden states for the same tokens,
      [layers, ..., width] (e.g. GPT-2's aux["hidden_states"]) or a list of [..., width].
    batches: the evaluation set (any iterable of whatever both callables take).
    layer_map: student layer (as `layer_of` names it) -> teacher hidden-state index,
      the pairs MI and the CKA check use; None = proportional depth.
    layer_of: site name -> its layer.
    mi_bins: equal-mass bins of teacher features. mi_tokens: the first this many tokens
      of the set are kept for MI (half select the pairing, half measure; the bias of
      the plug-in MI is then about 14 / (mi_tokens ln 2) bits for 8 bins), as spike
      signs (int8) and the mapped teacher layers only.
    mi_directions, mi_components: `spike_teacher_mi`'s directions and n_components.
    cka_tokens: tokens per batch (a random subset) entering minibatch CKA (its Gram
      matrices are cka_tokens^2).
    max_batches: stop after this many batches.
    seed: token subsets, split and shuffle.
  """
  rng = np.random.default_rng(seed)
  stats = acc = None
  kept_s, kept_t, kept = {}, {}, 0
  student_layers = teacher_count = None
  cka_update = jax.jit(cka_lib.minibatch_cka_update)
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    spikes = {k: _flat(v) for k, v in dict(student_apply(batch)).items()}
    hidden = _teacher_layers(teacher_hidden_fn(batch))
    if not spikes:
      raise errors.ShapeError("student_apply returned no spike sites.")
    n = next(iter(spikes.values())).shape[0]
    if any(v.shape[0] != n for v in list(spikes.values()) + hidden):
      raise errors.ShapeError(
          f"student sites and teacher layers disagree on the tokens of a batch: "
          f"{ {k: v.shape for k, v in spikes.items()} } vs {[h.shape for h in hidden]}.")
    if stats is None:
      stats = spike_stats_init(spikes)
      student_layers = list(dict.fromkeys(layer_of(k) for k in spikes))
      teacher_count = len(hidden)
      acc = cka_lib.minibatch_cka_init(len(student_layers), teacher_count)
      if layer_map is None:
        layer_map = default_layer_map(student_layers, teacher_count)
      unknown = [l for l, t in layer_map.items()
                 if l not in student_layers or not 0 <= t < teacher_count]
      if unknown:
        raise errors.ConfigError(
            f"layer_map pairs {unknown} do not exist: student layers {student_layers}, "
            f"teacher hidden states 0..{teacher_count - 1}.")
    stats = spike_stats_update(stats, spikes)
    take = rng.permutation(n)[:cka_tokens]
    if take.size >= 4:  # The debiased HSIC needs 4 examples.
      xs = [np.concatenate([v[take] for k, v in spikes.items() if layer_of(k) == l], axis=1)
            for l in student_layers]
      acc = cka_update(acc, [jnp.asarray(x, jnp.float32) for x in xs],
                       [jnp.asarray(h[take], jnp.float32) for h in hidden])
    if kept < mi_tokens:  # Signs only: |Pearson r| and the states do not need alpha.
      m = min(n, mi_tokens - kept)
      for k, v in spikes.items():
        kept_s.setdefault(k, []).append(np.sign(v[:m]).astype(np.int8))
      for t in set(layer_map.values()):
        kept_t.setdefault(t, []).append(hidden[t][:m])
      kept += m
  if stats is None:
    raise errors.MissingDataError("spike_report got no batches.")
  health = spike_health(stats, layer_of=layer_of)
  teacher_kept = {t: np.concatenate(parts) for t, parts in kept_t.items()}
  per_site = {}
  for j, (k, parts) in enumerate(kept_s.items()):
    l = layer_of(k)
    if l in layer_map:
      per_site[k] = spike_teacher_mi(np.concatenate(parts), teacher_kept[layer_map[l]],
                                     bins=mi_bins, seed=seed + j, directions=mi_directions,
                                     n_components=mi_components)
  if not per_site:
    raise errors.ConfigError(f"layer_map {dict(layer_map)} maps no student layer of "
                             f"{student_layers}.")
  mi = mi_summary(per_site, layer_of=layer_of)
  cka = cka_summary(cka_lib.minibatch_cka_result(acc), student_layers, layer_map)
  cka["batches"] = int(acc.count)
  return report(health, mi, cka, thresholds=thresholds)
