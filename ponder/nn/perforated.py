"""PerforatedAI-style dendrites: a Dense layer that grows dendrites, and its tracker.

The anchor is the PerforatedAI package (PyPI `perforatedai` 3.2.9, GitHub
PerforatedAI/PerforatedAI); the equations below are read from its code
(`modules_perforatedai.py`: `PAINeuronModule.forward`, `PAIDendriteModule.forward`,
`init_params`; `tracker_perforatedai.py`: `add_validation_score`, `check_new_best`,
`switch_time`, `process_no_improvement`; `utils_perforatedai.py`:
`change_learning_modes`, `load_system`) and tested against it in
tests/nn/test_perforated.py.

A dendrite of a wrapped Dense layer (weights W, b; F output channels) is a copy of that
layer with its own weights W_c, b_c. With k dendrites, c = 0..k-1:

    a_c = sigmoid(W_c x + b_c + sum_{j<c} v_c[j] * a_j)          (the cascade)
    y   = W x + b + sum_c u[c] * a_c                              (before the nonlinearity)

u [k, F] (the package's `dendrites_to_top[k-1]`) and v_c [c, F] (`dendrites_to_dendrites[c]`)
are per-output-channel: dendrite c's channel f only sees channel f of the earlier dendrites.
When a dendrite is added, u gains a zero row and the new v_c is zero, so the function is
unchanged; the new dendrite's kernel AND bias are N(0, 1) * 0.01 (the package's
`candidate_weight_initialization_multiplier`; `init_params` randomises every parameter of
the copy). Because u starts at 0 the new dendrite gets no gradient at first, but u does:
dL/du[c] = sum_p dL/dy_p * a_c,p.

Training alternates by a tracker on validation scores (`update` below, the package's
`add_validation_score` with the open-source settings): after `n_epochs_to_switch`
evaluations without a relative (1e-3, 1e-4, then 0 as dendrites accumulate) and absolute
(1e-5) improvement, the best state is reloaded, every wrapped layer gains one dendrite
(`grow`), the optimizer is rebuilt, and training continues with every parameter trained by
ordinary backprop (rule "gd", the package's open-source "GD dendrites"). A cycle that
never beats the global best is retried with a fresh dendrite ("retry"), then training is
complete.

Beyond the open-source package, rule "cc" trains the newest dendrite alone, the other
parameters frozen, to correlate with the error its neurons still make: Perforated
Backpropagation (Brenner & Itti 2025, arXiv:2501.18018) after the cascade-correlation of
Fahlman & Lebiere (1990), whose objective is

    S = sum_o | sum_p (a_{p,o} - mean_p a_o) (e_{p,o} - mean_p e_o) |      (`cascade_correlation`)

Choices the paper leaves open, and what is implemented (`dendrite_step(rule="cc")`):
  * pairing: each neuron o has its own candidate (the new dendrite's channel o), so a has
    the shape of e and channel o's candidate correlates with neuron o's error only. Passing
    one candidate `a [P]` against all outputs `e [P, O]` gives Fahlman's form.
  * the error e_{p,o} is dL/dy_{p,o}, the gradient the neuron's output receives (what the
    package's backward hook captures), for the task loss with every parameter frozen;
    examples p are every position of the layer's input (batch x tokens).
  * the means and sums are over the batch, not running estimates over an epoch, and S is
    the unnormalised covariance of Fahlman & Lebiere; `normalize=True` divides each
    channel by its standard deviations (a Pearson correlation), an option, not the default.
  * the candidate's trainable parameters are its copy (W_k, b_k) and its cascade inputs
    v_k from the earlier dendrites; u[k] stays 0 during candidate training and is learned
    afterwards by the neurons' phase (whose loss then gives it the gradient above).
  * the ascent direction of |.| is its sign times the covariance's gradient (0 at 0).

Wrapping a model's Dense layers: a model that should be able to grow dendrites builds
its Dense layers with `dense(self, features, name=..., spec=cfg)`, which returns a
`DendriticDense` where the layer's module path matches one of `spec.paths` (glob
patterns over '/'-joined paths) and an `nn.Dense` elsewhere. A DendriticDense with 0
dendrites has exactly nn.Dense's parameters (kernel, bias), so a plain checkpoint loads.
"""

import dataclasses
import fnmatch
import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ponder import errors
from ponder.nn import dense as dense_lib

