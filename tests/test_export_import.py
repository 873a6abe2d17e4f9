"""Export of training checkpoints, import of reference UNITER checkpoints, loading.

A fake "released UNITER" checkpoint is written from a tiny model with random
parameters under the reference torch names (float16 and float32, with and without
the ``uniter.`` prefix); importing it must give back exactly those parameters (the
float16 ones rounded) and the same `encode` outputs. A real `vlp.checkpoint`
workdir (created with `create_train_state`) is exported and loaded back the same
way, and its ``model.safetensors`` is read with plain numpy.
"""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece as spm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

import vlp
from vlp import checkpoint as ckpt_lib, pretrained
from vlp.data.tokenizer import Tokenizer, WordPieceTokenizer
from vlp.parallel import mesh as mesh_lib, sharding as sharding_lib
from vlp.models.downstream import UniterForVqa
from vlp.models.pretraining import UniterForPretraining
from vlp.models.torch_names import TIED_TORCH_KEYS, torch_name_table
from vlp.models.uniter_config import model_config
from vlp.tools import import_uniter
from vlp.train.state import create_train_state

B, T, K = 3, 6, 5
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, img_dim=24,
             num_region_classes=7, vocab_size=60, max_position_embeddings=16)
# The reference's json model config for SMALL (BERT field names).
UNITER_JSON = {'vocab_size': 60, 'hidden_size': 32, 'num_hidden_layers': 2,
               'num_attention_heads': 4, 'intermediate_size': 64,
               'max_position_embeddings': 16, 'type_vocab_size': 2, 'hidden_act': 'gelu',
               'hidden_dropout_prob': 0.1, 'attention_probs_dropout_prob': 0.1,
               'initializer_range': 0.02}
VOCAB = (['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[unused1]', '!', ',',
          '.', 'a', 'the', 'red', 'cube', 'Hello', 'world', 'un', '##aff', '##able',
          'hello', '##s', '中', '[', ']', 'mask', '##a'])


def small_cfg(**kw):
  return model_config('tiny', **{**SMALL, **kw})


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  txt_mask = np.arange(T)[None] < np.array([6, 4, 2])[:, None]
  img_mask = np.arange(K)[None] < np.array([5, 3, 1])[:, None]
  return dict(
      input_ids=np.where(txt_mask, rng.integers(1, SMALL['vocab_size'], (B, T)), 0)
      .astype(np.int32),
      txt_mask=txt_mask,
      img_feat=rng.normal(size=(B, K, SMALL['img_dim'])).astype(np.float16),
      img_pos=rng.random((B, K, 7)).astype(np.float32), img_mask=img_mask)


def random_params(make, seed=0):
  """Pure param dict of `make`'s model with random values (LN scales around 1)."""
  rng = np.random.default_rng(seed)
  flat = pretrained.flatten(pretrained.abstract_params(make))
  return pretrained.unflatten({
      p: (rng.normal(size=s.shape) * 0.1 + (p[-1] == 'scale')).astype(np.float32)
      for p, s in flat.items()})


def model_with(make, params):
  model = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state, rest)


@nnx.jit
def _encode(model, batch):
  return model.encode(batch)


def outputs_of(model):
  return jax.tree.map(np.asarray, _encode(model, _batch()))


def _model_params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(model, expected):
  got = _model_params(model)
  want = pretrained.flatten(expected)
  assert set(got) == set(want)
  for p in want:
    assert got[p].dtype == np.float32, p
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))


def reference_state_dict(params, heads, *, prefix=True):
  """What the reference `state_dict()` holds, written by hand from the name table."""
  flat = pretrained.flatten(params)
  fix = lambda a, how: np.ascontiguousarray(a.T if how == 'transpose' else a)
  sd = {k: fix(flat[p], how) for k, p, how in torch_name_table(SMALL['num_layers'], heads)}
  for k, (p, how) in TIED_TORCH_KEYS.items():
    if k.split('.')[0] in heads:
      sd[k] = fix(flat[p], how)
  if 'cls' in heads:
    sd['cls.predictions.decoder.bias'] = flat[('cls', 'bias')]
  if not prefix:
    sd = {k.removeprefix('uniter.'): v for k, v in sd.items()}
  return sd


