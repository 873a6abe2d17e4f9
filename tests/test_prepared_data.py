"""`--config.data=NAME` opens the build that is prepared; tasks need the targets the
data has; a mixture of two real-format builds (COCO train+restval and VG captions)."""

import numpy as np
import pytest

from vlp import config_lib
from vlp.data import prepare, prepared
from vlp.jobs.base import Feed
from vlp.jobs.pair_data import PairData
from vlp.jobs.pretrain import make_pretrain_job

from test_builders_karpathy import write_images
from test_builders_vg import write_vg

D = 8
# (image id, split, captions, boxes): COCO images, restval included.
IMAGES = ([(100 + i, 'train', 5, 12) for i in range(6)] + [(200 + i, 'restval', 5, 11)
                                                            for i in range(4)]
          + [(300 + i, 'val', 5, 10) for i in range(2)] + [(400 + i, 'test', 5, 10)
                                                            for i in range(2)])


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('prepared')
  write_images(str(root / 'coco'), IMAGES, D, np.random.default_rng(0))
  prepare.prepare('coco_karpathy', manual_dir=root / 'coco', data_dir=root / 'data',
                  feature_dim=D, min_bb=5, max_bb=16, test_fold_size=0, spm_vocab_size=80)
  write_vg(str(root / 'vg'), np.random.default_rng(1))
  prepare.prepare('vg_captions', manual_dir=root / 'vg', data_dir=root / 'data',
                  feature_dim=D, skip_bad=True)  # VG image 5 has no features
  return root


def _config(root, data, **overrides):
  c = config_lib.load_config_file('configs/uniter_base.py:tiny')
  c.data, c.data_dir, c.feature_dim, c.batch_size = data, str(root / 'data'), D, 8
  c.num_region_classes, c.max_regions = 1601, 16
  c.tasks.mrc = c.tasks.mrckl = 0
  c.update_from_flattened_dict(overrides)
  return c


def test_name_opens_the_one_prepared_build(root):
  builds = prepared.prepared_configs('coco_karpathy', root / 'data')
  assert builds == ['float16_d8_min5_max16_spm80_fold0']  # not tfds' default `float16`
  data = PairData(_config(root, 'coco_karpathy'), Feed.whole(8))
  assert data.builder.builder_config.name == builds[0]
  assert data.name == 'coco_karpathy/float16_d8_min5_max16_spm80_fold0:train=1'


def test_missing_or_ambiguous_builds_name_the_flag(root, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'build coco_karpathy/float16_c1601 is not '
                     r'prepared .* float16_d8_min5_max16_spm80_fold0 \(use --config.data='
                     r'coco_karpathy/float16_d8_min5_max16_spm80_fold0\)'):
    prepared.open_prepared('coco_karpathy', 'float16_c1601', root / 'data')
  with pytest.raises(FileNotFoundError, match="dataset 'flickr30k_karpathy' is not prepared"):
    prepared.open_prepared('flickr30k_karpathy', '', root / 'data')
  with pytest.raises(ValueError, match="'cocoa': no such dataset"):
    prepared.open_prepared('cocoa', '', root / 'data')
  # A second build of the same dataset: the name alone is ambiguous.
  data = tmp_path / 'data'
  for dtype in ('float16', 'float32'):
    prepare.prepare('coco_karpathy', manual_dir=root / 'coco', data_dir=data, feature_dim=D,
                    feature_dtype=dtype, test_fold_size=0, spm_vocab_size=80)
  with pytest.raises(ValueError, match=r"'coco_karpathy' has 2 prepared builds .*: "
                     r'float16_d8_spm80_fold0, float32_d8_spm80_fold0; choose one with '
                     r'--config.data=coco_karpathy/float16_d8_spm80_fold0 or '
                     r'--config.data=coco_karpathy/float32_d8_spm80_fold0'):
    prepared.open_prepared('coco_karpathy', '', data)
  builder = prepared.open_prepared('coco_karpathy', 'float32_d8_spm80_fold0', data)
  assert builder.info.features['features'].np_dtype == np.float32


def test_a_task_whose_targets_the_data_lacks_stops_at_start_up(root):
  for task in ('mrc', 'mrckl'):
    config = _config(root, 'coco_karpathy:train+restval,vg_captions', **{f'tasks.{task}': 1})
    with pytest.raises(ValueError, match=rf"task '{task}' .*needs the records' 'soft_labels', "
                       r'which coco_karpathy/float16_d8_min5_max16_spm80_fold0/.*:'
                       r'train\+restval .*, vg_captions/float16_d8/.*:train .* lacks'):
      make_pretrain_job(config, Feed.whole(8))
  job = make_pretrain_job(_config(root, 'coco_karpathy'), Feed.whole(8))  # mrfr is fine
  assert 'mrfr' in job.loss_fns and 'mrckl' not in job.loss_fns


def test_coco_train_restval_mixed_with_vg(root):
  config = _config(root, 'coco_karpathy:train+restval=1,vg_captions:train=1')
  data = PairData(config, Feed.whole(8))
  it = data.train_iterator(None)
  ids = np.concatenate([next(it)['image_id'] for _ in range(40)])  # 320 rows
  coco = {i for i, s, _, _ in IMAGES if s in ('train', 'restval')}
  vg_builder = data.parts[1][1]
  vg = {int(r['image_id']) for r in vg_builder.as_data_source('train')}
  assert vg and not vg & coco
  assert set(ids.tolist()) == coco | vg  # restval read, VG read
  from_vg = np.isin(ids, list(vg)).sum()
  sd = np.sqrt(320 * 0.25 * (1024 - 320) / 1023)  # hypergeometric, 512 of 1024 from VG
  assert abs(from_vg - 160) <= 5 * sd
  assert it.get_state() == {'next_index': 40, 'data': data.name}