# The package's `candidate_weight_initialization_multiplier` (dendrite weights N(0,1)*0.01).
INIT_SCALE = 0.01
# Flax collections DendriticDense writes when asked (never at init): the newest
# dendrite's activation, and a zero perturbation of the output whose gradient is dL/dy.
ACTIVATIONS = "dendrite_activations"
ERRORS = "dendrite_errors"

Array = Any
Params = Mapping[str, Any]


class DendriticDense(nn.Module):
  """A Dense layer with `num_dendrites` PerforatedAI dendrites (see the module docstring).

  Attributes:
    features: output channels F.
    num_dendrites: dendrites k (static; `grow` turns a k-params tree into a k+1 one).
    use_bias: as nn.Dense; a dendrite copies the layer, so it has a bias iff the layer has.
    activation: the dendrite nonlinearity (the package's `pai_forward_function`, sigmoid).
    compute_dtype: matmul operand dtype, as `ponder.nn.dense.Dense` (None = float32);
      every matmul runs on [rows, in] inputs, the cascade and the sums in float32.

  Parameters: kernel [in, F], bias [F] (as nn.Dense); dendrite_c/{kernel, bias} for
  c < k; u [k, F]; v_c [c, F] for 1 <= c < k.
  """
  features: int
  num_dendrites: int = 0
  use_bias: bool = True
  compute_dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dendrite_init: Callable = nn.initializers.normal(INIT_SCALE)
  activation: Callable = nn.sigmoid

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    y = dense_lib.dense_matmul(x, kernel, self.compute_dtype)
    if bias is not None:
      y = y + bias
    k = self.num_dendrites
    if k == 0:
      return y
    u = self.param("u", nn.initializers.zeros, (k, self.features), self.param_dtype)
    acts = []
    for c in range(k):
      z = dense_lib.Dense(self.features, use_bias=self.use_bias,
                          compute_dtype=self.compute_dtype, param_dtype=self.param_dtype,
                          kernel_init=self.dendrite_init, bias_init=self.dendrite_init,
                          name=f"dendrite_{c}")(x)
      if c > 0:
        v = self.param(f"v_{c}", nn.initializers.zeros, (c, self.features),
                       self.param_dtype).astype(z.dtype)
        for j in range(c):
          z = z + v[j] * acts[j]
      acts.append(self.activation(z))
    # Added one by one, in order, like the package: an added zero row of u adds exact 0s.
    u = u.astype(y.dtype)
    for c in range(k):
      y = y + u[c] * acts[c]
    if not self.is_initializing():
      self.sow(ACTIVATIONS, "newest", acts[-1])
      if self.is_mutable_collection(ERRORS) or self.has_variable(ERRORS, "output"):
        y = self.perturb("output", y, collection=ERRORS)
    return y


@dataclasses.dataclass(frozen=True)
class DendriteSpec:
  """Which Dense layers of a model carry dendrites, and how many (one count for all).

  paths: glob patterns over '/'-joined module paths, e.g. ("encoder/layer_*/mlp/*",).
  """
  num_dendrites: int = 0
  paths: tuple = ()

  def matches(self, path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in self.paths)


def dense(parent: nn.Module, features: int, *, name: str,
          spec: Optional[DendriteSpec] = None, **kwargs) -> nn.Module:
  """The Dense layer `name` of the bound module `parent`: dendritic where `spec` says.

  Call it inside `parent`'s setup or compact __call__; kwargs go to the layer (use_bias,
  compute_dtype, kernel_init, ...). Without a spec, or off its paths, it is a
  `ponder.nn.dense.Dense` (nn.Dense's parameters, on [rows, in] inputs).
  """
  path = "/".join(tuple(parent.path) + (name,))
  if spec is not None and spec.matches(path):
    return DendriticDense(features, num_dendrites=spec.num_dendrites, name=name, **kwargs)
  return dense_lib.Dense(features, name=name, **kwargs)


# ---------------------------------------------------------------------------------------
# Parameter trees: finding wrapped layers, growing them, masks.


def _is_dense_params(tree) -> bool:
  return (isinstance(tree, Mapping) and "kernel" in tree
          and getattr(tree["kernel"], "ndim", 0) == 2)


def _dendrites_in(layer: Mapping) -> int:
  k = 0
  while f"dendrite_{k}" in layer:
    k += 1
  return k