def _write_vocab(path):
  path.write_text('\n'.join(VOCAB) + '\n')
  return str(path)


def _write_spm(path):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['a red cube left of a blue sphere', 'two green cones'] * 20),
      model_writer=buf, vocab_size=40, model_type='unigram', pad_id=0, unk_id=1,
      bos_id=-1, eos_id=-1, user_defined_symbols=['[CLS]', '[SEP]', '[MASK]'],
      hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(buf.getvalue())
  return str(path)


PRETRAIN = lambda rngs: UniterForPretraining(small_cfg(), rngs=rngs)
BACKBONE = lambda rngs: pretrained.UniterEncoder(small_cfg(), rngs=rngs)
HEADS = ('cls', 'feat_regress', 'region_classifier', 'itm_output')


@pytest.fixture(scope='module')
def pretrain_params():
  return random_params(PRETRAIN, seed=1)


@pytest.fixture(scope='module')
def pretrain_outputs(pretrain_params):
  return outputs_of(model_with(PRETRAIN, pretrain_params))


# --------------------------------------------------------------------------------
# Import.

@pytest.mark.parametrize('dtype,prefix', [(np.float32, True), (np.float16, True),
                                          (np.float16, False), (np.float32, False)])
def test_import_gives_identical_params_and_outputs(tmp_path, pretrain_params,
                                                   pretrain_outputs, dtype, prefix):
  # With the prefix: a UniterForPretraining state dict; without: a bare UniterModel.
  heads = HEADS if prefix else ()
  params = pretrain_params if prefix else {'uniter': pretrain_params['uniter']}
  sd = {k: v.astype(dtype) for k, v in reference_state_dict(params, heads,
                                                             prefix=prefix).items()}
  # Hand-written spot checks that the names and the transposes are the reference's.
  pre = 'uniter.' if prefix else ''
  np.testing.assert_array_equal(
      sd[f'{pre}encoder.layer.1.attention.self.query.weight'],
      params['uniter']['encoder'][1]['attention']['self']['query']['kernel'].T.astype(dtype))
  assert sd[f'{pre}img_embeddings.img_linear.weight'].shape == (32, 24)
  ckpt = tmp_path / 'uniter.safetensors'
  save_file(sd, str(ckpt))
  (tmp_path / 'uniter-tiny.json').write_text(json.dumps(UNITER_JSON))
  out = tmp_path / 'imported'
  config, summary, ignored = import_uniter.import_checkpoint(
      str(ckpt), str(tmp_path / 'uniter-tiny.json'), str(out),
      vocab=_write_vocab(tmp_path / 'vocab.txt'), img_dim=24, num_region_classes=7)
  assert summary.heads == heads and ignored == []
  assert summary.source_dtypes == {np.dtype(dtype).name: len(sd)}
  assert config['heads'] == list(heads)
  assert config['model_config'] == dataclasses.asdict(small_cfg())

  model, tok = vlp.load_pretrained(str(out))
  assert type(model).__name__ == ('UniterForPretraining' if prefix else 'UniterEncoder')
  expected = jax.tree.map(lambda x: x.astype(dtype).astype(np.float32), params)
  assert_same_params(model, expected)
  make = PRETRAIN if prefix else BACKBONE
  same = dtype == np.float32 and prefix
  want = pretrain_outputs if same else outputs_of(model_with(make, expected))
  got = outputs_of(model)
  for key in ('sequence', 'pooled') + (('itm_logits',) if prefix else ()):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == len(VOCAB)
  assert tok.encode('Hello, world!') == [14, 8, 15, 7]
  # model.safetensors: the reference names (with uniter.) and the imported values.
  back = load_file(str(out / 'model.safetensors'))
  ref = reference_state_dict(expected, heads)
  ref.pop('cls.predictions.decoder.bias', None)  # Not written: no parameter of its own.
  assert set(back) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


def _convert(sd, **kw):
  cfg, _ = import_uniter.uniter_config(UNITER_JSON, img_dim=24, num_region_classes=7)
  return import_uniter.convert_state_dict(sd, cfg, **kw)


