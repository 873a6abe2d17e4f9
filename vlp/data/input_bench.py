r"""Input-pipeline throughput: masked, base-shaped batches per second on this host.

`measure` times the training iterator (read, tokenise, pad, MLM/MRM/ITM masking)
on a prepared dataset or a mixture of several (vlp.data.mixture). `make_fixture`
builds the synthetic dataset it is meant for: `coco_karpathy` from per-image npz
files of base shape (36 or 100 regions x 2048, stored float16) and templated
captions, through the real builder; `make_mixture_fixture` adds
`flickr30k_karpathy` over the same files, for a two-dataset mixture.

  python -m vlp.data.input_bench --data_dir=/tmp/input_bench --seconds=20 --workers=0
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from vlp.data import pipeline
from vlp.data.batching import BatchSpec
from vlp.data.tokenizer import Tokenizer

KINDS = ('mlm', 'mrm', 'itm')
_WORDS = ('a man woman dog cat red blue green small large table street car bus sitting '
          'standing next to on top of near with the an holding two three people field '
          'grass water sky building white black young old playing riding').split()


class CycleKinds:
  """Batch index -> kind, cycling (module level: picklable for grain workers)."""

  def __init__(self, kinds=KINDS):
    self.kinds = tuple(kinds)

  def __call__(self, index: int) -> str:
    return self.kinds[index % len(self.kinds)]


def measure(data, spec: BatchSpec, tokenizer: Tokenizer, *, seconds: float,
            worker_count: int, split: str = 'train', kinds=KINDS, seed: int = 0,
            num_threads: int = 2, prefetch: int = 4, warmup_batches: int = 3) -> dict:
  """Examples per second of the training iterator over `split` of a prepared builder
  (`data`), or over a mixture (`data` a list of (builder, splits, weight)).

  The first `warmup_batches` (worker start-up, page cache) are not timed; then
  batches are drawn for `seconds` wall-clock seconds.

  Returns:
    dict with examples_per_sec, batches_per_sec, examples_per_cpu_sec and cpu_sec
    (this process's CPU time while timed: on a shared machine the measure of the
    pipeline's own cost; worker processes not counted), examples, batches, seconds,
    startup_sec, worker_count, num_threads, batch_size, max_text_len, max_regions,
    feature_dim, num_region_classes, kinds and parts (the datasets read).
  """
  parts = data if isinstance(data, list) else [(data, [split], 1.0)]
  start = time.perf_counter()
  it = pipeline.make_mixture_iterator(parts, spec, tokenizer=tokenizer,
                                      kind_for_index=CycleKinds(kinds), seed=seed,
                                      worker_count=worker_count, num_threads=num_threads,
                                      prefetch=prefetch)
  try:
    for _ in range(warmup_batches):
      next(it)
    startup = time.perf_counter() - start
    batches, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
      batch = next(it)
      batches += 1
      elapsed = time.perf_counter() - t0
      if elapsed >= seconds:
        break
    cpu = time.process_time() - cpu0
    shape = batch['img_feat'].shape
    del batch
  finally:
    it.close()
  examples = batches * spec.batch_size
  return {'examples_per_sec': examples / elapsed, 'batches_per_sec': batches / elapsed,
          'examples_per_cpu_sec': examples / cpu, 'cpu_sec': cpu,
          'examples': examples, 'batches': batches, 'seconds': elapsed,
          'startup_sec': startup, 'worker_count': worker_count, 'num_threads': num_threads,
          'batch_size': spec.batch_size, 'max_text_len': spec.max_text_len,
          'max_regions': shape[1], 'feature_dim': shape[2],
          'num_region_classes': spec.num_region_classes, 'kinds': list(kinds),
          'parts': [f'{b.info.name}:{"+".join(s)}={w:g}' for b, s, w in parts]}


def write_fixture(manual_dir: str, *, num_images: int = 512, regions: int = 36,
                  feature_dim: int = 2048, soft_label_dim: int = 0, seed: int = 0) -> None:
  """Writes Karpathy COCO and Flickr30K files over the same images and per-image npz
  features (all but the first 8 images in train)."""
  rng = np.random.default_rng(seed)
  feat_dir = os.path.join(manual_dir, 'features')
  os.makedirs(feat_dir, exist_ok=True)
  images = []
  for i in range(num_images):
    image_id = 1 + i
    words = rng.choice(_WORDS, size=(5, 11))
    images.append({'cocoid': image_id, 'filename': f'COCO_{image_id:012d}.jpg',
                   'split': 'train' if i >= 8 else ('val', 'test')[i % 2],
                   'sentences': [{'raw': ' '.join(w).capitalize() + '.', 'sentid': 5 * i + j}
                                 for j, w in enumerate(words)]})
    xy = rng.uniform(0, 0.6, (regions, 2))
    arrays = {
        'features': rng.gamma(1.0, 1.0, (regions, feature_dim)).astype(np.float16),
        'norm_bb': np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (regions, 2))], 1
                                  ).astype(np.float16),
        'conf': np.sort(rng.uniform(0.3, 1.0, regions))[::-1].astype(np.float16),
        'image_w': np.int32(640), 'image_h': np.int32(480)}
    if soft_label_dim:
      arrays['soft_labels'] = rng.dirichlet(np.ones(soft_label_dim), regions).astype(
          np.float16)
    np.savez(os.path.join(feat_dir, f'coco_{image_id:012d}.npz'), **arrays)
  with open(os.path.join(manual_dir, 'dataset_coco.json'), 'w') as f:
    json.dump({'images': images}, f)
  flickr = [dict(img, filename=f'{img["cocoid"]}.jpg') for img in images]
  with open(os.path.join(manual_dir, 'dataset_flickr30k.json'), 'w') as f:
    json.dump({'images': flickr}, f)


def make_fixture(root: str, *, num_images: int = 512, regions: int = 36,
                 feature_dim: int = 2048, soft_label_dim: int = 0,
                 compression: str = 'uncompressed', dataset: str = 'coco_karpathy'):
  """Builds (once) the synthetic base-shaped `dataset` (`coco_karpathy` or
  `flickr30k_karpathy`); returns (builder, tokenizer).

  `compression` is the records' array_record compression ('' = tfds' default).
  """
  from vlp.data import prepare  # the builders pull in tfds; keep `measure` light
  manual = os.path.join(root, 'manual')
  if not os.path.exists(os.path.join(manual, 'dataset_flickr30k.json')):
    write_fixture(manual, num_images=num_images, regions=regions, feature_dim=feature_dim,
                  soft_label_dim=soft_label_dim)
  options = dict(test_fold_size=0) if dataset == 'coco_karpathy' else {}
  builder, _ = prepare.prepare(
      dataset, manual_dir=manual, data_dir=os.path.join(root, 'data'),
      soft_label_dim=soft_label_dim, feature_dim=feature_dim, min_bb=regions,
      max_bb=regions, spm_vocab_size=200, compression=compression, **options)
  return builder, Tokenizer(os.path.join(os.fspath(builder.data_dir), 'spm.model'))


def make_mixture_fixture(root: str, **kw):
  """`coco_karpathy` and `flickr30k_karpathy` fixtures over the same images
  (`make_fixture` arguments); returns ([(builder, splits, weight)] 1:1, the COCO
  tokenizer)."""
  coco, tokenizer = make_fixture(root, **kw)
  flickr, _ = make_fixture(root, dataset='flickr30k_karpathy', **kw)
  return [(coco, ['train'], 1.0), (flickr, ['train'], 1.0)], tokenizer


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  builder, tok = make_fixture(f.data_dir, num_images=f.images, compression=f.compression)
  spec = BatchSpec(batch_size=f.batch, max_text_len=f.text_len, max_regions=36,
                   feature_dim=2048, num_region_classes=f.num_region_classes or None)
  for workers in f.workers:
    print(json.dumps(measure(builder, spec, tok, seconds=f.seconds,
                             worker_count=int(workers), num_threads=f.threads)), flush=True)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('data_dir', '/tmp/vlp_input_bench', 'Where the fixture is built.')
  flags.DEFINE_integer('images', 512, 'Fixture images.')
  flags.DEFINE_integer('batch', 128, 'Examples per batch.')
  flags.DEFINE_integer('text_len', 40, 'Text tokens incl. specials.')
  flags.DEFINE_integer('num_region_classes', 0, 'Soft-label classes per batch (0: stored).')
  flags.DEFINE_integer('threads', 2, 'grain reader threads.')
  flags.DEFINE_list('workers', ['0'], 'grain worker processes (several: one run each).')
  flags.DEFINE_float('seconds', 10.0, 'Timed seconds per run.')
  flags.DEFINE_string('compression', 'uncompressed', "Fixture records' compression "
                      "('' = tfds' default).")
  app.run(main)
