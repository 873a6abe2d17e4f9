"""The ``.pt`` path of `vlp.tools.import_uniter`, with real `torch.save` files.

A tiny pre-training model's random parameters are written under the reference torch
names (the helpers of test_export_import.py, which covers the ``.safetensors`` path)
as torch tensors, tied duplicates sharing storage as in a real ``state_dict()``:
float32, float16, bfloat16, and wrapped as ``{'state_dict': {'module.' + key}}``.
Importing (once through the command line) and loading must give exactly those
parameters (rounded to the file's dtype) and the same `encode` outputs. A pickle that
would run code, or needs a custom class, is refused without running it; a missing
and a mis-shaped key are listed. `make test` installs torch (requirements-torch.txt).
"""

import json
import os
import re
import subprocess
import sys
from collections import OrderedDict

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='needs torch: make test installs '
                            'requirements-torch.txt')

import vlp  # noqa: E402
from vlp import pretrained  # noqa: E402
from vlp.models.pretraining import UniterForPretraining  # noqa: E402
from vlp.tools import import_uniter  # noqa: E402
from test_export_import import (  # noqa: E402  The tiny model and the name helpers.
    HEADS, PRETRAIN, UNITER_JSON, assert_same_params, small_cfg, model_with, outputs_of,
    random_params, reference_state_dict)

ENV = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
# Tied duplicates -> the tensor they are in the reference's state_dict() (same storage).
TIES = {'cls.predictions.decoder.weight': 'uniter.embeddings.word_embeddings.weight',
        'feat_regress.weight': 'uniter.img_embeddings.img_linear.weight',
        'cls.predictions.decoder.bias': 'cls.predictions.bias'}
DTYPES = {'float32': (torch.float32, np.float32), 'float16': (torch.float16, np.float16),
          'bfloat16': (torch.bfloat16, ml_dtypes.bfloat16)}
# Bound on |output - source model's output| after rounding the parameters to the
# file's dtype (outputs are LayerNorm-ed, O(1)): 20 unit roundoffs u (2^-11 float16,
# 2^-8 bfloat16). Each weight moves by at most u relative; through 2 layers of 32-64
# term dot products the measured worst case is about 4.5u (2.2e-3 / 1.8e-2), so 20u
# leaves 4x margin, while a wrong transpose, key or head moves outputs by O(1).
ROUNDING_ATOL = {'float16': 20 * 2.0**-11, 'bfloat16': 20 * 2.0**-8}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  params = random_params(PRETRAIN, seed=1)
  model_json = tmp_path_factory.mktemp('torch') / 'uniter-tiny.json'
  model_json.write_text(json.dumps(UNITER_JSON))
  return dict(params=params, outputs=outputs_of(model_with(PRETRAIN, params)),
              sd=reference_state_dict(params, HEADS), json=str(model_json))


def _torch_state_dict(sd, dtype='float32'):
  """The reference `state_dict()` of `sd` as torch tensors, tied keys sharing storage."""
  out = OrderedDict((k, torch.from_numpy(v).to(DTYPES[dtype][0])) for k, v in sd.items()
                    if k not in TIES)
  for tied, to in TIES.items():
    np.testing.assert_array_equal(sd[tied], sd[to])  # The table is right.
    out[tied] = out[to]
  return out


def _import(ckpt, source, out):
  return import_uniter.import_checkpoint(str(ckpt), source['json'], str(out), img_dim=24,
                                         num_region_classes=7)


def _cli(ckpt, source, out):
  return subprocess.run(
      [sys.executable, '-m', 'vlp.tools.import_uniter', f'--checkpoint={ckpt}',
       f'--model_config={source["json"]}', f'--out={out}', '--img_dim=24',
       '--num_region_classes=7'], capture_output=True, text=True, env=ENV)


@pytest.mark.parametrize('dtype,wrapped,cli', [
    ('float32', False, False), ('float16', False, True), ('bfloat16', False, False),
    ('float32', True, False)])
