"""Tests for vlp.models: UNITER backbone, pre-training heads, config, name table.

The forward pass is checked against an independent float64 numpy implementation of
the UNITER reference's formulas (embedders, post-LN BERT layers, pooler and the
pre-training heads; docs/reference.md) written in torch conventions: its weights are a
"torch state dict" built from the nnx state through `torch_name_table`, so the same
check also validates the table's renames and transposes.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from vlp.models import layers
from vlp.models.pretraining import UniterForPretraining
from vlp.models.torch_names import TIED_TORCH_KEYS, torch_name_table
from vlp.models.uniter import Uniter
from vlp.models.uniter_config import model_config

B, T, K = 3, 7, 5
TXT_LEN = (7, 4, 2)
IMG_LEN = (5, 3, 1)
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, img_dim=24,
             num_region_classes=7, vocab_size=50, max_position_embeddings=16)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  txt_mask = np.arange(T)[None] < np.array(TXT_LEN)[:, None]
  img_mask = np.arange(K)[None] < np.array(IMG_LEN)[:, None]
  img_masked = np.zeros((B, K), bool)
  img_masked[0, [1, 3]] = True
  img_masked[1, 0] = True
  img_feat = rng.normal(size=(B, K, SMALL['img_dim'])).astype(np.float16)
  img_feat[img_masked] = 0  # as the MRM collate does
  return dict(
      input_ids=np.where(txt_mask, rng.integers(1, SMALL['vocab_size'], (B, T)), 0)
      .astype(np.int32),
      txt_mask=txt_mask, img_feat=img_feat,
      img_pos=rng.random((B, K, 7)).astype(np.float32),
      img_mask=img_mask, img_masked=img_masked)


def _flat_params(model):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_state_dict(model, num_layers):
  """nnx params -> torch-layout numpy dict (float64), via the converter table."""
  params = _flat_params(model)
  fix = lambda a, how: a.T if how == 'transpose' else a
  sd = {key: fix(params[path], how).astype(np.float64)
        for key, path, how in torch_name_table(num_layers)}
  for key, (path, how) in TIED_TORCH_KEYS.items():
    sd[key] = fix(params[path], how).astype(np.float64)
  return sd


def _heads_fn(model, batch):
  out = model.encode(batch)
  seq = out['sequence']
  return dict(out, mlm=model.mlm_logits(seq[:, :T]), mrfr=model.mrfr_prediction(seq[:, T:]),
              mrc=model.mrc_logits(seq[:, T:]))


_jit_heads = nnx.jit(_heads_fn)


def _filled(cfg, cls=UniterForPretraining, seed=0):
  """A model with random parameter values (biases and LNs included) and no init cost.

  Eager random init compiles one XLA kernel per parameter shape; building the
  abstract model and writing numpy values keeps the tests fast and also makes every
  bias and LayerNorm parameter non-trivial for the numpy comparison.
  """
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = rng.normal(size=v.shape) * 0.1 + (1.0 if path[-1] == 'scale' else 0.0)
    v.set_value(jnp.asarray(value, v.dtype))
  return model


@pytest.fixture(scope='module')
def cfg():
  return model_config('tiny', **SMALL)


@pytest.fixture(scope='module')
def model(cfg):
  return _filled(cfg)


@pytest.fixture(scope='module')
def outputs(model):
  return jax.tree.map(np.asarray, _jit_heads(model, _batch()))


# ---------------------------------------------------------------- numpy reference

def _ln(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p[0] + p[1]


def _gelu(x):
  return x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))


def _numpy_reference(sd, cfg, batch):
  """UNITER forward + heads in float64 numpy, torch layout (y = x W^T + b)."""
  lin = lambda x, name: x @ sd[f'{name}.weight'].T + sd[f'{name}.bias']
  norm = lambda x, name: _ln(x, (sd[f'{name}.weight'], sd[f'{name}.bias']))
  e = 'uniter.embeddings'
  types = sd[f'{e}.token_type_embeddings.weight']
  txt = (sd[f'{e}.word_embeddings.weight'][batch['input_ids']]
         + sd[f'{e}.position_embeddings.weight'][:T][None] + types[0])
  txt = norm(txt, f'{e}.LayerNorm')
  i = 'uniter.img_embeddings'
  feat = (batch['img_feat'].astype(np.float64)
          + batch['img_masked'][..., None] * sd[f'{i}.mask_embedding.weight'][1])
  img = (norm(lin(feat, f'{i}.img_linear'), f'{i}.img_layer_norm')
         + norm(lin(batch['img_pos'].astype(np.float64), f'{i}.pos_linear'),
                f'{i}.pos_layer_norm') + types[1])
  img = norm(img, f'{i}.LayerNorm')
  x = np.concatenate([txt, img], 1)
  mask = np.concatenate([batch['txt_mask'], batch['img_mask']], 1).astype(np.float64)
  bias = (1.0 - mask)[:, None, None, :] * -10000.0
  n, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
  heads = lambda y: y.reshape(B, -1, n, d).transpose(0, 2, 1, 3)
  for layer in range(cfg.num_layers):
    p = f'uniter.encoder.layer.{layer}'
    q, k, v = (heads(lin(x, f'{p}.attention.self.{w}')) for w in ('query', 'key', 'value'))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, -1, cfg.hidden_size)
    att = norm(lin(ctx, f'{p}.attention.output.dense') + x, f'{p}.attention.output.LayerNorm')
    x = norm(lin(_gelu(lin(att, f'{p}.intermediate.dense')), f'{p}.output.dense') + att,
             f'{p}.output.LayerNorm')
  pooled = np.tanh(lin(x[:, 0], 'uniter.pooler.dense'))
  t = norm(_gelu(lin(x[:, :T], 'cls.predictions.transform.dense')),
           'cls.predictions.transform.LayerNorm')
  mlm = t @ sd['cls.predictions.decoder.weight'].T + sd['cls.predictions.bias']
  r = norm(_gelu(lin(x[:, T:], 'feat_regress.net.0')), 'feat_regress.net.2')
  mrfr = r @ sd['feat_regress.weight'] + sd['feat_regress.bias']
  c = norm(_gelu(lin(x[:, T:], 'region_classifier.net.0')), 'region_classifier.net.2')
  mrc = lin(c, 'region_classifier.net.3')
  return dict(sequence=x, pooled=pooled, itm_logits=lin(pooled, 'itm_output'), mlm=mlm,
              mrfr=mrfr, mrc=mrc)


def test_forward_matches_numpy_reference(model, cfg, outputs):
  ref = _numpy_reference(_torch_state_dict(model, cfg.num_layers), cfg, _batch())
  for name, want in ref.items():
    got = outputs[name]
    assert got.dtype == np.float32, name
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_padding_invariance(model, outputs):
  batch = _batch()
  rng = np.random.default_rng(7)
  txt_pad, img_pad = ~batch['txt_mask'], ~batch['img_mask']
  batch['input_ids'] = np.where(txt_pad, rng.integers(1, SMALL['vocab_size'], (B, T)),
                                batch['input_ids']).astype(np.int32)
  batch['img_feat'] = np.where(img_pad[..., None], rng.normal(size=batch['img_feat'].shape),
                               batch['img_feat']).astype(np.float16)
  batch['img_pos'] = np.where(img_pad[..., None], 5.0, batch['img_pos']).astype(np.float32)
  changed = jax.tree.map(np.asarray, _jit_heads(model, batch))
  real = np.concatenate([batch['txt_mask'], batch['img_mask']], 1)
  np.testing.assert_allclose(changed['sequence'][real], outputs['sequence'][real], atol=1e-6)
  np.testing.assert_allclose(changed['pooled'], outputs['pooled'], atol=1e-6)


@nnx.jit
def _tied_fn(model, hidden):
  """Head outputs, their inputs to the tied matmuls, and gradients, in one compile."""
  x = hidden
  for layer in model.feat_regress.net:
    x = layer(x)
  mlm_grads = nnx.grad(lambda m: jnp.sum(m.mlm_logits(hidden)[:, 3]))(model)
  mrfr_grads = nnx.grad(lambda m: jnp.sum(m.mrfr_prediction(hidden)))(model)
  return dict(
      mlm_in=model.cls.transform(hidden), mlm=model.mlm_logits(hidden), mrfr_in=x,
      mrfr=model.mrfr_prediction(hidden),
      word_grad=mlm_grads['uniter']['embeddings']['word_embeddings']['embedding'][...],
      img_linear_grad=mrfr_grads['uniter']['img_embeddings']['img_linear']['kernel'][...])


@pytest.fixture(scope='module')
def tied(model, cfg):
  hidden = np.random.default_rng(3).normal(size=(4, cfg.hidden_size)).astype(np.float32)
  return jax.tree.map(np.asarray, _tied_fn(model, hidden))


def test_mlm_decoder_is_tied_to_word_embeddings(model, tied):
  table = np.asarray(model.uniter.embeddings.word_embeddings.embedding[...])
  want = tied['mlm_in'] @ table.T + np.asarray(model.cls.bias[...])
  np.testing.assert_allclose(tied['mlm'], want, atol=1e-5)
  # No second [vocab, H] parameter exists: the decoder really is the table.
  same_shape = [p for p, v in _flat_params(model).items() if v.shape == table.shape]
  assert same_shape == [('uniter', 'embeddings', 'word_embeddings', 'embedding')]
  # d(sum of logit 3)/dE is nonzero on row 3 only: the gradient reaches the table.
  g = tied['word_grad']
  assert np.abs(g[3]).max() > 0 and np.abs(np.delete(g, 3, axis=0)).max() == 0


def test_mrfr_is_transpose_tied_to_img_linear(model, cfg, tied):
  kernel = np.asarray(model.uniter.img_embeddings.img_linear.kernel[...])
  assert kernel.shape == (cfg.img_dim, cfg.hidden_size)
  want = tied['mrfr_in'] @ kernel.T + np.asarray(model.feat_regress.bias[...])
  np.testing.assert_allclose(tied['mrfr'], want, atol=1e-5)
  assert np.abs(tied['img_linear_grad']).max() > 0


@nnx.jit
def _img_embed_variants(emb, feat, pos, type_row, masked, v_mask):
  added = feat.astype(jnp.float32) + masked[..., None] * v_mask
  return dict(plain=emb(feat, pos, type_row), masked=emb(feat, pos, type_row, masked),
              none_masked=emb(feat, pos, type_row, jnp.zeros_like(masked)),
              added=emb(added, pos, type_row))


def test_v_mask_added_only_to_masked_regions(model):
  emb = model.uniter.img_embeddings
  batch = _batch()
  masked = batch['img_masked']
  type_row = np.asarray(model.uniter.embeddings.token_type_embeddings.embedding[...])[1]
  v_mask = np.asarray(emb.mask_embedding.embedding[...])[1]
  out = jax.tree.map(np.asarray, _img_embed_variants(
      emb, batch['img_feat'], batch['img_pos'], type_row, masked, v_mask))
  np.testing.assert_array_equal(out['masked'][~masked], out['plain'][~masked])
  assert np.abs(out['masked'][masked] - out['plain'][masked]).min() > 0
  np.testing.assert_allclose(out['masked'], out['added'], atol=1e-6)
  np.testing.assert_array_equal(out['none_masked'], out['plain'])


def test_init_distribution():
  cfg = model_config('tiny', initializer_range=0.05)
  rngs = nnx.Rngs(0)
  dense = layers.Dense(64, 48, cfg, names=('embed', 'mlp'), rngs=rngs)
  embed = layers.Embed(64, 48, cfg, names=('vocab', 'embed'), rngs=rngs)
  norm = layers.LayerNorm(48, cfg)
  for w in (np.asarray(dense.kernel[...]), np.asarray(embed.embedding[...])):
    assert abs(w.std() - 0.05) < 0.005 and abs(w.mean()) < 0.005
  assert not np.any(dense.bias[...]) and not np.any(norm.bias[...])
  assert np.all(np.asarray(norm.scale[...]) == 1.0)


@pytest.fixture(scope='module')
def abstract_base():
  return nnx.eval_shape(lambda: UniterForPretraining(model_config('base'), rngs=nnx.Rngs(0)))


def _count(module):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_parameter_counts_match_reference(abstract_base):
  # Counted on the reference torch modules: base backbone 109.9M, 87.6M without word
  # embeddings, 112.9M with the pre-training heads (tied weights once).
  m, backbone, no_words, full = abstract_base, 109.9, 87.6, 112.9
  words = int(np.prod(m.uniter.embeddings.word_embeddings.embedding.shape))
  assert round(_count(m.uniter) / 1e6, 1) == backbone
  assert round((_count(m.uniter) - words) / 1e6, 1) == no_words
  assert round(_count(m) / 1e6, 1) == full


def test_torch_name_table_covers_every_parameter_once(model, cfg, abstract_base):
  for m, num_layers in ((model, cfg.num_layers), (abstract_base, 12)):
    table = torch_name_table(num_layers)
    params = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
    paths = [path for _, path, _ in table]
    keys = [key for key, _, _ in table]
    assert len(set(paths)) == len(paths) and len(set(keys)) == len(keys)
    assert set(paths) == set(params)
    assert not set(keys) & set(TIED_TORCH_KEYS)
    for key, path, how in table:
      # Exactly the Linear weights transpose; the leaf names must agree.
      assert how == ('transpose' if path[-1] == 'kernel' else 'identity')
      assert key.endswith('.bias' if path[-1] == 'bias' else '.weight')
    for path, _ in TIED_TORCH_KEYS.values():
      assert path in params
  backbone = {p for p, _ in nnx.to_flat_state(nnx.state(model.uniter, nnx.Param))}
  assert backbone == {p[1:] for _, p, _ in torch_name_table(cfg.num_layers)
                      if p[0] == 'uniter'}


def test_logical_axis_names(model):
  names = {path: v.get_metadata().get('out_sharding')
           for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert all(n is not None and len(n) == len(v[...].shape) for (p, v), n in
             zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), names.values()))
  u = ('uniter',)
  assert names[u + ('embeddings', 'word_embeddings', 'embedding')] == ('vocab', 'embed')
  assert names[u + ('img_embeddings', 'img_linear', 'kernel')] == ('region_feat', 'embed')
  assert names[u + ('img_embeddings', 'mask_embedding', 'embedding')] == (None, 'region_feat')
  assert names[u + ('encoder', 0, 'attention', 'self', 'query', 'kernel')] == ('embed', 'heads')
  assert names[u + ('encoder', 1, 'output', 'dense', 'kernel')] == ('mlp', 'embed')
  assert names[('cls', 'bias')] == ('vocab',)
  assert names[('region_classifier', 'net', 3, 'kernel')] == ('embed', 'classes')


def test_bf16_compute_close_to_fp32(model, outputs):
  bf16 = _filled(model_config('tiny', **SMALL, dtype='bfloat16'), seed=1)
  nnx.update(bf16, nnx.state(model, nnx.Param))
  got = jax.tree.map(np.asarray, _jit_heads(bf16, _batch()))
  assert got['sequence'].dtype == jnp.bfloat16
  for name in ('itm_logits', 'mlm', 'mrfr', 'mrc'):
    assert got[name].dtype == np.float32
  for name in ('sequence', 'pooled', 'mlm', 'mrfr', 'mrc', 'itm_logits'):
    err = np.abs(got[name].astype(np.float32) - outputs[name])
    scale = np.abs(outputs[name]).mean()
    assert err.mean() < 0.015 * scale and err.max() < 0.1 * scale, name


def _dropout_loss(m, batch, key):
  # Rngs are built inside the (differentiated) function, as the task losses do.
  seq, pooled = m(**batch, rngs=nnx.Rngs(dropout=key))
  return jnp.sum(seq ** 2) + jnp.sum(pooled)


@nnx.jit
def _dropout_and_remat_fn(plain, remat, batch):
  """Dropout forwards for two keys, and the remat model's dropout gradient."""
  key1, key2 = jax.random.key(1), jax.random.key(2)
  return dict(loss1=_dropout_loss(plain, batch, key1), loss2=_dropout_loss(plain, batch, key2),
              remat=nnx.value_and_grad(_dropout_loss)(remat, batch, key1))


