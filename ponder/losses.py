"""Distillation losses: temperature-scaled KD with hard-label CE, gradient reversal,
CTKD's learnable temperature and its curriculum, and CKA on layer updates.

KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

  L_KD = T^2 * mean_tokens KL(softmax(z_t / T) || softmax(z_s / T))

the T^2 keeping the gradient's scale independent of T (Sec. 2), plus a weighted hard
cross-entropy on the labels.

CTKD (Li et al. 2023, "Curriculum Temperature for Knowledge Distillation", AAAI):
the temperature is learned adversarially. A gradient reversal layer (Ganin & Lempitsky
2015), identity forward and `-lambda * g` backward, sits between the temperature's
parameter and the KD loss, so the student descends the KD loss while the temperature
ascends it (making the task harder); lambda follows a cosine curriculum from 0 to
lambda_max (Sec. 3.3):

  T = T_min + (T_max - T_min) * sigmoid(raw)          (global temperature)
  lambda_e = lambda_max * (1 - cos(pi * min(e, E) / E)) / 2

FDD-style feature distillation on layer updates: the residual update of a block,
h_{l+1} - h_l, of the student is matched to a teacher block's by linear CKA
(`ponder.analysis.cka`), loss 1 - CKA, which ignores rotations and scale of the
feature spaces (so the widths may differ).
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ponder import errors
from ponder.analysis import cka as cka_lib


def _token_mean(per_token, mask):
  if mask is None:
    return jnp.mean(per_token)
  mask = mask.astype(per_token.dtype)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd_loss(student_logits, teacher_logits, temperature, mask=None):
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over tokens.

  Args:
    student_logits, teacher_logits: [..., vocab] (the teacher gets no gradient).
    temperature: scalar T > 0, a float or an array (CTKD: differentiable).
    mask: optional [...] weights of the tokens (1 = counted).
  """
  if student_logits.shape != teacher_logits.shape:
    raise errors.ShapeError(
        f"student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} differ.")
  t = jnp.asarray(temperature, jnp.float32)
  log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return t ** 2 * _token_mean(kl, mask)


def cross_entropy(logits, labels, mask=None):
  """Mean over tokens of -log softmax(logits)[label]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _token_mean(nll, mask)


def distillation_loss(student_logits, teacher_logits, labels, *, temperature,
                      kd_weight: float = 1.0, ce_weight: float = 0.0, mask=None):
  """kd_weight * kd_loss + ce_weight * cross_entropy: (loss, {"kd", "ce"})."""
  kd = kd_loss(student_logits, teacher_logits, temperature, mask)
  ce = cross_entropy(student_logits, labels, mask)
  return kd_weight * kd + ce_weight * ce, {"kd": kd, "ce": ce}


# --- Gradient reversal and CTKD ----------------------------------------------------------


@jax.custom_vjp
def gradient_reversal(x, lambda_):
  """Identity forward; backward multiplies the gradient by -lambda_ (no gradient to
  lambda_, which may be a traced schedule value)."""
  return x


def _grl_fwd(x, lambda_):
  return x, lambda_


def _grl_bwd(lambda_, g):
  return (jax.tree.map(lambda t: (-lambda_ * t).astype(t.dtype), g),
          jnp.zeros_like(lambda_))


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def ctkd_temperature(raw, lambda_, *, t_min: float = 1.0, t_max: float = 21.0):
  """CTKD's global temperature T_min + (T_max - T_min) * sigmoid(raw), with the
  gradient reversal between raw and T: minimising the KD loss moves raw so as to
  *increase* it, scaled by lambda_ (`cosine_lambda`)."""
  raw = gradient_reversal(jnp.asarray(raw, jnp.float32), jnp.asarray(lambda_, jnp.float32))
  return t_min + (t_max - t_min) * jax.nn.sigmoid(raw)


def ctkd_raw_init(t_init: float, *, t_min: float = 1.0, t_max: float = 21.0) -> jax.Array:
  """The raw parameter that gives temperature t_init (the inverse sigmoid)."""
  if not t_min < t_init < t_max:
    raise errors.ConfigError(f"t_init {t_init} must lie in ({t_min}, {t_max}).")
  frac = (t_init - t_min) / (t_max - t_min)
  return jnp.float32(math.log(frac / (1 - frac)))


def cosine_lambda(epoch, total_epochs, lambda_max: float = 1.0):
  """CTKD's curriculum: lambda_max * (1 - cos(pi * min(e, E) / E)) / 2, from 0 at e=0
  to lambda_max from e=E on (epoch may be fractional or traced, e.g. step / steps)."""
  e = jnp.minimum(jnp.asarray(epoch, jnp.float32), total_epochs)
  return lambda_max * (1.0 - jnp.cos(jnp.pi * e / total_epochs)) / 2.0


# --- CKA on layer updates ----------------------------------------------------------------


def cka_loss(x, y, *, debiased: bool = False, mask=None):
  """1 - linear CKA between features x [..., d1] and y [..., d2], the leading axes
  flattened into the examples; `mask` (the leading shape; biased CKA only) drops
  examples such as padding tokens."""
  x = x.reshape(-1, x.shape[-1])
  y = y.reshape(-1, y.shape[-1])
  mask = None if mask is None else mask.reshape(-1)
  return 1.0 - cka_lib.linear_cka(x, y, debiased=debiased, mask=mask)


def layer_deltas(hidden_states):
  """[layers + 1, ...] hidden states -> [layers, ...] residual updates h_{l+1} - h_l."""
  return hidden_states[1:] - hidden_states[:-1]


def default_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Student block i -> teacher block round((i + 1) * T / S) - 1 (uniform, last to last)."""
  return tuple(max(0, round((i + 1) * teacher_layers / student_layers) - 1)
               for i in range(student_layers))


def fdd_cka_loss(student_hidden, teacher_hidden, layer_map: Optional[Sequence[int]] = None,
                 *, mask=None, debiased: bool = False):
  """Mean over student blocks of 1 - CKA(student update, mapped teacher update).

  Args:
    student_hidden: [S + 1, batch, seq, d_s] (e.g. `models.rwkv` hidden_states).
    teacher_hidden: [T + 1, batch, seq, d_t].
    layer_map: teacher block for each student block (`default_layer_map` if None).
    mask: optional [batch, seq] of tokens to use (0 drops a token from CKA).
  """
  ds, dt = layer_deltas(student_hidden), layer_deltas(teacher_hidden)
  layer_map = tuple(layer_map or default_layer_map(ds.shape[0], dt.shape[0]))
  if len(layer_map) != ds.shape[0] or not all(0 <= j < dt.shape[0] for j in layer_map):
    raise errors.ShapeError(
        f"layer_map {layer_map} must give a teacher block in [0, {dt.shape[0]}) for each "
        f"of the {ds.shape[0]} student blocks.")
  losses = [cka_loss(ds[i], dt[j], debiased=debiased, mask=mask)
            for i, j in enumerate(layer_map)]
  return jnp.mean(jnp.stack(losses))