def _walk(tree, prefix=()):
  """Yields (path tuple, dict) for every Dense-shaped params dict in `tree`."""
  if _is_dense_params(tree):
    yield prefix, tree
    return
  if isinstance(tree, Mapping):
    for key, sub in tree.items():
      yield from _walk(sub, prefix + (key,))


def _replace(tree, path, value):
  """A copy of `tree` with `value` at `path` (missing levels are created)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree.get(path[0], {}), path[1:], value)
  return out


def _match(path: tuple, patterns) -> bool:
  joined = "/".join(path)
  return any(p == path if isinstance(p, tuple) else fnmatch.fnmatchcase(joined, p)
             for p in patterns)


def dendrite_layers(params: Params) -> dict:
  """{'/'-joined path: dendrite count} for every layer that has dendrites."""
  return {"/".join(p): _dendrites_in(t) for p, t in _walk(params) if "u" in t}


def grow(params: Params, paths: Iterable, key: Array, *,
         init_scale: float = INIT_SCALE) -> dict:
  """Adds one dendrite to every Dense layer of `params` on `paths`: k -> k + 1.

  paths: glob patterns over '/'-joined parameter paths (the same as the model's
  DendriteSpec.paths) or exact path tuples. The new dendrite's kernel and bias are
  N(0, 1) * init_scale, its u row and cascade weights v_k are 0, so the model with k + 1
  dendrites computes what the k model did. Each layer draws from fold_in(key, i), i its
  index in path order.
  """
  paths = tuple(paths)
  layers = tuple(sorted(p for p, _ in _walk(params) if _match(p, paths)))
  if not layers:
    found = ", ".join("/".join(p) for p, _ in _walk(params)) or "none"
    raise errors.ConfigError(
        f"grow: no Dense-shaped parameters match {paths!r}; Dense layers found: {found}")
  return _grow(params, key, layers=layers, init_scale=float(init_scale))


@functools.partial(jax.jit, static_argnames=("layers", "init_scale"))
def _grow(params, key, *, layers, init_scale):
  """grow's work, one compiled program for the whole tree (eagerly it is many small ones)."""
  out = params
  for i, path in enumerate(layers):
    layer = dict(_get(params, path))
    k = _dendrites_in(layer)
    fan_in, features = layer["kernel"].shape
    dtype = layer["kernel"].dtype
    kk, kb = jax.random.split(jax.random.fold_in(key, i))
    new = {"kernel": (jax.random.normal(kk, (fan_in, features)) * init_scale).astype(dtype)}
    if "bias" in layer:
      new["bias"] = (jax.random.normal(kb, (features,)) * init_scale).astype(dtype)
    layer[f"dendrite_{k}"] = new
    zero_row = jnp.zeros((1, features), dtype)
    layer["u"] = zero_row if k == 0 else jnp.concatenate([layer["u"], zero_row], axis=0)
    if k > 0:
      layer[f"v_{k}"] = jnp.zeros((k, features), dtype)
    out = _replace(out, path, layer)
  return out


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def candidate_mask(params: Params) -> Any:
  """A tree like `params`: True on the newest dendrite of each layer (dendrite_{k-1}/*
  and v_{k-1}), the parameters rule "cc" trains; False everywhere else."""
  mask = jax.tree.map(lambda _: False, params)
  for path, layer in _walk(params):
    k = _dendrites_in(layer)
    if k == 0:
      continue
    sub = dict(_get(mask, path))
    sub[f"dendrite_{k - 1}"] = jax.tree.map(lambda _: True, layer[f"dendrite_{k - 1}"])
    if k > 1:
      sub[f"v_{k - 1}"] = True
    mask = _replace(mask, path, sub)
  return mask


# ---------------------------------------------------------------------------------------
# The package's torch state dicts.

# Keys of a perforatedai model that are scaffolding, not parameters of the function.
_PAI_SCAFFOLD = ("tracker_string", "this_node_index", "this_output_dimensions",
                 "dendrite_module.num_cycles", "dendrite_module.parent_module.",
                 "dendrite_module.dendrite_values.", "dendrite_module.dendrites_to_candidates.",
                 "dendrite_module.candidate_module.", "dendrite_module.best_candidate_module.")


