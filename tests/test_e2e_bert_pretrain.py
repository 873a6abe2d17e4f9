"""End to end on real formats: a HuggingFace BERT folder -> import -> pretraining on
the COCO + VG mixture -> resume, in one process and in two.

The fixtures are written in the published formats: a BERT folder as bert-base-cased
is published (model.safetensors written with torch, config.json, vocab.txt), a
Karpathy COCO JSON with a bottom-up-attention TSV, and Visual Genome's JSON files
with npz features. The BERT folder is imported (`vlp.tools.import_uniter`), both
datasets are built into one data_dir (`vlp.data.prepare`), and the tiny pretraining
config runs 6 steps from the import on `coco_karpathy:train+restval=1,vg_captions:train=1`
(the README's route B, docs/reproduce.md), logging every step:

* the text batches of both datasets are BERT's WordPiece ids of their captions
  (compared with tokenisations written out by hand);
* a run stopped after step 3 (the pre-emption path) and restarted in its workdir
  logs exactly the losses of an uninterrupted one;
* the same command as 2 processes x 1 CPU device (`launch/local_multiprocess.sh`,
  jax.distributed) logs the same losses as 1 process x 2 devices (same mesh, same
  2 data shards).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlp import checkpoint as ckpt_lib, config_lib, pretrained
from vlp.data import prepare
from vlp.data.tokenizer import WordPieceTokenizer
from vlp.jobs.base import Feed
from vlp.jobs.pair_data import PairData
from vlp.parallel import preemption
from vlp.tools import import_uniter
from vlp.train import loop

from bert_folder import ID, MODEL, write_bert_folder
from test_builders_karpathy import COCO, write_images  # The real-format fixture writers.
from test_builders_vg import write_vg
from test_train_loop import stop_after

pytest.importorskip('torch', reason='needs torch: make test installs requirements-torch.txt')
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch', 'local_multiprocess.sh')
D = 8  # Region feature size of both datasets.
CLASSES = 9  # Region classes of the imported MRC head (no task here reads them).
STEPS, STOP = 6, 3
TWO = jax.devices()[:2]


def overrides(data_dir, init_from):
  """The run, as the dotted flags `python -m vlp.pretrain` takes: 2 devices as
  data=2, 2 data shards (one per process in the 2-process run)."""
  return {'data': 'coco_karpathy:train+restval=1,vg_captions:train=1',
          'data_dir': str(data_dir), 'init_from': str(init_from), 'feature_dim': D,
          'max_regions': 16, 'max_text_len': 16, 'batch_size': 8, 'data_shards': 2,
          'mesh.dcn': 1, 'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.tensor': 1,
          'tasks.mlm': 1, 'tasks.mrfr': 1, 'tasks.mrc': 0, 'tasks.mrckl': 0, 'tasks.itm': 1,
          'total_steps': STEPS, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': STEPS,
          **MODEL}


def config_for(values):
  c = config_lib.load_config_file(os.path.join(REPO, 'configs/uniter_base.py:tiny'))
  return config_lib.set_values(c, values)


def losses(workdir):
  """{step: (task, loss)} of metrics.jsonl; later lines win."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: (r['task'], r[f"loss/{r['task']}"]) for r in records}


def same_losses(got, reference, rtol):
  """Every step logged once, with the reference's task and loss."""
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert got[step][0] == reference[step][0], step
    np.testing.assert_allclose(got[step][1], reference[step][1], rtol=rtol,
                               err_msg=f'step {step}')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """The BERT folder imported, and both datasets built into one data_dir."""
  root = tmp_path_factory.mktemp('e2e')
  bert = write_bert_folder(root / 'bert-tiny-cased')
  # The command of docs/reproduce.md's route B.
  cmd = [sys.executable, '-m', 'vlp.tools.import_uniter',
         f'--checkpoint={root}/bert-tiny-cased/', f'--out={root}/bert', f'--img_dim={D}',
         f'--num_region_classes={CLASSES}', '--seed=3']
  p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f'tokenizer: wordpiece vocab.txt ({len(ID)} ids)' in p.stdout, p.stdout
  coco = write_images(str(root / 'coco'), COCO, D, np.random.default_rng(0))
  prepare.prepare('coco_karpathy', manual_dir=root / 'coco', data_dir=root / 'data',
                  feature_dim=D, min_bb=5, max_bb=16, test_fold_size=0, spm_vocab_size=80)
  write_vg(str(root / 'vg'), np.random.default_rng(1), d=D)
  prepare.prepare('vg_captions', manual_dir=str(root / 'vg'), data_dir=root / 'data',
                  feature_dim=D, min_bb=2, val_every=2, spm_vocab_size=50, soft_label_dim=0,
                  skip_bad=True)  # VG image 5 has no features.
  captions = {image_id: [c.strip() for c in caps] for image_id, (_, _, caps) in coco.items()}
  return dict(root=root, values=overrides(root / 'data', root / 'bert'), captions=captions,
              bert={k: v.numpy() for k, v in bert.items()})


