"""GPT-2: parity with transformers 4.57, checkpoint round trips, head mask, KV cache,
sampling and perplexity."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from models import gpt2
from ponder import analysis as ponder_analysis
from ponder import errors, lm

# Small enough for 2 CPU cores; vocab not a multiple of anything, heads > 1.
TINY = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
# transformers' Flax GPT-2 names -> PyTorch names, written out independently of
# models/gpt2.py. FlaxConv1D stores its kernel [out, in]; PyTorch's Conv1D weight is
# [in, out], so kernels are transposed (as transformers' own converter does).
HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _ids(batch, seq, seed=0):
  return np.random.RandomState(seed).randint(0, TINY["vocab_size"], (batch, seq))


# Jitted once per (model config, shapes, flags): eager flax dispatches op by op, which
# costs more on 2 cores than compiling.
@functools.partial(jax.jit, static_argnames=(
    "model", "train", "output_hidden_states", "output_attentions"))
def _apply(model, params, ids, **kwargs):
  return model.apply({"params": params}, ids, **kwargs)


@pytest.fixture(scope="module")
def hf_flax():
  """transformers' FlaxGPT2LMHeadModel, randomly initialised: (model, params, forward)."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(**TINY), _do_init=False)
  params = jax.jit(hf.init_weights, static_argnums=1)(jax.random.key(0), (1, 1))
  forward = jax.jit(lambda params, ids: hf(
      ids, params=params, output_hidden_states=True, output_attentions=True,
      return_dict=False))
  return hf, params, forward


def _write_torch_named_checkpoint(hf_flax, directory, prefix, buffers=True):
  """config.json + model.safetensors laid out as hub GPT-2 checkpoints are."""
  hf, params, _ = hf_flax
  directory.mkdir(parents=True, exist_ok=True)
  hf.config.to_json_file(directory / "config.json")
  tensors = {}
  for path, value in traverse_util.flatten_dict(params["transformer"]).items():
    *modules, leaf = path
    value = np.asarray(value)
    tensors[prefix + ".".join(modules + [HF_LEAF[leaf]])] = (
        value.T.copy() if leaf == "kernel" else value)
  if buffers:  # The causal-mask buffers older checkpoints carry.
    n = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
      tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, n, n), np.float32))
      tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  return tensors


@pytest.fixture(scope="module")
def tiny():
  model = gpt2.GPT2(gpt2.GPT2Config(**TINY))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return model, params


def test_small_preset_has_124m_parameters():
  model = gpt2.GPT2(gpt2.config("small"))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 124_439_808


def test_unknown_preset_lists_the_valid_ones():
  with pytest.raises(errors.ConfigError, match="tiny"):
    gpt2.config("huge")


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_from_hf_matches_flax_gpt2(hf_flax, tmp_path, prefix):
  _write_torch_named_checkpoint(hf_flax, tmp_path, prefix)
  model, params = gpt2.from_hf(tmp_path)
  ids = _ids(2, 16)
  ours, aux = _apply(model, params, ids, output_hidden_states=True, output_attentions=True)
  logits, hidden_states, attentions = hf_flax[2](hf_flax[1], ids)
  chex.assert_trees_all_close(ours, logits, atol=1e-4, rtol=0)
  chex.assert_trees_all_close(aux["hidden_states"], jnp.stack(hidden_states), atol=1e-4)
  chex.assert_trees_all_close(aux["attentions"], jnp.stack(attentions), atol=1e-5)


def test_to_hf_round_trip_reproduces_the_checkpoint(hf_flax, tmp_path):
  original = _write_torch_named_checkpoint(hf_flax, tmp_path / "a", "transformer.",
                                           buffers=False)
  model, params = gpt2.from_hf(tmp_path / "a")
  gpt2.to_hf(model, params, tmp_path / "b")
  written = load_file(tmp_path / "b" / "model.safetensors")
  assert written.keys() == original.keys()
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  # transformers reads the written config.json as the same GPT-2.
  reread = type(hf_flax[0].config).from_pretrained(tmp_path / "b").to_dict()
  for key, value in hf_flax[0].config.to_dict().items():
    if key not in ("architectures", "transformers_version"):
      assert reread[key] == value, key


def test_from_hf_names_missing_and_unexpected_keys(hf_flax, tmp_path):
  tensors = _write_torch_named_checkpoint(hf_flax, tmp_path, "transformer.")
  tensors["transformer.h.1.mlp.c_fc.kernel"] = tensors.pop("transformer.h.1.mlp.c_fc.weight")
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(errors.CheckpointError) as info:
    gpt2.from_hf(tmp_path)
  assert "missing keys: ['h.1.mlp.c_fc.weight']" in str(info.value)
  assert "unexpected keys: ['h.1.mlp.c_fc.kernel']" in str(info.value)