def _np(t):
  if hasattr(t, "detach"):
    t = t.detach().cpu().numpy()
  return np.asarray(t)


def from_perforatedai_state_dict(state_dict: Mapping[str, Any], *,
                                 rename: Optional[Any] = None) -> dict:
  """Flax params for DendriticDense / nn.Dense from a perforatedai model's state dict.

  Converts every wrapped Linear (`P.main_module.weight`, with its dendrites when it has
  some) and every plain Linear (`P.weight` of rank 2, `P.bias`). rename maps a torch
  module prefix P to a flax path: a dict {P: "a/b" or ("a", "b")}, a function, or None
  (dots become nesting). The package's scaffolding (buffers, the parent copy, stale
  `dendrites_to_top.j`, unused candidate weights) is dropped; any other key is an error.
  """
  sd = {k: v for k, v in state_dict.items()}

  def flax_path(prefix):
    if rename is None:
      name = prefix.replace(".", "/")
    elif callable(rename):
      name = rename(prefix)
    else:
      if prefix not in rename:
        raise errors.ConfigError(f"no flax path for torch module {prefix!r}; "
                                 f"rename has {sorted(rename)}")
      name = rename[prefix]
    return tuple(name.split("/")) if isinstance(name, str) else tuple(name)

  params, used = {}, set()
  prefixes = sorted({k[:-len(".main_module.weight")] for k in sd
                     if k.endswith(".main_module.weight")})
  for p in prefixes:
    w = _np(sd[f"{p}.main_module.weight"])
    layer = {"kernel": w.T}
    used.add(f"{p}.main_module.weight")
    if f"{p}.main_module.bias" in sd:
      layer["bias"] = _np(sd[f"{p}.main_module.bias"])
      used.add(f"{p}.main_module.bias")
    tops = sorted(int(k.rsplit(".", 1)[1]) for k in sd if k.startswith(f"{p}.dendrites_to_top."))
    used.update(f"{p}.dendrites_to_top.{i}" for i in tops)
    if tops:
      u = _np(sd[f"{p}.dendrites_to_top.{tops[-1]}"])
      k = u.shape[0]
      if u.shape != (k, w.shape[0]):
        raise errors.ShapeError(f"{p}.dendrites_to_top.{tops[-1]} has shape {u.shape}, "
                                f"expected (k, {w.shape[0]})")
      layer["u"] = u
      for c in range(k):
        base = f"{p}.dendrite_module.layers.{c}"
        if f"{base}.weight" not in sd:
          raise errors.ShapeError(f"{p} has u for {k} dendrites but no {base}.weight")
        layer[f"dendrite_{c}"] = {"kernel": _np(sd[f"{base}.weight"]).T}
        used.add(f"{base}.weight")
        if f"{base}.bias" in sd:
          layer[f"dendrite_{c}"]["bias"] = _np(sd[f"{base}.bias"])
          used.add(f"{base}.bias")
        if c > 0:
          v = _np(sd[f"{p}.dendrite_module.dendrites_to_dendrites.{c}"])
          if v.shape != (c, w.shape[0]):
            raise errors.ShapeError(f"{p}.dendrite_module.dendrites_to_dendrites.{c} has "
                                    f"shape {v.shape}, expected ({c}, {w.shape[0]})")
          layer[f"v_{c}"] = v
      used.update(k_ for k_ in sd if k_.startswith(f"{p}.dendrite_module.dendrites_to_dendrites."))
    params = _replace(params, flax_path(p), layer)
  for key in sorted(sd):
    if key in used or not key.endswith(".weight") or ".main_module." in key:
      continue
    if ".dendrite_module." in key or _np(sd[key]).ndim != 2:
      continue
    p = key[:-len(".weight")]
    layer = {"kernel": _np(sd[key]).T}
    used.add(key)
    if f"{p}.bias" in sd:
      layer["bias"] = _np(sd[f"{p}.bias"])
      used.add(f"{p}.bias")
    params = _replace(params, flax_path(p), layer)
  left = [k for k in sd if k not in used and not any(
      s in k for s in _PAI_SCAFFOLD) and not k.endswith("dendrites_to_dendrites.0")]
  if left:
    raise errors.ShapeError(f"from_perforatedai_state_dict converts Linear layers only; "
                            f"unconverted keys: {left}")
  return params


