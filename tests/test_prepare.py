"""`python -m vlp.data.prepare`: summary, errors naming file and line, --skip_bad counts;
and a smoke run of the input-pipeline benchmark."""

import base64
import json
import os
import subprocess
import sys

import numpy as np

from vlp.data import batching, input_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16


def _write_flickr(manual, corrupt_second_line=False):
  os.makedirs(os.path.join(manual, 'features'), exist_ok=True)
  rng = np.random.default_rng(0)
  images, lines = [], []
  for k, (image_id, split) in enumerate(((101, 'train'), (102, 'train'), (103, 'val'),
                                         (104, 'test'))):
    images.append({'filename': f'{image_id}.jpg', 'split': split, 'imgid': k,
                   'sentences': [{'raw': f'a dog runs number {j}', 'sentid': j}
                                 for j in range(5 + (image_id == 101))]})
    boxes = np.tile(np.float32([1, 2, 30, 40]), (12, 1))
    feats = rng.normal(size=(12, D)).astype(np.float32)
    enc = lambda a: base64.b64encode(a.tobytes()).decode()
    cols = [str(image_id), '500', '375', '12', enc(boxes), enc(feats)]
    if corrupt_second_line and k == 1:
      cols = cols[:4] + [cols[4][:-8]]  # truncated line: features column lost
    lines.append('\t'.join(cols))
  with open(os.path.join(manual, 'dataset_flickr30k.json'), 'w') as f:
    json.dump({'images': images}, f)
  path = os.path.join(manual, 'features', 'flickr.tsv')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'vlp.data.prepare', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_summary_errors_and_skip_bad(tmp_path):
  manual = str(tmp_path / 'manual')
  tsv = _write_flickr(manual)
  common = ['--dataset=flickr30k_karpathy', f'--manual_dir={manual}', f'--feature_dim={D}',
            '--option=spm_vocab_size=40']
  ok = _run(*common, f'--data_dir={tmp_path / "ok"}', f'--features=tsv:{tsv}')
  assert ok.returncode == 0, ok.stderr
  out = ok.stdout
  assert 'flickr30k_karpathy/float16_d16_spm40' in out
  for line in ('train: 2', 'val: 1', 'test: 1', 'images without features: 0',
               'beyond the first 5 of an image: 1'):
    assert line in out
  assert "tfds.builder(\"flickr30k_karpathy/float16_d16_spm40\"" in out

  tsv = _write_flickr(manual, corrupt_second_line=True)
  bad = _run(*common, f'--data_dir={tmp_path / "bad"}')  # features from <manual>/features
  assert bad.returncode == 1
  assert f'{tsv}:2' in bad.stderr and '[corrupt_line]' in bad.stderr
  assert '--skip_bad' in bad.stderr
  skipped = _run(*common, f'--data_dir={tmp_path / "skip"}', '--skip_bad')
  assert skipped.returncode == 0, skipped.stderr
  assert 'train: 1' in skipped.stdout and 'corrupt_line: 1' in skipped.stdout
  assert 'images without features: 1' in skipped.stdout  # the image of that line

  shown = _run('--help_dataset=refcocog')
  assert shown.returncode == 0 and 'refs(umd).p' in shown.stdout


def test_input_bench_smoke(tmp_path):
  builder, tok = input_bench.make_fixture(str(tmp_path), num_images=12, regions=4,
                                          feature_dim=D)
  assert builder.info.splits['train'].num_examples == 4  # images 0-7 are val/test
  spec = batching.BatchSpec(batch_size=4, max_text_len=20, max_regions=4, feature_dim=D)
  result = input_bench.measure(builder, spec, tok, seconds=0.2, worker_count=0)
  assert result['examples_per_sec'] > 0 and result['batches'] >= 1
  assert (result['max_regions'], result['feature_dim']) == (4, D)
