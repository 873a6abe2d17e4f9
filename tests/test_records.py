"""The fast record reader against tfds' own writer and decoder.

A tiny builder written by tfds itself holds every kind of field vlp's builders
store. Each field read by `vlp.data.records` from the serialized example must
equal tfds' decoding of it (`as_data_source`), and the serialized example must
have the raw layout the reader assumes. A tfds release that encodes features
differently fails here, not as silently wrong batches.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from vlp.data import records
from vlp.data.image_records import ImageRecords

D = 3
KINDS = {'image_id': int, 'score': float, 'name': str, 'captions': list, 'answers': list,
         'features': np.float16, 'img_pos': np.float32, 'boxes': np.float32,
         'target_box': np.float32, 'labels': np.int32, 'questions/question_id': np.int64,
         'questions/question': list, 'questions/answers': list,
         'questions/target_index': np.int32, 'questions/target_box': np.float32}


def _raw_tensor(shape, dtype):
  return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def _example(i):
  """Record i: i + 1 regions, i questions (record 0 has none), i % 3 + 1 answers."""
  rng = np.random.default_rng(i)
  n, q = i + 1, i
  return {
      'image_id': 10 ** 12 + i, 'score': 0.1 * i - 0.35, 'name': f'img é{i}',
      'captions': [f'caption {i} {j}' for j in range(2)],
      'answers': [f'ans {i}.{j}' for j in range(i % 3 + 1)],
      'features': rng.normal(size=(n, D)).astype(np.float16),
      'img_pos': rng.uniform(size=(n, 7)).astype(np.float32),
      'boxes': rng.uniform(0, 99, size=(n, 4)).astype(np.float32),
      'target_box': np.float32([i, 1.5, 7.25, -2]),
      'labels': np.arange(i % 3, dtype=np.int32) - 1,
      'questions': {
          'question_id': 10 * i + np.arange(q, dtype=np.int64),
          'question': np.array([f'q{i}{j}?' for j in range(q)], dtype=object),
          'answers': np.array([[f'a{j}', f'b{j}'] for j in range(q)], dtype=object
                              ).reshape(q, 2),
          'target_index': np.arange(q, dtype=np.int32),
          'target_box': rng.uniform(size=(q, 4)).astype(np.float32)},
  }


class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Every kind of field of vlp_scenes, vqa_v2 and refcoco records."""

  VERSION = tfds.core.Version('1.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # tfds' default probes importlib_resources

  def _info(self):
    column = lambda dtype, *tail: tfds.features.Tensor(shape=(None, *tail), dtype=dtype)
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
        tfds.features.FeaturesDict({
            'image_id': np.int64, 'score': np.float32, 'name': tfds.features.Text(),
            'captions': tfds.features.Sequence(tfds.features.Text(), length=2),
            'answers': tfds.features.Sequence(tfds.features.Text()),
            'features': _raw_tensor((None, D), np.float16),
            'img_pos': _raw_tensor((None, 7), np.float32),
            'boxes': _raw_tensor((None, 4), np.float32),
            'target_box': _raw_tensor((4,), np.float32),
            'labels': _raw_tensor((None,), np.int32),
            'questions': tfds.features.FeaturesDict({
                'question_id': column(np.int64), 'question': column(np.object_),
                'answers': column(np.object_, 2), 'target_index': column(np.int32),
                'target_box': column(np.float32, 4)}),
        })))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, _example(i)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  builder = Tiny(data_dir=str(tmp_path_factory.mktemp('tiny')), file_format='array_record')
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  return builder


def _same(a, b, name):
  assert type(a) is type(b), name
  if isinstance(a, np.ndarray):
    assert a.dtype == b.dtype, name
    np.testing.assert_array_equal(a, b, name)
  else:
    assert a == b, name


def test_fast_fields_equal_tfds_decoding(tiny):
  fast = list(records.read_fields(records.open_source(tiny, 'train', raw=True), 0, 5, KINDS,
                                  raw=True))
  slow = list(records.read_fields(records.open_source(tiny, 'train', raw=False), 0, 5, KINDS,
                                  raw=False))
  decoded = tiny.as_data_source('train')
  assert len(fast) == len(slow) == 5
  for i, (f, s) in enumerate(zip(fast, slow)):
    want = _example(i)
    for name in KINDS:
      _same(f[name], s[name], f'record {i} {name}')
    # And both equal what was written, field by field.
    assert f['image_id'] == want['image_id'] == decoded[i]['image_id']
    assert f['score'] == np.float32(want['score'])
    assert f['name'] == want['name'] and f['captions'] == want['captions']
    assert f['answers'] == want['answers']
    for name in ('features', 'img_pos', 'boxes', 'target_box', 'labels'):
      np.testing.assert_array_equal(f[name], want[name].reshape(-1), name)
      np.testing.assert_array_equal(f[name], decoded[i][name].reshape(-1), name)
    q = want['questions']
    np.testing.assert_array_equal(f['questions/question_id'], q['question_id'])
    assert f['questions/question'] == list(q['question'])
    assert f['questions/answers'] == list(q['answers'].reshape(-1))  # row-major, flat
    np.testing.assert_array_equal(f['questions/target_index'], q['target_index'])
    np.testing.assert_array_equal(f['questions/target_box'], q['target_box'].reshape(-1))