def test_import_accepts_wrappers_old_names_and_lists_ignored_keys(pretrain_params):
  sd = reference_state_dict(pretrain_params, HEADS)
  sd = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                  'LayerNorm.beta'): v
        for k, v in sd.items()}
  sd['uniter.embeddings.position_ids'] = np.arange(16)[None]
  sd['nlvr2_output.weight'] = np.zeros((2, 64), np.float32)
  sd['vcr_output.0.bias'] = np.zeros((3,), np.float32)
  sd = {f'module.{k}': v for k, v in sd.items()}
  params, summary = _convert(sd)
  assert summary.heads == HEADS
  assert sorted(summary.ignored) == ['nlvr2_output.weight', 'uniter.embeddings.position_ids',
                                     'vcr_output.0.bias']
  assert 'cls.predictions.decoder.weight' in summary.tied_checked
  assert "stripped 'module.'" in summary.prefix
  flat, want = pretrained.flatten(params), pretrained.flatten(pretrain_params)
  assert set(flat) == set(want)
  for p in want:
    np.testing.assert_array_equal(flat[p], want[p])
  # --backbone_only: every head is listed as ignored; the backbone is unchanged.
  params, summary = _convert(reference_state_dict(pretrain_params, HEADS),
                             backbone_only=True)
  assert summary.heads == () and list(params) == ['uniter']
  assert 'itm_output.weight' in summary.ignored and 'cls.predictions.bias' in summary.ignored


def test_import_errors_list_unknown_missing_and_misshaped_keys(pretrain_params):
  good = reference_state_dict(pretrain_params, HEADS)
  sd = dict(good)
  sd['uniter.encoder.layer.2.output.dense.weight'] = np.zeros((32, 64), np.float32)
  sd['foo.bar'] = np.zeros(3, np.float32)
  del sd['uniter.pooler.dense.bias'], sd['region_classifier.net.3.weight']
  sd['uniter.embeddings.word_embeddings.weight'] = np.zeros((61, 32), np.float32)
  sd['uniter.encoder.layer.0.intermediate.dense.weight'] = np.zeros((32, 64), np.float32)
  with pytest.raises(import_uniter.CheckpointMismatchError) as e:
    _convert(sd)
  msg = str(e.value)
  assert re.search(r'unknown keys \(2\): foo\.bar, uniter\.encoder\.layer\.2\.output'
                   r'\.dense\.weight', msg), msg
  assert re.search(r'missing keys \(2\): region_classifier\.net\.3\.weight, '
                   r'uniter\.pooler\.dense\.bias', msg), msg
  assert 'uniter.embeddings.word_embeddings.weight: expected (60, 32), got (61, 32)' in msg
  assert ('uniter.encoder.layer.0.intermediate.dense.weight: expected (64, 32), '
          'got (32, 64)') in msg
  # One pre-training head alone: the other three are missing.
  partial = {k: v for k, v in good.items() if k.startswith('uniter.') or k.startswith('cls.')}
  with pytest.raises(import_uniter.CheckpointMismatchError,
                     match=r'missing keys \(13\): feat_regress\.bias, .*itm_output\.weight'):
    _convert(partial)
  # A tied duplicate that is not the tensor it ties to.
  bad = dict(good, **{'feat_regress.weight': good['feat_regress.weight'] + 1})
  with pytest.raises(import_uniter.CheckpointMismatchError,
                     match=r'tied duplicates that differ \(1\): feat_regress\.weight'):
    _convert(bad)


def test_uniter_json_config_mapping():
  cfg, ignored = import_uniter.uniter_config(
      dict(UNITER_JSON, architectures=['X'], output_past=True), img_dim=24,
      num_region_classes=7)
  assert cfg == small_cfg(hidden_dropout=0.1, attention_dropout=0.1)
  assert ignored == ['architectures', 'output_past']
  assert import_uniter.uniter_config(
      {k: v for k, v in UNITER_JSON.items() if k != 'type_vocab_size'})[0].img_dim == 2048
  with pytest.raises(ValueError, match=r"lacks \['num_hidden_layers'\]"):
    import_uniter.uniter_config({k: v for k, v in UNITER_JSON.items()
                                 if k != 'num_hidden_layers'})
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    import_uniter.uniter_config(dict(UNITER_JSON, hidden_act='relu'))