def test_from_hf_refuses_an_untied_head_and_a_missing_directory(hf_flax, tmp_path):
  tensors = _write_torch_named_checkpoint(hf_flax, tmp_path, "")
  tensors["lm_head.weight"] = tensors["wte.weight"] + 1.0
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(errors.CheckpointError, match="untied"):
    gpt2.from_hf(tmp_path)
  with pytest.raises(errors.MissingDataError, match="config.json"):
    gpt2.from_hf(tmp_path / "nowhere")


def test_pytorch_checkpoints_and_head_mask_match_transformers(tmp_path):
  """Checkpoints written by transformers' PyTorch GPT-2 (safetensors and
  pytorch_model.bin), and head_mask against its head_mask."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  pt = transformers.GPT2LMHeadModel(
      transformers.GPT2Config(**TINY, attn_implementation="eager")).eval()
  ids = _ids(2, 16, seed=1)
  head_mask = np.ones((TINY["n_layer"], TINY["n_head"]), np.float32)
  head_mask[0, 1] = 0.0
  head_mask[1, 3] = 0.5
  with torch.no_grad():
    ref = pt(torch.tensor(ids)).logits.numpy()
    ref_masked = pt(torch.tensor(ids), head_mask=torch.tensor(head_mask)).logits.numpy()
  for safe in (True, False):
    directory = tmp_path / str(safe)
    pt.save_pretrained(directory, safe_serialization=safe)
    model, params = gpt2.from_hf(directory)
    chex.assert_trees_all_close(_apply(model, params, ids), ref, atol=1e-4)
  masked = _apply(model, params, ids, head_mask=jnp.asarray(head_mask))
  chex.assert_trees_all_close(masked, ref_masked, atol=1e-4)


def test_head_mask_scales_each_heads_output(tiny):
  """Gating head h equals scaling its rows of the output projection c_proj."""
  model, params = tiny
  gates = jax.random.uniform(jax.random.key(1), (TINY["n_layer"], TINY["n_head"]))
  gates = gates.at[0, 2].set(0.0)
  flat = traverse_util.flatten_dict(params)
  hd = TINY["n_embd"] // TINY["n_head"]
  for i in range(TINY["n_layer"]):
    kernel = flat[(f"h_{i}", "attn", "c_proj", "kernel")]
    flat[(f"h_{i}", "attn", "c_proj", "kernel")] = kernel * jnp.repeat(gates[i], hd)[:, None]
  ids = _ids(2, 16)
  scaled = traverse_util.unflatten_dict(flat)
  chex.assert_trees_all_close(_apply(model, params, ids, head_mask=gates),
                              _apply(model, scaled, ids), atol=1e-5)
  with pytest.raises(errors.ShapeError, match="head_mask"):
    model.apply({"params": params}, ids, head_mask=gates[0])


def test_probability_path_equals_fused_path(tiny):
  model, params = tiny
  ids = _ids(2, 16)
  logits, aux = _apply(model, params, ids, output_hidden_states=True, output_attentions=True)
  chex.assert_trees_all_close(logits, _apply(model, params, ids), atol=1e-5)
  probs = aux["attentions"]
  chex.assert_shape(probs, (TINY["n_layer"], 2, TINY["n_head"], 16, 16))
  chex.assert_trees_all_close(probs.sum(-1), jnp.ones(probs.shape[:-1]), atol=1e-5)
  assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0


def test_train_mode_drops_out_and_gives_head_importance(tiny):
  """Dropout under train=True; d loss / d head_mask is the head importance of Michel
  et al. 2019 (finite and nonzero for every head)."""
  model, params = tiny
  ids = _ids(2, 17)

  def loss(gates, key):
    logits = model.apply({"params": params}, ids[:, :-1], head_mask=gates, train=True,
                         rngs={"dropout": key})
    return lm.token_nll(logits, ids[:, 1:]).mean()

  gates = jnp.ones((TINY["n_layer"], TINY["n_head"]))
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  a, importance = value_and_grad(gates, jax.random.key(0))
  b, _ = value_and_grad(gates, jax.random.key(1))
  assert float(a) != float(b)
  assert bool(jnp.isfinite(importance).all()) and float(jnp.abs(importance).min()) > 0.0


def test_bfloat16_compute_stays_close(tiny):
  model, params = tiny
  ids = _ids(2, 16)
  low = _apply(gpt2.GPT2(model.config, dtype=jnp.bfloat16), params, ids)
  assert low.dtype == jnp.float32
  chex.assert_trees_all_close(low, _apply(model, params, ids), atol=1e-2)  # |logits| ~ 0.7


def test_chunked_decoding_with_cache_matches_full_forward(tiny):
  model, params = tiny
  ids = _ids(2, 16)
  cache = gpt2.init_cache(model.config, 2, 24)
  first, aux = _apply(model, params, ids[:, :8], cache=cache)
  second, aux = _apply(model, params, ids[:, 8:], cache=aux["cache"])
  assert int(aux["cache"].length) == 16
  full = _apply(model, params, ids)
  chex.assert_trees_all_close(jnp.concatenate([first, second], axis=1), full, atol=1e-5)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=20, top_p=0.9),
], ids=["greedy", "top_k_top_p"])
def test_generate_with_cache_equals_recomputation(tiny, sampling):
  model, params = tiny
  prompt = _ids(3, 5, seed=2)
  key = jax.random.key(7)
  kw = dict(key=key, max_new_tokens=12, **sampling)
  cached = gpt2.generate(model, params, prompt, use_cache=True, **kw)
  recomputed = gpt2.generate(model, params, prompt, use_cache=False, **kw)
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_array_equal(cached[:, :5], prompt)
  np.testing.assert_array_equal(gpt2.generate(model, params, prompt, **kw), cached)
  if sampling["temperature"]:
    other = gpt2.generate(model, params, prompt, **{**kw, "key": jax.random.key(8)})
    assert not np.array_equal(other, cached)


def test_generate_repeats_eos_and_checks_length(tiny):
  model, params = tiny
  prompt = _ids(3, 5, seed=2)  # The shapes of the test above: its compilation is reused.
  kw = dict(key=jax.random.key(7), max_new_tokens=12, temperature=0.0)
  greedy = gpt2.generate(model, params, prompt, **kw)
  eos = int(greedy[0, 5])
  stopped = np.asarray(gpt2.generate(model, params, prompt, eos_id=eos, **kw))
  np.testing.assert_array_equal(stopped[0, 5:], np.full(12, eos))
  for row, ref in zip(stopped[:, 5:], np.asarray(greedy)[:, 5:]):
    first = np.flatnonzero(ref == eos)[0] if (ref == eos).any() else len(ref)
    np.testing.assert_array_equal(row[:first], ref[:first])
    assert (row[first:] == eos).all()
  with pytest.raises(errors.ShapeError, match="positions"):
    gpt2.generate(model, params, prompt, key=jax.random.key(0), max_new_tokens=61)


def test_sampling_filters():
  keys = jax.random.split(jax.random.key(0), 400)
  probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
  logits = jnp.log(probs)

  def draw(keys, **kw):
    return jax.jit(jax.vmap(lambda k: gpt2.sample_logits(logits, k, **kw)[0]))(keys)

  assert set(np.asarray(draw(keys, top_k=3)).tolist()) == {0, 1, 2}
  # Mass before token 1 is 0.5 < 0.7, before token 2 it is 0.8: nucleus {0, 1}.
  assert set(np.asarray(draw(keys, top_p=0.7)).tolist()) == {0, 1}
  assert int(gpt2.sample_logits(logits, keys[0], temperature=0.0)[0]) == 0


def _reference_perplexity(model, params, ids, max_length, stride):
  """The loop of the Hugging Face perplexity guide, one unpadded window at a time."""
  nll_sum, count, prev_end = 0.0, 0, 0
  for begin in range(0, len(ids), stride):
    end = min(begin + max_length, len(ids))
    window = ids[begin:end]
    nll = lm.token_nll(_apply(model, params, window[None])[0, :-1], window[1:])
    scored = nll[-(end - prev_end):]
    nll_sum, count, prev_end = nll_sum + float(scored.sum()), count + scored.size, end
    if end == len(ids):
      break
  return np.exp(nll_sum / count), count


def test_strided_perplexity_matches_the_guide_loop(tiny, stride=12):
  model, params = tiny
  ids = _ids(1, 152, seed=3)[0]  # 152 = 32 + 10 * 12: every window is full, one shape.
  ours = lm.perplexity(functools.partial(_apply, model), params, ids,
                       seq_len=31, batch_size=4, stride=stride)
  ref, count = _reference_perplexity(model, params, ids, max_length=32, stride=stride)
  assert ours["tokens"] == count == len(ids) - 1
  np.testing.assert_allclose(ours["perplexity"], ref, rtol=1e-5)


def test_uniform_model_has_perplexity_of_the_vocabulary():
  ids = np.arange(100) % 7
  result = lm.perplexity(lambda p, x: jnp.zeros(x.shape + (50,)), None, ids,
                         seq_len=16, batch_size=3)
  assert result["tokens"] == 99
  np.testing.assert_allclose(result["perplexity"], 50.0, rtol=1e-5)


# --- Structural head pruning -------------------------------------------------------------

PRUNE_MASKS = {
    "uneven": [[1, 0, 1, 1], [0, 1, 0, 0]],
    "empty_layer": [[0, 0, 0, 0], [1, 1, 0, 1]],
}


@pytest.mark.parametrize("name", PRUNE_MASKS)
def test_structural_pruning_equals_masking_and_cuts_flops(tiny, name):
  model, params = tiny
  mask = jnp.asarray(PRUNE_MASKS[name], jnp.float32)
  small, small_params = gpt2.prune_heads(model, params, mask)
  heads = tuple(int(x) for x in mask.sum(1))
  assert small.config.heads_per_layer == heads
  ids = _ids(2, 16)
  masked, aux = _apply(model, params, ids, head_mask=mask, output_attentions=True)
  pruned, small_aux = _apply(small, small_params, ids, output_attentions=True)
  chex.assert_trees_all_close(pruned, masked, atol=1e-5, rtol=0)
  for i, row in enumerate(np.asarray(mask)):  # Kept heads in order, absent heads zero.
    kept = np.flatnonzero(row)
    chex.assert_trees_all_close(small_aux["attentions"][i, :, :len(kept)],
                                aux["attentions"][i][:, kept], atol=1e-6)
    assert float(jnp.abs(small_aux["attentions"][i, :, len(kept):]).max(initial=0.0)) == 0.0
  hd, d = model.config.head_dim, model.config.n_embd
  removed = int(mask.size - mask.sum())
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  assert count(params) - count(small_params) == removed * (3 * (d * hd + hd) + hd * d)
  flops = lambda m, p: ponder_analysis.compiled_flops(
      lambda p, x: m.apply({"params": p}, x), p, jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert flops(small, small_params) < flops(model, params)


def test_pruning_a_pruned_model_and_decoding_with_its_cache(tiny):
  model, params = tiny
  first = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1]], jnp.float32)
  small, small_params = gpt2.prune_heads(model, params, first)
  # Remove one more head per layer: the 2nd remaining of layer 0 (original head 1) and
  # the 1st of layer 1 (original head 0); trailing entries of a row are ignored.
  second = jnp.asarray([[1, 0, 1, 0], [0, 1, 1, 1]], jnp.float32)
  smaller, smaller_params = gpt2.prune_heads(small, small_params, second)
  assert smaller.config.heads_per_layer == (2, 2)
  combined = jnp.asarray([[1, 0, 0, 1], [0, 0, 1, 1]], jnp.float32)
  ids = _ids(2, 16)
  reference = _apply(model, params, ids, head_mask=combined)
  chex.assert_trees_all_close(_apply(smaller, smaller_params, ids), reference, atol=1e-5)
  cache = gpt2.init_cache(smaller.config, 2, 16)
  assert [k.shape[2] for k in cache.keys] == [2, 2]
  first_half, aux = _apply(smaller, smaller_params, ids[:, :8], cache=cache)
  second_half, _ = _apply(smaller, smaller_params, ids[:, 8:], cache=aux["cache"])
  chex.assert_trees_all_close(jnp.concatenate([first_half, second_half], axis=1), reference,
                              atol=1e-5)


def test_pruned_checkpoint_round_trip_and_default_tree(tiny, tmp_path):
  model, params = tiny
  small, small_params = gpt2.prune_heads(
      model, params, jnp.asarray([[0, 1, 1, 1], [0, 0, 0, 0]], jnp.float32))
  gpt2.to_hf(small, small_params, tmp_path)
  model_back, params_back = gpt2.from_hf(tmp_path)
  assert model_back.config == small.config and model_back.config.heads_per_layer == (3, 0)
  ids = _ids(2, 16)
  chex.assert_trees_all_close(_apply(model_back, params_back, ids),
                              _apply(small, small_params, ids), atol=1e-6)
  # Full heads everywhere is the default model's parameter tree.
  full = gpt2.GPT2(gpt2.GPT2Config(**TINY, heads_per_layer=(4, 4)))
  shapes = jax.eval_shape(lambda: full.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, params)
  with pytest.raises(errors.ConfigError, match="heads_per_layer"):
    gpt2.GPT2Config(**TINY, heads_per_layer=(4, 5))
  with pytest.raises(errors.PonderError, match="0/1"):
    gpt2.prune_heads(model, params, jnp.full((2, 4), 0.5))
