"""Tests for vlp.models.downstream: fine-tuning heads, dual encoder, name tables.

The backbone itself is checked against numpy in test_model.py; here each head is
recomputed in float64 numpy, torch layout (y = x W^T + b), from a state dict built
through `torch_name_table(num_layers, model.torch_heads)`, so the same checks also
validate the new table rows and their transposes.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from vlp import config_lib
from vlp.jobs import grounding
from vlp.models.downstream import (PADDED_REGION_SCORE, UniterForGrounding,
                                   UniterForRetrieval, UniterForVqa)
from vlp.models.torch_names import FINETUNING_HEADS, torch_name_table
from vlp.models.uniter import DUAL_LAYERS
from vlp.models.uniter_config import model_config

B, T, K = 3, 6, 5
TXT_LEN = (6, 4, 2)
IMG_LEN = (5, 3, 1)
A, E = 11, 8
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, img_dim=24,
             num_region_classes=7, vocab_size=50, max_position_embeddings=16)
H, I = SMALL['hidden_size'], SMALL['intermediate_size']


def _cfg(**kw):
  return model_config('tiny', **{**SMALL, **kw})


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  txt_mask = np.arange(T)[None] < np.array(TXT_LEN)[:, None]
  img_mask = np.arange(K)[None] < np.array(IMG_LEN)[:, None]
  return dict(
      input_ids=np.where(txt_mask, rng.integers(1, SMALL['vocab_size'], (B, T)), 0)
      .astype(np.int32),
      txt_mask=txt_mask,
      img_feat=rng.normal(size=(B, K, SMALL['img_dim'])).astype(np.float32),
      img_pos=rng.random((B, K, 7)).astype(np.float32), img_mask=img_mask)


def _filled(make, seed=0):
  """A model with random values in every parameter (biases and LNs included)."""
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = rng.normal(size=v.shape) * 0.1 + (1.0 if path[-1] == 'scale' else 0.0)
    v.set_value(jnp.asarray(value, v.dtype))
  return model


def _params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_sd(model):
  params = _params(model)
  return {key: (params[path].T if how == 'transpose' else params[path]).astype(np.float64)
          for key, path, how in torch_name_table(model.cfg.num_layers, model.torch_heads)}


def _count(module):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _ln(x, w, b, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
  return x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))


def _mlp_numpy(sd, name, x):
  lin = lambda y, n: y @ sd[f'{n}.weight'].T + sd[f'{n}.bias']
  y = _gelu(lin(x, f'{name}.0'))
  y = _ln(y, sd[f'{name}.2.weight'], sd[f'{name}.2.bias'])
  return lin(y, f'{name}.3')


@nnx.jit
def _forward(model, batch):
  """`encode`, plus the dual encodings `txt`/`img` where the model has them."""
  out = model.encode(batch)
  if getattr(model, 'dual_output', None) is not None:
    out.update(txt=model.encode_text(batch), img=model.encode_image(batch))
  return out


@nnx.jit
def _pooled(model, batch):
  return model.uniter(batch['input_ids'], batch['txt_mask'], batch['img_feat'],
                      batch['img_pos'], batch['img_mask'])[1]


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# ---------------------------------------------------------------- VQA

def test_vqa_head_matches_numpy_and_counts():
  model = _filled(lambda: UniterForVqa(_cfg(), num_answers=A, rngs=nnx.Rngs(0)))
  out = _np(_forward(model, _batch()))
  assert out['vqa_logits'].shape == (B, A) and out['vqa_logits'].dtype == np.float32
  assert out['pooled'].shape == (B, H) and out['sequence'].shape == (B, T + K, H)
  want = _mlp_numpy(_torch_sd(model), 'vqa_output', out['pooled'].astype(np.float64))
  np.testing.assert_allclose(out['vqa_logits'], want, atol=1e-5, rtol=1e-5)
  # Linear H->2H, LN(2H), Linear 2H->A.
  head = (H * 2 * H + 2 * H) + 2 * (2 * H) + (2 * H * A + A)
  assert _count(model.vqa_output) == head
  assert _count(model) == _count(model.uniter) + head
  assert set(p[0] for p in _params(model)) == {'uniter', 'vqa_output'}


def test_vqa_base_head_size_and_default_answers():
  m = nnx.eval_shape(lambda: UniterForVqa(model_config('base'), rngs=nnx.Rngs(0)))
  assert m.num_answers == 3129
  # 768*1536 + 1536 + 2*1536 + 1536*3129 + 3129, worked by hand.
  assert _count(m.vqa_output) == 5_993_529
  with pytest.raises(ValueError):
    UniterForVqa(_cfg(), num_answers=0, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- grounding

@pytest.mark.parametrize('mlp', [1, 2])
def test_grounding_scores_match_numpy_and_mask_padding(mlp):
  model = _filled(lambda: UniterForGrounding(_cfg(), mlp=mlp, rngs=nnx.Rngs(0)))
  batch = _batch()
  out = _np(_forward(model, batch))
  scores = out['region_scores']
  assert scores.shape == (B, K) and scores.dtype == np.float32
  sd = _torch_sd(model)
  regions = out['sequence'][:, T:].astype(np.float64)
  if mlp == 1:
    want = regions @ sd['re_output.weight'].T + sd['re_output.bias']
    assert _count(model.re_output) == H + 1
  else:
    want = _mlp_numpy(sd, 're_output', regions)
    assert _count(model.re_output) == (H * H + H) + 2 * H + (H + 1)
  want = want[..., 0]
  real = batch['img_mask']
  np.testing.assert_allclose(scores[real], want[real], atol=1e-5, rtol=1e-5)
  assert np.all(scores[~real] == PADDED_REGION_SCORE)
  # A padded region is never the argmax, even for the 1-region example.
  assert np.all(real[np.arange(B), scores.argmax(-1)])
  assert model.torch_heads == (('re_output',) if mlp == 1 else ('re_output_mlp2',))


# ---------------------------------------------------------------- retrieval

@pytest.fixture(scope='module')
def retrieval():
  model = _filled(lambda: UniterForRetrieval(_cfg(), dual_dim=E, rngs=nnx.Rngs(0)))
  params = _params(model)
  # After filling, rank_output is unrelated to itm_output ...
  assert not np.allclose(params[('rank_output', 'kernel')][:, 0],
                         params[('itm_output', 'kernel')][:, 1])
  model.init_rank_from_itm()
  return model, _np(_forward(model, _batch()))


def test_rank_head_initialised_from_itm_match_row(retrieval):
  model, out = retrieval
  sd = _torch_sd(model)
  np.testing.assert_array_equal(sd['rank_output.weight'][0], sd['itm_output.weight'][1])
  np.testing.assert_array_equal(sd['rank_output.bias'], sd['itm_output.bias'][1:])
  assert out['rank_scores'].shape == (B,) and out['rank_scores'].dtype == np.float32
  pooled = out['pooled'].astype(np.float64)
  itm_match = pooled @ sd['itm_output.weight'][1] + sd['itm_output.bias'][1]
  np.testing.assert_allclose(out['rank_scores'], itm_match, atol=1e-5, rtol=1e-5)
  # Fresh construction already copies the row.
  @jax.jit
  def fresh_heads():
    fresh = UniterForRetrieval(_cfg(num_layers=1), rngs=nnx.Rngs(3))
    return [fresh.rank_output.kernel[...], fresh.rank_output.bias[...],
            fresh.itm_output.kernel[...]]
  rank_k, rank_b, itm_k = _np(fresh_heads())
  np.testing.assert_array_equal(rank_k[:, 0], itm_k[:, 1])
  assert np.abs(rank_k).max() > 0 and rank_b.shape == (1,)
  fresh = nnx.eval_shape(lambda: UniterForRetrieval(_cfg(num_layers=1), rngs=nnx.Rngs(3)))
  assert fresh.dual_output is None and fresh.torch_heads == ('itm_output', 'rank_output')
  with pytest.raises(ValueError, match='dual'):
    fresh._dual(jnp.zeros((B, T, H)), jnp.ones((B, T), bool), None)


def test_retrieval_param_counts(retrieval):
  model, _ = retrieval
  layer = 4 * (H * H + H) + 2 * (2 * H) + (H * I + I) + (I * H + H)  # q k v o, 2 LN, FFN
  assert _count(model.uniter.encoder[0]) == layer
  assert (_count(model) == _count(model.uniter) + (2 * H + 2) + (H + 1)
          + DUAL_LAYERS * layer + (H * E + E))


@nnx.jit
def _embedded(model, batch):
  return model.uniter(batch['input_ids'], batch['txt_mask'], batch['img_feat'],
                      batch['img_pos'], batch['img_mask'], num_layers=0)[0]


def _dual_head_numpy(sd, x, mask, cfg):
  """ALADIN's matching head in float64 numpy: DUAL_LAYERS post-LN layers, token 0, proj."""
  lin = lambda y, n: y @ sd[f'{n}.weight'].T + sd[f'{n}.bias']
  norm = lambda y, n: _ln(y, sd[f'{n}.weight'], sd[f'{n}.bias'])
  n, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
  heads = lambda y: y.reshape(y.shape[0], -1, n, d).transpose(0, 2, 1, 3)
  bias = (1.0 - mask.astype(np.float64))[:, None, None, :] * -10000.0
  for i in range(DUAL_LAYERS):
    p = f'dual_output.encoder.layer.{i}'
    q, k, v = (heads(lin(x, f'{p}.attention.self.{w}')) for w in ('query', 'key', 'value'))
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], -1, cfg.hidden_size)
    att = norm(lin(ctx, f'{p}.attention.output.dense') + x, f'{p}.attention.output.LayerNorm')
    x = norm(lin(_gelu(lin(att, f'{p}.intermediate.dense')), f'{p}.output.dense') + att,
             f'{p}.output.LayerNorm')
  e = lin(x[:, 0], 'dual_output.proj')
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_dual_encodings_are_single_modality_and_unit_norm(retrieval):
  (model, out), batch = retrieval, _batch()
  for name in ('txt', 'img'):
    assert out[name].shape == (B, E) and out[name].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[name], axis=-1), 1.0, atol=1e-5)
  sd = _torch_sd(model)
  # The head reads the embedding output: layer 0 of the backbone, not its last layer.
  emb = np.asarray(_embedded(model, batch), np.float64)
  assert not np.allclose(emb, _np(_forward(model, batch))['sequence'], atol=1e-2)

  # Text-only == the joint sequence with every region masked out.
  no_img = dict(batch, img_mask=np.zeros((B, K), bool))
  want_txt = _dual_head_numpy(sd, np.asarray(_embedded(model, no_img), np.float64),
                              np.concatenate([no_img['txt_mask'], no_img['img_mask']], 1),
                              model.cfg)
  np.testing.assert_allclose(out['txt'], want_txt, atol=1e-5)
  # Image-only == the joint sequence with only [CLS] left of the text.
  cls_only = dict(batch, txt_mask=np.arange(T)[None].repeat(B, 0) == 0)
  want_img = _dual_head_numpy(sd, np.asarray(_embedded(model, cls_only), np.float64),
                              np.concatenate([cls_only['txt_mask'], batch['img_mask']], 1),
                              model.cfg)
  np.testing.assert_allclose(out['img'], want_img, atol=1e-5)

  # Each encoding ignores the other modality entirely.
  rng = np.random.default_rng(5)
  other = dict(batch, img_feat=rng.normal(size=batch['img_feat'].shape).astype(np.float32),
               img_mask=np.ones((B, K), bool))
  other['input_ids'] = batch['input_ids'].copy()
  other['input_ids'][:, 1:] = rng.integers(1, SMALL['vocab_size'], (B, T - 1))
  changed = _np(_forward(model, other))
  assert not np.allclose(changed['img'], out['img'], atol=1e-3)
  swapped_img = dict(other, input_ids=batch['input_ids'], txt_mask=batch['txt_mask'])
  np.testing.assert_allclose(_np(_forward(model, swapped_img))['txt'], out['txt'], atol=1e-6)
  swapped_txt = dict(batch, input_ids=other['input_ids'],
                     txt_mask=np.ones((B, T), bool))
  np.testing.assert_allclose(_np(_forward(model, swapped_txt))['img'], out['img'], atol=1e-6)