# --------------------------------------------------------------------------------
# Export from a training workdir, load, and fine-tuning initialisation.

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir with two checkpoints of a real (sharded) train state, as the loop writes."""
  root = tmp_path_factory.mktemp('wd')
  spm_path = _write_spm(root / 'spm.model')
  cfg = small_cfg(vocab_size=Tokenizer(spm_path).vocab_size)
  mesh = mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  rules = sharding_lib.rules_for('dp', mesh)
  make = lambda rngs: UniterForPretraining(cfg, rngs=rngs)
  _, state, _ = create_train_state(make, optax.adamw(1e-3), seed=0, mesh=mesh, rules=rules)
  ckpt = ckpt_lib.Checkpointer(str(root / 'wd' / 'checkpoints'), save_every=1)
  info = {'model_class': 'UniterForPretraining', 'model_config': dataclasses.asdict(cfg),
          'tokenizer': spm_path}
  ckpt.save(3, state, {'step': 3, 'model_info': info}, force=True)
  later = state.replace(params=jax.tree.map(lambda x: x * 1.5 + 0.01, state.params))
  ckpt.save(7, later, {'step': 7, 'model_info': info}, force=True)
  ckpt.close()
  params = jax.tree.map(np.asarray, later.params)
  return dict(path=str(root / 'wd'), params=params, cfg=cfg, spm=spm_path, make=make,
              root=root)


@pytest.fixture(scope='module')
def exported(workdir):
  out = workdir['root'] / 'exported'
  proc = subprocess.run([sys.executable, '-m', 'vlp.export', f'--workdir={workdir["path"]}',
                         f'--out={out}'], capture_output=True, text=True,
                        env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'exported step 7' in proc.stdout
  return str(out)


def test_export_then_load_pretrained_is_identical(workdir, exported):
  config = pretrained.read_config(exported)
  assert config['heads'] == list(HEADS) and config['source']['step'] == 7
  assert config['model_config'] == dataclasses.asdict(workdir['cfg'])
  assert sorted(os.listdir(exported)) == ['checkpoint', 'config.json', 'model.safetensors',
                                          'spm.model']
  model, tok = vlp.load_pretrained(exported)
  assert isinstance(model, UniterForPretraining)
  assert_same_params(model, workdir['params'])
  want = outputs_of(model_with(workdir['make'], workdir['params']))
  got = outputs_of(model)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert isinstance(tok, Tokenizer)
  assert tok.encode('a red cube') == Tokenizer(workdir['spm']).encode('a red cube')
  # No optimizer state in the export: the stored item is the parameter tree.
  params, meta, step = ckpt_lib.restore_params(os.path.join(exported, 'checkpoint'))
  assert step == 0 and sorted(params) == sorted(['uniter'] + list(HEADS))
  assert meta['heads'] == list(HEADS)
  # model.safetensors with plain numpy: reference names, torch layouts, same values.
  back = load_file(os.path.join(exported, 'model.safetensors'))
  ref = reference_state_dict(workdir['params'], HEADS)
  ref.pop('cls.predictions.decoder.bias')
  assert set(back) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
  # Overrides of non-shape fields apply; the parameters stay.
  bf16, _ = vlp.load_pretrained(exported, dtype='bfloat16')
  assert bf16.cfg.dtype == 'bfloat16'
  assert_same_params(bf16, workdir['params'])
  with pytest.raises(ValueError, match=r'mis-shaped \(1\): uniter/embeddings/'
                     r'position_embeddings/embedding: expected \(8, 32\), got \(16, 32\)'):
    vlp.load_pretrained(exported, max_position_embeddings=8)


def test_export_refuses_a_used_directory_and_a_missing_workdir(workdir, exported, tmp_path):
  with pytest.raises(FileExistsError, match='already holds a checkpoint'):
    pretrained.export_workdir(workdir['path'], exported)
  with pytest.raises(FileNotFoundError, match='no checkpoints under'):
    pretrained.export_workdir(str(tmp_path), str(tmp_path / 'out'))


def test_load_params_for_init_from_workdir_export_and_import(workdir, exported, tmp_path):
  cfg = workdir['cfg']
  want = pretrained.flatten(workdir['params'])
  # An imported directory of the same parameters (via their torch names).
  ckpt = tmp_path / 'ref.safetensors'
  save_file(reference_state_dict(workdir['params'], HEADS), str(ckpt))
  (tmp_path / 'cfg.json').write_text(json.dumps(dict(UNITER_JSON,
                                                     vocab_size=cfg.vocab_size)))
  import_uniter.import_checkpoint(str(ckpt), str(tmp_path / 'cfg.json'),
                                  str(tmp_path / 'imported'), tokenizer=workdir['spm'],
                                  img_dim=24, num_region_classes=7)
  for source in (workdir['path'], exported, str(tmp_path / 'imported')):
    loaded = vlp.load_params_for_init(source, cfg)
    flat = pretrained.flatten(loaded)
    assert set(flat) == set(want), source
    for p in want:
      np.testing.assert_array_equal(np.asarray(flat[p]), want[p], err_msg=f'{source} {p}')
  # Merge into a fine-tuning model: backbone loaded, VQA head fresh, MLM etc. unused.
  # The target lives replicated on the 8-device mesh; loaded leaves must land there too.
  vqa = lambda rngs: UniterForVqa(cfg, num_answers=5, rngs=rngs)
  replicated = NamedSharding(mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}), P())
  fresh = jax.device_put(random_params(vqa, seed=3), replicated)
  merged, report = pretrained.merge_params(fresh, loaded)
  assert report == dict(loaded=['uniter'], fresh=['vqa_output'],
                        unused=['cls', 'feat_regress', 'itm_output', 'region_classifier'],
                        mismatched=[])
  got = pretrained.flatten(merged)
  for p, v in pretrained.flatten(fresh).items():
    expect = want[p] if p[0] == 'uniter' else np.asarray(v)
    np.testing.assert_array_equal(np.asarray(got[p]), expect, err_msg=str(p))
    assert got[p].sharding == replicated, p
  # A head of another size: an error listing it, or (strict_heads=False) left fresh.
  other = random_params(lambda rngs: UniterForVqa(cfg, num_answers=7, rngs=rngs), seed=4)
  with pytest.raises(ValueError, match=r"(?s)loaded 'vqa_output' .*mis-shaped \(2\): "
                     r'vqa_output/3/bias: expected \(5,\), got \(7,\)'):
    pretrained.merge_params(fresh, other)
  merged, report = pretrained.merge_params(fresh, other, strict_heads=False)
  assert report['loaded'] == ['uniter'] and report['mismatched'] == ['vqa_output']
  np.testing.assert_array_equal(np.asarray(merged['vqa_output'][3]['bias']),
                                np.asarray(fresh['vqa_output'][3]['bias']))
  # A different backbone is refused with the offending fields.
  with pytest.raises(ValueError, match=r'num_heads: stored 4, requested 8'):
    vlp.load_params_for_init(exported, dataclasses.replace(cfg, num_heads=8))
  with pytest.raises(ValueError, match=r'hidden_size: stored 32, requested 64'):
    vlp.load_params_for_init(workdir['path'], dataclasses.replace(cfg, hidden_size=64))
  with pytest.raises(FileNotFoundError, match='neither a training workdir'):
    vlp.load_params_for_init(str(tmp_path / 'nothing'), cfg)


def test_model_config_from_an_older_meta(workdir):
  # Checkpoints without model_info: the run config plus the parameter shapes.
  run = {'model': dict(size='tiny', hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, max_position_embeddings=16, vocab_size=None),
         'compute_dtype': 'float32'}
  cfg = pretrained.model_config_from_meta({'config': run}, workdir['params'])
  assert cfg == workdir['cfg']


def test_head_options_read_the_dual_head_and_refuse_the_old_linear_one():
  proj = {'kernel': np.zeros((4, 3)), 'bias': np.zeros(3)}
  assert pretrained.head_options({'dual_output': {'encoder': {}, 'proj': proj}}) == {'dual_dim': 3}
  with pytest.raises(ValueError, match='dual_output is a single Linear'):
    pretrained.head_options({'dual_output': proj})