def test_pt_import_gives_identical_params_and_outputs(tmp_path, source, dtype, wrapped,
                                                      cli):
  sd = _torch_state_dict(source['sd'], dtype)
  obj = sd
  if wrapped:  # A DataParallel model's state dict inside a training checkpoint.
    obj = {'state_dict': OrderedDict((f'module.{k}', v) for k, v in sd.items()),
           'epoch': 3, 'global_step': 700}
  ckpt, out = tmp_path / 'uniter.pt', tmp_path / 'imported'
  torch.save(obj, ckpt)
  # The written file holds the reference names, dtype and sharing (read back by torch).
  back = torch.load(ckpt, weights_only=True)
  back = {k.removeprefix('module.'): v for k, v in back.get('state_dict', back).items()}
  assert list(back) == list(sd) and all(v.dtype == DTYPES[dtype][0] for v in back.values())
  assert (back['feat_regress.weight'].untyped_storage().data_ptr() ==
          back['uniter.img_embeddings.img_linear.weight'].untyped_storage().data_ptr())
  tied = ['cls.predictions.decoder.bias', 'cls.predictions.decoder.weight',
          'feat_regress.weight']
  if cli:
    proc = _cli(ckpt, source, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tensor dtypes in the checkpoint: {{'{dtype}': {len(sd)}}}" in proc.stdout
    assert f"heads: {', '.join(HEADS)}" in proc.stdout
    assert f"tied duplicates checked and dropped: {', '.join(tied)}" in proc.stdout
  else:
    config, summary, _ = _import(ckpt, source, out)
    assert config['heads'] == list(HEADS) and summary.heads == HEADS
    assert summary.tied_checked == tied
    assert ("stripped 'module.'" in summary.prefix) == wrapped
    # bfloat16 is widened to float32 on reading (numpy has no bfloat16).
    assert summary.source_dtypes == {dtype.replace('bfloat16', 'float32'): len(sd)}

  # The parameters: the source's, rounded to the file's dtype (float32: unchanged).
  rounded = jax.tree.map(lambda x: x.astype(DTYPES[dtype][1]).astype(np.float32),
                         source['params'])
  if dtype != 'float32':  # The rounding is real: the comparison below can tell.
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(rounded), jax.tree.leaves(source['params'])))
  model, tok = vlp.load_pretrained(str(out))
  assert isinstance(model, UniterForPretraining) and tok is None
  assert_same_params(model, rounded)
  got = outputs_of(model)
  exact = source['outputs'] if dtype == 'float32' else outputs_of(model_with(PRETRAIN, rounded))
  for key in ('sequence', 'pooled', 'itm_logits'):
    np.testing.assert_array_equal(got[key], exact[key], err_msg=key)
    if dtype != 'float32':
      np.testing.assert_allclose(got[key], source['outputs'][key], rtol=0,
                                 atol=ROUNDING_ATOL[dtype], err_msg=key)
  if cli:  # What fine-tuning's --config.init_from reads: the same parameters.
    loaded = pretrained.flatten(vlp.load_params_for_init(str(out), small_cfg()))
    want = pretrained.flatten(rounded)
    assert set(loaded) == set(want)
    for p in want:
      np.testing.assert_array_equal(np.asarray(loaded[p]), want[p], err_msg=str(p))


class _RunsCode:
  """Unpickling calls exec: a full `pickle.load` writes the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f'open({self.marker!r}, "w").write("pwned")',)


class _CustomClass:
  """A non-tensor custom class whose unpickling (`__setstate__`) writes the marker."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __setstate__(self, state):
    open(state['marker'], 'w').write('pwned')
    self.__dict__.update(state)


@pytest.mark.parametrize('payload,cli', [(_RunsCode, True), (_CustomClass, False)])
def test_pt_that_runs_code_or_holds_custom_classes_is_refused(tmp_path, source, payload,
                                                              cli):
  marker = tmp_path / 'pwned'
  sd = _torch_state_dict(source['sd'])
  sd['uniter.pooler.extra'] = payload(marker)
  ckpt, out = tmp_path / 'uniter.pt', tmp_path / 'imported'
  torch.save(sd, ckpt)
  want = (r"refused .*uniter\.pt: loading it needs more than tensors \(code or custom "
          r"classes\); nothing in it was run\. WeightsUnpickler error: Unsupported global: "
          r"GLOBAL " + ('exec' if payload is _RunsCode else
                        r'test_import_torch\._CustomClass'))
  if cli:
    proc = _cli(ckpt, source, out)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.startswith('error: refused'), proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and 'weights_only' not in proc.stderr
    assert re.search(want, proc.stderr), proc.stderr
  else:
    with pytest.raises(import_uniter.CheckpointReadError, match=want):
      _import(ckpt, source, out)
  assert not marker.exists() and not out.exists()
  # The payload is live: an unsafe load runs it (so the check above can fail).
  torch.load(ckpt, weights_only=False)
  assert marker.read_text() == 'pwned'
  # Plain non-tensor values pass torch's check but are no state dict entries either.
  sd['uniter.pooler.extra'] = 3
  torch.save(sd, ckpt)
  with pytest.raises(import_uniter.CheckpointReadError,
                     match=r"entry 'uniter\.pooler\.extra' is a int, not a tensor"):
    _import(ckpt, source, out)


def test_pt_with_missing_and_misshaped_keys_lists_them(tmp_path, source):
  sd = _torch_state_dict(source['sd'], 'float16')
  del sd['uniter.pooler.dense.bias']
  sd['uniter.embeddings.word_embeddings.weight'] = torch.zeros(61, 32, dtype=torch.float16)
  torch.save(sd, tmp_path / 'uniter.pt')
  with pytest.raises(import_uniter.CheckpointMismatchError) as e:
    _import(tmp_path / 'uniter.pt', source, tmp_path / 'imported')
  msg = str(e.value)
  assert 'missing keys (1): uniter.pooler.dense.bias' in msg, msg
  assert ('mis-shaped keys (1): uniter.embeddings.word_embeddings.weight: expected '
          '(60, 32), got (61, 32)') in msg, msg
  assert 'unknown keys' not in msg and 'tied duplicates' not in msg, msg
  assert not (tmp_path / 'imported').exists()