@pytest.fixture(scope='module')
def reference(prepared):
  """The uninterrupted run (1 process, 2 devices): {step: (task, loss)}."""
  root, values = prepared['root'], prepared['values']
  workdir = root / 'reference'
  loop.train_and_evaluate(config_for(values), str(workdir), devices=TWO)
  return losses(workdir)


def test_text_batches_are_bert_wordpiece_ids(prepared):
  root, values, coco_captions = prepared['root'], prepared['values'], prepared['captions']
  config = config_for(values)
  data = PairData(config, Feed.whole(config.batch_size), init_from=config.init_from)
  tok = data.tokenizer
  assert isinstance(tok, WordPieceTokenizer) and not tok.lowercase
  assert tok.path == str(root / 'bert' / 'vocab.txt')
  # The mixture's batches (the unmasked text of region-masking batches).
  it = data.train_iterator(lambda i: 'mrm')
  batches = [next(it) for _ in range(3)]

  def ids(*pieces):
    return [ID[p] for p in ('[CLS]',) + pieces + ('[SEP]',)]

  # By hand: COCO's 'Caption 2 of image 22 with a dog.' (numbers digit by digit),
  # VG's 'a red car 7' ('red' and 'car' are not in the vocabulary).
  hand = {image_id: [ids('Caption', str(j), 'of', 'image', str(image_id)[0],
                         '##' + str(image_id)[1], 'with', 'a', 'dog', '.')
                     for j in range(len(caps))] for image_id, caps in coco_captions.items()}
  assert coco_captions[22][2] == 'Caption 2 of image 22 with a dog.'
  hand[1] = [ids('a', '[UNK]', '[UNK]', str(j)) for j in range(10)]  # VG image 1's train groups.
  seen = set()
  for batch in batches:
    for row, image_id in zip(batch['input_ids'], batch['image_id']):
      n = int(np.sum(row > 0))
      assert list(row[:n]) in hand[int(image_id)], (image_id, row)
      assert not row[n:].any()
      seen.add('vg' if image_id == 1 else 'coco')
  assert seen == {'coco', 'vg'}  # Both datasets of the mixture.


def test_resume_after_step_3_matches_uninterrupted(prepared, reference, monkeypatch):
  root, values = prepared['root'], prepared['values']
  assert sorted(reference) == list(range(1, STEPS + 1))  # One line per step.
  assert {task for task, _ in reference.values()} == {'mlm', 'mrfr', 'itm'}
  assert all(np.isfinite(loss) for _, loss in reference.values())
  workdir = root / 'resumed'
  monkeypatch.setattr(loop, 'Preemption', stop_after(STOP))
  with pytest.raises(preemption.Preempted) as stopped:
    loop.train_and_evaluate(config_for(values), str(workdir), devices=TWO)
  assert (stopped.value.step, stopped.value.where) == (STOP, 'training')
  assert max(losses(workdir)) == STOP
  monkeypatch.undo()
  loop.train_and_evaluate(config_for(values), str(workdir), devices=TWO)
  same_losses(losses(workdir), reference, rtol=1e-6)


def test_training_starts_from_bert(prepared, reference):
  # 6 warm-up steps of the tiny config move a parameter by at most about 1e-4
  # (learning rates 7e-6 * step, Adam steps of about one learning rate); a fresh
  # initialisation would be ~0.05 away from BERT's.
  params, _, step = ckpt_lib.restore_params(str(prepared['root'] / 'reference' / 'checkpoints'))
  assert step == STEPS
  params = pretrained.flatten(jax.tree.map(np.asarray, params))
  bert = prepared['bert']
  for path, key, transposed in [
      (('uniter', 'embeddings', 'word_embeddings', 'embedding'),
       'bert.embeddings.word_embeddings.weight', False),
      (('uniter', 'encoder', 0, 'attention', 'self', 'query', 'kernel'),
       'bert.encoder.layer.0.attention.self.query.weight', True),
      (('cls', 'transform', 'LayerNorm', 'scale'), 'cls.predictions.transform.LayerNorm.gamma',
       False)]:
    want = bert[key].T if transposed else bert[key]
    moved = np.abs(params[path] - want).max()
    assert 0 < moved < 3e-4, (path, moved)  # Trained, from BERT.


def test_two_processes_log_the_same_losses(prepared, reference):
  root, values = prepared['root'], prepared['values']
  workdir = root / 'two_processes'
  cmd = [LAUNCH, '2', '--cpu_devices=1', '--', sys.executable, '-m', 'vlp.pretrain',
         '--config=configs/uniter_base.py:tiny', f'--workdir={workdir}'] + [
             f'--config.{k}={v}' for k, v in values.items()]
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS='--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  out = p.stdout + p.stderr
  assert p.returncode == 0, out[-5000:]
  assert "[0] process 0/2, 2 devices, mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in out
  # Progress from process 0 only, and one writer of metrics.jsonl.
  assert f'[0] step {STEPS}/{STEPS} [' in out and '[1] step' not in out, out[-5000:]
  with open(workdir / 'metrics.jsonl') as f:
    assert len(f.readlines()) == STEPS
  same_losses(losses(workdir), reference, rtol=1e-5)
  assert len({loss for _, loss in reference.values()}) == STEPS  # The curves can differ.