def test_serialized_layout_the_reader_assumes(tiny):
  raw = records.open_source(tiny, 'train', raw=True)
  want = _example(4)
  f = records.parse(raw[4])
  kinds = {name: f[name].WhichOneof('kind') for name in f}
  assert kinds == {
      'image_id': 'int64_list', 'score': 'float_list', 'name': 'bytes_list',
      'captions': 'bytes_list', 'answers': 'bytes_list', 'features': 'bytes_list',
      'img_pos': 'bytes_list', 'boxes': 'bytes_list', 'target_box': 'bytes_list',
      'labels': 'bytes_list', 'questions/question_id': 'int64_list',
      'questions/question': 'bytes_list', 'questions/answers': 'bytes_list',
      'questions/target_index': 'int64_list', 'questions/target_box': 'float_list'}
  # A raw-bytes tensor is one value: the C-order buffer, nothing else.
  for name in ('features', 'img_pos', 'boxes', 'target_box', 'labels'):
    assert list(f[name].bytes_list.value) == [want[name].tobytes()], name
  assert list(f['captions'].bytes_list.value) == [c.encode() for c in want['captions']]
  assert f['name'].bytes_list.value[0] == want['name'].encode('utf-8')
  np.testing.assert_array_equal(records.array(f['features'], np.float16, (D,)),
                                want['features'])
  # The dtypes and shapes the fast path reads these fields with.
  feats = tiny.info.features
  assert records.is_int_scalar(feats['image_id']) and not records.is_int_scalar(feats['score'])
  assert records.bytes_layout(feats, ('features', 'img_pos', 'boxes', 'labels', 'absent')) == {
      'features': (np.dtype(np.float16), (D,)), 'img_pos': (np.dtype(np.float32), (7,)),
      'boxes': (np.dtype(np.float32), (4,)), 'labels': (np.dtype(np.int32), ())}
  # A fixed first axis or a list-encoded column is not a free-axis raw tensor.
  assert records.bytes_layout(feats, ('features', 'target_box')) is None
  assert records.bytes_layout(feats['questions'], ('target_box',)) is None


def test_image_records_read_the_same_either_way(tiny, monkeypatch):
  fast = ImageRecords(tiny, 'train', D, captions=False, boxes=True)
  assert fast.layout == {'features': (np.dtype(np.float16), (D,)),
                         'img_pos': (np.dtype(np.float32), (7,)),
                         'boxes': (np.dtype(np.float32), (4,))}
  got = fast.read([4, 0, 4, 2])
  monkeypatch.setattr(records, 'tf_example_pb2', None)
  slow = ImageRecords(tiny, 'train', D, captions=False, boxes=True)
  assert not slow.fast and records.bytes_layout(tiny.info.features, ('features',)) is None
  for i, a, b in zip([4, 0, 4, 2], got, slow.read([4, 0, 4, 2])):
    want = _example(i)
    assert a['image_id'] == b['image_id'] == want['image_id']
    for name in ('features', 'img_pos', 'boxes'):
      assert a[name].dtype == b[name].dtype == want[name].dtype, name
      np.testing.assert_array_equal(a[name], want[name], name)
      np.testing.assert_array_equal(b[name], want[name], name)


def test_image_records_errors(tiny):
  with pytest.raises(ValueError, match=r"tiny at .* has no split 'val'; it has \['train'\]"):
    ImageRecords(tiny, 'val', D)
  with pytest.raises(ValueError, match="split 'train' of tiny stores captions of shape "
                                       r"\(2,\); pairs need exactly 5 per image"):
    ImageRecords(tiny, 'train', D)
  with pytest.raises(ValueError, match='has region features of dim 3, config expects '
                                       'feature_dim=4'):
    ImageRecords(tiny, 'train', 4, captions=False)


def test_wire_scan_finds_what_the_proto_parse_finds(tiny):
  raw_source = records.open_source(tiny, 'train', raw=True)
  for i in range(5):
    raw = raw_source[i]
    f, spans = records.parse(raw), records.scan(raw)
    assert set(spans) == set(f)
    for name, span in spans.items():
      assert span[0] == f[name].WhichOneof('kind'), name
      if span[0] == 'bytes_list':
        assert [raw[s:e] for s, e in records.span_bytes(raw, span)] == list(
            f[name].bytes_list.value), name
    assert records.span_int(raw, spans['image_id']) == _example(i)['image_id']
    view = records.span_array(raw, spans['img_pos'], np.float32, (7,))
    np.testing.assert_array_equal(view, _example(i)['img_pos'])
    assert view.base is not None  # a view of the record, not a copy
  # Negative and unpacked int64 values; a Feature with no list set.
  example = records.tf_example_pb2.Example()
  example.features.feature['neg'].int64_list.value.append(-7)
  example.features.feature['empty'].SetInParent()
  raw = example.SerializeToString()
  spans = records.scan(raw)
  assert records.span_int(raw, spans['neg']) == -7 and spans['empty'][0] == 'bytes_list'
  assert records.span_bytes(raw, spans['empty']) == []
  unpacked = b'\x0a\x0d\x0a\x0b\x0a\x01k\x12\x06\x1a\x04\x08\x05\x08\x06'  # k: [5, 6]
  assert records.span_int(unpacked, records.scan(unpacked)['k']) == 5
  with pytest.raises(ValueError, match='truncated'):
    records.scan(raw[:-1])