# ---------------------------------------------------------------------------------------
# Candidate training: cascade correlation (rule "cc") beside plain backprop (rule "gd").


def cascade_correlation(a: Array, e: Array, *, normalize: bool = False,
                        eps: float = 1e-12) -> Array:
  """S = sum_o | sum_p (a_{p,o} - mean a_o)(e_{p,o} - mean e_o) | (Fahlman & Lebiere).

  e: errors [..., O]; every leading position is an example p. a: candidate activations of
  e's shape (one candidate per output: each channel correlates with its own error) or of
  e's shape without the last axis (one candidate for all outputs, Fahlman's form).
  normalize: divide each channel's covariance by sqrt(sum (a - mean a)^2 * sum (e -
  mean e)^2), a Pearson correlation in [-1, 1] per channel.
  """
  e = jnp.reshape(e, (-1, e.shape[-1]))
  if a.ndim == e.ndim - 1 or a.ndim == 1:
    a = jnp.reshape(a, (-1, 1))
  else:
    a = jnp.reshape(a, (-1, a.shape[-1]))
  if a.shape[0] != e.shape[0]:
    raise errors.ShapeError(f"cascade_correlation: {a.shape[0]} activations for "
                            f"{e.shape[0]} error rows")
  da = a - jnp.mean(a, axis=0)
  de = e - jnp.mean(e, axis=0)
  cov = jnp.sum(da * de, axis=0)
  if normalize:
    cov = cov / jnp.sqrt(jnp.sum(da * da, axis=0) * jnp.sum(de * de, axis=0) + eps)
  return jnp.sum(jnp.abs(cov))


def _only(collection: Mapping, what: str) -> list:
  """The sown/perturbed leaves of one collection, in path order, one per wrapped layer."""
  out = []
  for path, layer in _flat(collection):
    if isinstance(layer, tuple):
      if len(layer) != 1:
        raise errors.ShapeError(f"{what} at {'/'.join(path)} was written {len(layer)} "
                                "times in one forward; each wrapped layer must run once")
      layer = layer[0]
    out.append((path, layer))
  return out


def _flat(tree, prefix=()):
  if isinstance(tree, Mapping):
    for key in sorted(tree):
      yield from _flat(tree[key], prefix + (key,))
  else:
    yield prefix, tree


def correlation_loss(params: Params, batch: Any, *, apply_fn: Callable,
                     loss_fn: Callable, normalize: bool = False):
  """(-S, task loss): rule "cc"'s objective, S summed over the wrapped layers.

  S is each layer's newest dendrite's `cascade_correlation` with e = dL/dy of the layer's
  outputs under the task loss (taken with all parameters frozen: e carries no
  gradient). Only the candidates should move: mask the update with `candidate_mask`
  (dendrite_step does), or, as a loss of its own, differentiate `-S` with the other
  parameters behind `lax.stop_gradient` (the "candidates" phase of train/phases.py).
  apply_fn and loss_fn as in `dendrite_step`.
  """
  # dL/dy at every wrapped layer: the gradient of a zero perturbation added to y.
  _, zeros = apply_fn({"params": params}, batch, [ERRORS])
  if ERRORS not in zeros:
    raise errors.ConfigError(
        "rule 'cc' trains the newest dendrite, but the model ran no DendriticDense with "
        "num_dendrites >= 1: grow the params and build the model with the new count")

  def task_loss(probe):
    out, _ = apply_fn({"params": params, ERRORS: probe}, batch, [])
    return loss_fn(out, batch)

  task, err = jax.value_and_grad(task_loss)(zeros[ERRORS])
  err = dict(_only(jax.lax.stop_gradient(err), ERRORS))
  err = {path[:-1]: value for path, value in err.items()}  # drop the "output" leaf name

  _, acts = apply_fn({"params": params}, batch, [ACTIVATIONS])
  total = 0.0
  for path, a in _only(acts[ACTIVATIONS], ACTIVATIONS):
    total = total + cascade_correlation(a, err[path[:-1]], normalize=normalize)
  return -total, task