def test_dropout_and_remat():
  small = dict(SMALL, num_layers=1)
  plain = _filled(model_config('tiny', **small), cls=Uniter)
  remat = _filled(model_config('tiny', **small, remat=True), cls=Uniter, seed=1)
  nnx.update(remat, nnx.state(plain, nnx.Param))
  batch = _batch()
  # cfg.remat wraps each layer in a checkpoint (checked on the traced program).
  prims = {}
  for name, m in (('plain', plain), ('remat', remat)):
    jaxpr = jax.make_jaxpr(lambda s: _dropout_loss(
        nnx.merge(nnx.graphdef(m), s), batch, jax.random.key(1)))(nnx.state(m))
    prims[name] = set(re.findall(r'= (\w+)\[', str(jaxpr)))
  is_remat = lambda p: bool(p & {'checkpoint', 'remat', 'remat2'})
  assert is_remat(prims['remat']) and not is_remat(prims['plain'])
  out = _dropout_and_remat_fn(plain, remat, batch)
  loss, grads = out['remat']
  # Another key draws other masks, so dropout is active.
  assert float(out['loss1']) != float(out['loss2'])
  # Remat (with Rngs passed through it) draws the same masks as the plain model.
  np.testing.assert_allclose(loss, out['loss1'], rtol=1e-6)
  g = np.asarray(grads['encoder'][0]['attention']['self']['query']['kernel'][...])
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_einsum_attention_matches_fused():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32) for _ in range(3))
  bias = layers.attention_bias(np.arange(5)[None] < np.array([[5], [2]]))
  fused, explicit = jax.jit(lambda *a: (layers.dot_product_attention(*a),
                                         layers.einsum_attention(*a)))(q, k, v, bias)
  np.testing.assert_allclose(fused, explicit, atol=1e-6)


def test_config_validation():
  assert model_config('base').hidden_size == 768
  assert model_config('large').num_layers == 24
  assert model_config('tiny', vocab_size=321).vocab_size == 321
  with pytest.raises(ValueError, match='hidden_size'):
    model_config('tiny', num_heads=5)
  with pytest.raises(ValueError, match='dtype'):
    model_config('tiny', dtype='float16')
  with pytest.raises(ValueError, match='param_dtype'):
    model_config('tiny', param_dtype='fp32')
  with pytest.raises(ValueError, match='attention_impl'):
    model_config('tiny', attention_impl='flash')
  with pytest.raises(ValueError, match='not_a_field'):
    model_config('tiny', not_a_field=1)
  with pytest.raises(ValueError, match='huge'):
    model_config('huge')
