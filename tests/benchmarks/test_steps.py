"""benchmarks/steps.py: the chunked cross-entropy loss the LM benchmark times equals
`tasks.lm_loss` (value and gradients) on the smoke GPT-2."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import steps
from configs import gpt2_lm
from train import tasks


def test_chunked_ce_loss_equals_lm_loss():
  cfg = gpt2_lm.get_config("smoke")
  model = tasks.build_lm_model(cfg, 300)
  batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, 17)),
                                 jnp.int32)}
  params = model.init(jax.random.key(0), batch["tokens"][:, :-1])["params"]

  def value_and_grad(loss, **kw):
    return jax.jit(jax.value_and_grad(
        lambda p: loss(p, batch, jax.random.key(1), model=model, train=False, **kw)[0]))(params)

  (v, g), (v_ref, g_ref) = value_and_grad(steps.chunked_ce_loss, chunk=24), value_and_grad(
      tasks.lm_loss)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  chex.assert_trees_all_close(g, g_ref, atol=1e-6, rtol=1e-4)