def dendrite_step(params: Params, opt_state: Any, batch: Any, *, rule: str,
                  apply_fn: Callable, loss_fn: Callable, tx: Any,
                  normalize: bool = False):
  """One optimizer step of dendrite training. Returns (params, opt_state, metrics).

  apply_fn(variables, batch, mutable) -> (output, mutated collections), e.g.
  `lambda v, b, mutable: model.apply(v, b["x"], mutable=mutable)`;
  loss_fn(output, batch) -> scalar task loss; tx an optax transformation.

  rule "gd" (the open-source package): the task loss, every parameter trains.
  rule "cc" (Perforated Backpropagation's candidate phase): loss = -S, S the summed
  `cascade_correlation` of each wrapped layer's newest dendrite with dL/dy of its
  outputs (taken with all parameters frozen); only `candidate_mask(params)` moves.
  Jit it with the keywords bound (functools.partial).
  """
  import optax  # pylint: disable=g-import-not-at-top

  if rule == "gd":
    def loss(p):
      out, _ = apply_fn({"params": p}, batch, [])
      return loss_fn(out, batch)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": value}
  if rule != "cc":
    raise errors.unknown_key("dendrite rule", rule, ("gd", "cc"))

  objective = functools.partial(correlation_loss, batch=batch, apply_fn=apply_fn,
                                loss_fn=loss_fn, normalize=normalize)
  mask = candidate_mask(params)
  (value, task), grads = jax.value_and_grad(objective, has_aux=True)(params)
  zero = lambda g, m: g if m else jnp.zeros_like(g)  # noqa: E731
  grads = jax.tree.map(zero, grads, mask)
  updates, opt_state = tx.update(grads, opt_state, params)
  updates = jax.tree.map(zero, updates, mask)  # frozen even under weight decay
  return (optax.apply_updates(params, updates), opt_state,
          {"correlation": -value, "loss": task})


# ---------------------------------------------------------------------------------------
# The tracker: when to add dendrites, as a pure state machine.

CONTINUE, RESTRUCTURE, RETRY, COMPLETE = "continue", "restructure", "retry", "complete"


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
  """The package's tracker settings (GPA.pc.*), defaults as in perforatedai 3.2.9."""
  n_epochs_to_switch: int = 10  # evaluations without improvement before a switch
  # "history" (DOING_HISTORY): switch after n_epochs_to_switch evaluations without
  # improvement; "fixed" (DOING_FIXED_SWITCH): switch at evaluations N-1, 2N-1, ... of
  # the (rewound) evaluation counter, N = fixed_switch_num, not before evaluation
  # first_fixed_switch_num - 1, whatever the scores do: for budgets in which validation
  # never stops improving (fine-tuning MiniLM under a decaying learning rate).
  switch_mode: str = "history"
  fixed_switch_num: int = 250
  first_fixed_switch_num: int = -1
  improvement_threshold: tuple = (1e-3, 1e-4, 0.0)  # relative, indexed by dendrite count
  improvement_threshold_raw: float = 1e-5  # absolute improvement also required
  max_dendrite_tries: int = 2  # attempts at a dendrite count that fails to beat the best
  max_dendrites: int = 100  # complete once a cycle at this count has finished
  maximize: bool = True  # higher scores are better (False for a loss)
  history_lookback: int = 1  # running average of scores over this many evaluations
  initial_history_after_switches: int = 0  # evaluations after a switch before judging
  reset_best_score_on_switch: bool = True  # the cycle best and running score restart at 0
  retain_all_dendrites: bool = False  # keep every dendrite, improving or not
  initial_running_score: float = 1e-8  # perforate_model's 100 / num_classes (1e10)
  reset_tries_on_success: bool = False  # True: a cycle that improves resets the tries
  # count (the package's intent); False: as the package runs (see `update`).

  def __post_init__(self):
    if self.switch_mode not in ("history", "fixed"):
      raise ValueError(f"switch_mode={self.switch_mode!r}: use 'history' (switch when "
                       "validation stops improving) or 'fixed' (every fixed_switch_num "
                       "evaluations)")
    if self.switch_mode == "fixed" and self.fixed_switch_num < 1:
      raise ValueError(f"fixed_switch_num={self.fixed_switch_num}: a fixed switch needs "
                       "an interval of at least 1 evaluation")