# ---------------------------------------------------------------- shared checks

def _models():
  cfg = _cfg()
  return {
      'vqa': nnx.eval_shape(lambda: UniterForVqa(cfg, num_answers=A, rngs=nnx.Rngs(0))),
      're1': nnx.eval_shape(lambda: UniterForGrounding(cfg, rngs=nnx.Rngs(0))),
      're2': nnx.eval_shape(lambda: UniterForGrounding(cfg, mlp=2, rngs=nnx.Rngs(0))),
      'rank': nnx.eval_shape(lambda: UniterForRetrieval(cfg, rngs=nnx.Rngs(0))),
      'dual': nnx.eval_shape(lambda: UniterForRetrieval(cfg, dual_dim=E, rngs=nnx.Rngs(0))),
  }


def test_torch_name_tables_cover_every_parameter_once():
  heads = set()
  for name, model in _models().items():
    table = torch_name_table(model.cfg.num_layers, model.torch_heads)
    params = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    paths = [p for _, p, _ in table]
    keys = [k for k, _, _ in table]
    assert len(set(paths)) == len(paths) and len(set(keys)) == len(keys), name
    assert set(paths) == set(params), name
    for key, path, how in table:
      assert how == ('transpose' if path[-1] == 'kernel' else 'identity')
      assert key.endswith('.bias' if path[-1] == 'bias' else '.weight')
    heads.update(model.torch_heads)
  assert set(FINETUNING_HEADS) <= heads
  table = {k: p for k, p, _ in torch_name_table(2, ('vqa_output', 're_output_mlp2'))}
  assert table['vqa_output.2.weight'] == ('vqa_output', 2, 'scale')
  assert table['re_output.3.weight'] == ('re_output', 3, 'kernel')
  with pytest.raises(ValueError, match='nope'):
    torch_name_table(2, ('nope',))