@flax.struct.dataclass
class TrackerCounters:
  """The package's tracker member variables that decide what happens (0-d numpy leaves)."""
  epoch: Any  # num_epochs_run: index of the next evaluation, rewound on a reload
  last_improved: Any  # epoch_last_improved
  last_switch: Any  # switch_epochs[-1] (0 before the first switch)
  num_scores: Any  # len(accuracies), rewound on a reload
  running: Any  # running_accuracy
  current_best: Any  # current_best_validation_score (this cycle)
  global_best: Any  # global_best_validation_score
  set_global_best: Any  # current_n_set_global_best: this cycle beat the global best
  tries: Any  # num_dendrite_tries
  num_dendrites: Any  # num_dendrites_added
  overwritten: Any  # overwritten_epochs: evaluations rewound by reloads, kept across them


@flax.struct.dataclass
class TrackerState:
  """`now`: the tracker; `saved`: the tracker as it was when the best params were saved
  (the package saves the tracker inside best_model.pt and reloads both together)."""
  now: TrackerCounters
  saved: TrackerCounters

  @property
  def num_dendrites(self) -> int:
    return int(self.now.num_dendrites)

  @property
  def best_score(self) -> float:
    return float(self.now.global_best)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the trainer does after an evaluation.

  action: "continue"; "restructure" or "retry": load the best params, `grow` them to
  `num_dendrites` dendrites, rebuild the optimizer; "complete": load the best params and
  stop. save_best: keep the evaluated params as the best (before acting on `action`).
  save_grown: keep the grown params as the best (only with retain_all_dendrites, where
  the package saves the model again right after adding the dendrite).
  """
  action: str
  save_best: bool
  num_dendrites: int
  save_grown: bool = False


_INT = ("epoch", "last_improved", "last_switch", "num_scores", "tries", "num_dendrites",
        "overwritten")
_FLOAT = ("running", "current_best", "global_best")


def _pack(d: dict) -> TrackerCounters:
  # A phase state written before `overwritten` existed (history mode never reads it) has 0.
  out = {k: np.asarray(d.get(k, 0) if k == "overwritten" else d[k], np.int64) for k in _INT}
  out.update({k: np.asarray(d[k], np.float64) for k in _FLOAT})
  out["set_global_best"] = np.asarray(bool(d["set_global_best"]))
  return TrackerCounters(**out)


def _unpack(c: TrackerCounters) -> dict:
  d = {k: int(getattr(c, k)) for k in _INT}
  d.update({k: float(getattr(c, k)) for k in _FLOAT})
  d["set_global_best"] = bool(c.set_global_best)
  return d


def init_tracker(cfg: TrackerConfig = TrackerConfig()) -> TrackerState:
  """The tracker before the first evaluation (perforate_model's fresh tracker)."""
  c = _pack(dict(epoch=0, last_improved=0, last_switch=0, num_scores=0,
                 running=cfg.initial_running_score, current_best=0.0, global_best=0.0,
                 set_global_best=True, tries=0, num_dendrites=0, overwritten=0))
  return TrackerState(now=c, saved=c)


def _beats(new: float, old: float, threshold: float, cfg: TrackerConfig) -> bool:
  """score_beats_current_best: relative to the NEW score, and by the absolute margin."""
  if cfg.maximize:
    return new * (1.0 - threshold) > old and new - cfg.improvement_threshold_raw > old
  return new * (1.0 + threshold) < old and new + cfg.improvement_threshold_raw < old


def _reload(saved: dict) -> dict:
  """load_system: the saved tracker comes back with its cycle best cleared."""
  c = dict(saved)
  c["current_best"] = 0.0
  c["last_improved"] = c["epoch"]
  return c


def _add_dendrite(now: dict, saved: dict, cfg: TrackerConfig) -> dict:
  """change_learning_modes n -> p -> n: reload the best, one more dendrite, new cycle.
  The evaluations the reload rewinds are added to `overwritten` (overwritten_epochs),
  so epoch + overwritten (total_epochs_run) counts every evaluation."""
  c = _reload(saved)
  c["overwritten"] = now["overwritten"] + now["epoch"] - saved["epoch"]
  c["last_switch"] = c["epoch"]
  c["num_dendrites"] += 1
  c["set_global_best"] = cfg.retain_all_dendrites
  if cfg.retain_all_dendrites:
    c["global_best"] = 0.0
  c["current_best"] = 0.0
  if cfg.reset_best_score_on_switch:
    c["running"] = 0.0
  return c


def _switch_time(c: dict, since: int, cfg: TrackerConfig) -> bool:
  """The package's switch_time in its two scored modes."""
  if cfg.switch_mode == "history":
    n = cfg.n_epochs_to_switch
    return (c["epoch"] - c["last_improved"] >= n
            and since >= cfg.initial_history_after_switches + n)
  n = cfg.fixed_switch_num
  total = c["epoch"] + c["overwritten"]
  return total % n == n - 1 and c["epoch"] >= cfg.first_fixed_switch_num - 1


def update(state: TrackerState, score: float, cfg: TrackerConfig = TrackerConfig()):
  """One validation score in, (state, Decision) out: the package's add_validation_score.

  Follows perforatedai 3.2.9 with its open-source settings (history or fixed switch mode,
  no learning-rate search, no perforated backpropagation), including what its code does
  beyond its documentation:
    * the first evaluation never counts as an improvement (it needs one evaluation since
      the last switch), though its params are kept as the best; the first evaluation
      after a switch always does (the cycle best restarts at 0), and 0 as a best means
      "none yet" for the global best too;
    * a switch reloads the tracker saved with the best params, so the evaluation counter
      rewinds to the best evaluation and the tries count is the one saved then: after a
      successful retry it stays at 1, and the next failing cycle completes without a
      retry (`cfg.reset_tries_on_success=True` resets it instead);
    * max_dendrite_tries counts attempts: with 2, a failing cycle is retried once;
    * max_dendrites is checked when a cycle that improved ends: training completes when
      the count equals it, so the last cycle trains max_dendrites dendrites.
  Runs on the host (Python floats, float64 like the package); call it between steps.
  """
  c = _unpack(state.now)
  saved = _unpack(state.saved)
  score = float(score)
  since = c["epoch"] - c["last_switch"]
  # update_running_accuracy
  if since < cfg.initial_history_after_switches:
    if since <= 0:
      c["running"] = score
    else:
      c["running"] = c["running"] * (1 - 1.0 / (since + 1)) + score * (1.0 / (since + 1))
  else:
    c["running"] = (c["running"] * (1.0 - 1.0 / cfg.history_lookback)
                    + score * (1.0 / cfg.history_lookback))
  c["num_scores"] += 1
  # check_new_best
  thresholds = tuple(cfg.improvement_threshold)
  threshold = thresholds[min(len(thresholds) - 1, c["num_dendrites"])]
  improved = _beats(c["running"], c["current_best"], threshold, cfg)
  save_best = False
  if (improved or c["current_best"] == 0) and since > cfg.initial_history_after_switches:
    c["current_best"] = c["running"]
    c["last_improved"] = c["epoch"]
    if (_beats(c["current_best"], c["global_best"], threshold, cfg)
        or c["global_best"] == 0):
      c["global_best"] = c["current_best"]
      c["set_global_best"] = True
      save_best = True
  elif c["num_scores"] == 1:
    save_best = True
  if save_best:
    saved = dict(c)
  # switch_time
  action = CONTINUE
  if _switch_time(c, since, cfg):
    if not c["set_global_best"]:
      if c["tries"] < cfg.max_dendrite_tries - 1:
        tries = c["tries"]
        c = _add_dendrite(c, saved, cfg)
        c["tries"] = tries + 1
        action = RETRY
      else:
        c, action = _reload(saved), COMPLETE
    elif c["num_dendrites"] == cfg.max_dendrites:
      c, action = _reload(saved), COMPLETE
    else:
      c = _add_dendrite(c, saved, cfg)
      if cfg.reset_tries_on_success:
        c["tries"] = 0
      action = RESTRUCTURE
  save_grown = cfg.retain_all_dendrites and action in (RESTRUCTURE, RETRY)
  if save_grown:
    saved = dict(c)
  if action != COMPLETE:
    c["epoch"] += 1  # start_epoch
    if action != CONTINUE:
      c["last_improved"] = c["epoch"]
  new = TrackerState(now=_pack(c), saved=_pack(saved))
  return new, Decision(action=action, save_best=save_best, num_dendrites=c["num_dendrites"],
                       save_grown=save_grown)


def tracker_to_json(state: TrackerState) -> dict:
  """The tracker as JSON (Python ints, floats and bools), for a run's phase state."""
  return {"now": _unpack(state.now), "saved": _unpack(state.saved)}


def tracker_from_json(d: Mapping) -> TrackerState:
  return TrackerState(now=_pack(d["now"]), saved=_pack(d["saved"]))