def test_logical_axis_names_on_every_parameter():
  for name, model in _models().items():
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = v.get_metadata().get('out_sharding')
      assert names is not None and len(names) == len(v.shape), (name, path)
  m = _models()
  names = lambda model: {p: v.get_metadata()['out_sharding']
                         for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  vqa = names(m['vqa'])
  assert vqa[('vqa_output', 0, 'kernel')] == ('embed', 'mlp')
  assert vqa[('vqa_output', 2, 'scale')] == ('mlp',)
  assert vqa[('vqa_output', 3, 'kernel')] == ('mlp', 'classes')
  assert vqa[('vqa_output', 3, 'bias')] == ('classes',)
  assert names(m['re1'])[('re_output', 'kernel')] == ('embed', None)
  dual = names(m['dual'])
  assert dual[('rank_output', 'kernel')] == ('embed', None)
  assert dual[('dual_output', 'proj', 'kernel')] == ('embed', None)
  assert dual[('dual_output', 'encoder', 1, 'intermediate', 'dense', 'kernel')] == ('embed', 'mlp')


def test_bf16_compute_keeps_float32_heads():
  cfg32, cfg16 = _cfg(num_layers=1), _cfg(num_layers=1, dtype='bfloat16')
  batch = _batch()
  for make in (lambda c: UniterForVqa(c, num_answers=A, rngs=nnx.Rngs(0)),
               lambda c: UniterForRetrieval(c, dual_dim=E, rngs=nnx.Rngs(0))):
    m32 = _filled(lambda: make(cfg32), seed=2)
    m16 = _filled(lambda: make(cfg16), seed=3)
    nnx.update(m16, nnx.state(m32, nnx.Param))
    o32, o16 = _np(_forward(m32, batch)), _np(_forward(m16, batch))
    assert o16['sequence'].dtype == jnp.bfloat16
    key = next(k for k in o16 if k not in ('sequence', 'pooled'))
    assert o16[key].dtype == np.float32, key
    err = np.abs(o16[key] - o32[key])
    assert err.max() < 0.05 * np.abs(o32[key]).max() + 0.02, key
    if isinstance(m16, UniterForRetrieval):
      assert o16['txt'].dtype == o16['img'].dtype == np.float32
      np.testing.assert_allclose(o16['txt'], o32['txt'], atol=0.05)
      np.testing.assert_allclose(o16['img'], o32['img'], atol=0.05)


@pytest.mark.parametrize('data, mlp', [('refcoco', 1), ('refcoco_plus', 2), ('refcocog', 1)])
def test_refcoco_configs_build_the_reference_head_of_their_dataset(data, mlp):
  # The reference's `train-refcoco*-base-1gpu.json`: only RefCOCO+ sets mlp=2, a
  # head whose torch state dict is re_output.{0 Linear H->H, 2 LayerNorm, 3 Linear H->1}.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config_file(
      os.path.join(repo, f'configs/finetune_refcoco.py:data={data}'))
  assert config.grounding_mlp == mlp
  model = _filled(lambda: grounding.grounding_model(config, _cfg())(rngs=nnx.Rngs(0)))
  heads = {k: v.shape for k, v in _torch_sd(model).items() if k.startswith('re_output')}
  assert heads == ({'re_output.weight': (1, H), 're_output.bias': (1,)} if mlp == 1 else
                   {'re_output.0.weight': (H, H), 're_output.0.bias': (H,),
                    're_output.2.weight': (H,), 're_output.2.bias': (H,),
                    're_output.3.weight': (1, H), 're_output.3.bias': (1,)})
  config.grounding_mlp = 3
  with pytest.raises(ValueError, match='config.grounding_mlp must be 1 or 2'):
    grounding.grounding_model(config, _cfg())
