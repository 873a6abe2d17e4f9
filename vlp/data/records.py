"""Random access to tfds records, parsing the stored tf.Example directly.

tfds decodes every field of a record in Python (~0.8 ms for a 2048-d record). The
readers of vlp instead ask `as_data_source` for the serialized example, parse it
with one proto parse and view raw-bytes tensors with `np.frombuffer` (~0.03 ms).
That relies on how tfds 4.9 encodes features (tests/test_records.py pins it):
  * an integer scalar is an int64_list of one value, a float scalar a float_list;
  * text, and sequences or columns of text, are bytes_list values (utf-8);
  * a Tensor with `Encoding.BYTES` is one bytes_list value holding the C-order
    buffer; other tensors are flat int64 / float / bytes lists;
  * fields of a nested FeaturesDict are stored under 'outer/inner' keys.
Readers fall back to tfds' own decoding where `tf_example_pb2` is missing or a
field's encoding is not one of these.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from vlp.data import staging

try:  # the proto module tfds' own numpy example parser uses
  from tensorflow_datasets.proto import tf_example_pb2
except ImportError:  # pragma: no cover - other tfds layouts: generic decode
  tf_example_pb2 = None

READ_CHUNK = 256  # records per batched read when indexing a split


def available() -> bool:
  """Whether serialized examples can be parsed here (else tfds decodes them)."""
  return tf_example_pb2 is not None


def open_source(builder, split: str, *, raw: bool):
  """A random-access source of `split`: serialized examples, or tfds-decoded dicts."""
  staging.check_local(builder)
  if raw:
    return builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return builder.as_data_source(split)


def parse(raw: bytes):
  """The feature map (name -> tf.train.Feature) of one serialized example."""
  return tf_example_pb2.Example.FromString(raw).features.feature


def is_bytes_tensor(feat) -> bool:
  """A Tensor stored as one raw buffer whose only free axis is the first."""
  return (isinstance(feat, tfds.features.Tensor)
          and getattr(feat, '_encoding', None) == tfds.features.Encoding.BYTES
          and len(feat.shape) >= 1 and feat.shape[0] is None
          and None not in feat.shape[1:])


def is_int_scalar(feat) -> bool:
  return (isinstance(feat, tfds.features.Tensor) and feat.shape == ()
          and np.issubdtype(feat.np_dtype, np.integer))


def bytes_layout(feats, names) -> dict | None:
  """{name: (dtype, tail shape)} of the `names` present in `feats`, or None.

  None when parsing is unavailable or one of them is not a raw-bytes tensor:
  the caller then reads through tfds' decoder.
  """
  if not available():
    return None
  layout = {}
  for name in names:
    if name not in feats:
      continue
    if not is_bytes_tensor(feats[name]):
      return None
    layout[name] = (np.dtype(feats[name].np_dtype), tuple(feats[name].shape[1:]))
  return layout


def array(feature, dtype, tail: tuple = ()) -> np.ndarray:
  """A raw-bytes tensor as a read-only [N, *tail] view of the stored buffer."""
  return np.frombuffer(feature.bytes_list.value[0], dtype).reshape((-1,) + tail)


# Protocol-buffer wire format, enough to find a tf.Example's fields without parsing
# (and copying) the whole record: Example.features (1) -> Features.feature (1, map
# entries: key 1, value 2) -> Feature.bytes_list (1) | float_list (2) | int64_list (3)
# -> value (1).
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
KIND_FIELDS = {1: 'bytes_list', 2: 'float_list', 3: 'int64_list'}


def _varint(buf, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7


def _fields(buf, start: int, end: int):
  """(field number, wire type, value start, value end) of a message's fields; the
  value of a varint field is its number, given as start (end = -1)."""
  pos = start
  while pos < end:
    tag, pos = _varint(buf, pos)
    number, wire = tag >> 3, tag & 7
    if wire == _LEN:
      size, pos = _varint(buf, pos)
      if pos + size > end:
        raise ValueError('truncated protobuf message')
      yield number, wire, pos, pos + size
      pos += size
    elif wire == _VARINT:
      value, pos = _varint(buf, pos)
      yield number, wire, value, -1
    elif wire in (_I64, _I32):
      size = 8 if wire == _I64 else 4
      yield number, wire, pos, pos + size
      pos += size
    else:
      raise ValueError(f'unsupported protobuf wire type {wire}')
  if pos != end:
    raise ValueError('truncated protobuf message')


def scan(raw: bytes, names=None) -> dict[str, tuple[str, int, int]]:
  """name -> (list kind, start, end of the list message in `raw`) of the features of a
  serialized tf.Example (those in `names`; None: all), without copying anything
  (read values with `span_bytes`, `span_int`, `span_array`)."""
  try:
    return _scan(raw, names)
  except IndexError:  # a varint runs past the end
    raise ValueError('truncated protobuf message') from None


def _scan(raw: bytes, names) -> dict[str, tuple[str, int, int]]:
  out = {}
  for number, wire, start, end in _fields(raw, 0, len(raw)):
    if number != 1 or wire != _LEN:
      continue
    for entry_no, entry_wire, e_start, e_end in _fields(raw, start, end):
      if entry_no != 1 or entry_wire != _LEN:
        continue
      key, value = None, None
      for f_no, f_wire, f_start, f_end in _fields(raw, e_start, e_end):
        if f_no == 1 and f_wire == _LEN:
          key = bytes(raw[f_start:f_end]).decode('utf-8')
        elif f_no == 2 and f_wire == _LEN:
          value = (f_start, f_end)
      if key is None or (names is not None and key not in names):
        continue
      kind = ('bytes_list', e_end, e_end)  # an unset Feature: empty
      for k_no, k_wire, k_start, k_end in _fields(raw, *(value or (e_end, e_end))):
        if k_no in KIND_FIELDS and k_wire == _LEN:
          kind = (KIND_FIELDS[k_no], k_start, k_end)
      out[key] = kind
  return out


def span_bytes(raw: bytes, span: tuple[str, int, int]) -> list[tuple[int, int]]:
  """(start, end) of each value of a scanned bytes_list."""
  kind, start, end = span
  if kind != 'bytes_list':
    raise ValueError(f'expected a bytes_list, got a {kind}')
  return [(s, e) for number, wire, s, e in _fields(raw, start, end)
          if number == 1 and wire == _LEN]


def span_int(raw: bytes, span: tuple[str, int, int]) -> int:
  """The one value of a scanned int64_list (packed or not)."""
  kind, start, end = span
  if kind != 'int64_list':
    raise ValueError(f'expected an int64_list, got a {kind}')
  for number, wire, s, e in _fields(raw, start, end):
    if number == 1:
      value = _varint(raw, s)[0] if wire == _LEN else s
      return value - (1 << 64) if value >= 1 << 63 else value
  raise ValueError('empty int64_list')


def span_array(raw: bytes, span: tuple[str, int, int], dtype, tail: tuple = ()) -> np.ndarray:
  """A scanned raw-bytes tensor as a read-only [N, *tail] view into `raw` (no copy)."""
  (start, end), = span_bytes(raw, span)
  dtype = np.dtype(dtype)
  return np.frombuffer(raw, dtype, (end - start) // dtype.itemsize, start).reshape(
      (-1,) + tail)


def text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def value(feature, kind):
  """One stored feature as `kind`: int, float or str (its one value), list (all its
  values as text) or a numpy dtype (all its values as a flat array)."""
  which = feature.WhichOneof('kind')
  values = getattr(feature, which).value if which else []
  if kind in (int, float):
    return kind(values[0])
  if kind is str:
    return values[0].decode('utf-8')
  if kind is list:
    return [v.decode('utf-8') for v in values]
  if which == 'bytes_list':  # a raw-bytes tensor
    return np.frombuffer(values[0], kind).copy() if values else np.zeros(0, kind)
  return np.asarray(values, kind)


def decoded(value_, kind):
  """One tfds-decoded field as `kind`; arrays and texts come flat, as `value` gives."""
  if kind in (int, float):
    return kind(value_)
  if kind is str:
    return text(value_)
  if kind is list:
    return [text(v) for v in np.asarray(value_, object).reshape(-1)]
  return np.asarray(value_, kind).reshape(-1)


def read_fields(source, lo: int, hi: int, kinds: dict, *, raw: bool) -> Iterator[dict]:
  """`kinds` ({name: kind}; nested fields as 'outer/inner') of records [lo, hi).

  `source` is `open_source(..., raw=raw)`; records are read in chunks.
  """
  for start in range(lo, hi, READ_CHUNK):
    for record in source.__getitems__(list(range(start, min(hi, start + READ_CHUNK)))):
      if raw:
        f = parse(record)
        yield {k: value(f[k], kind) for k, kind in kinds.items()}
      else:
        yield {k: decoded(_nested(record, k), kind) for k, kind in kinds.items()}


def _nested(record: dict, name: str):
  for part in name.split('/'):
    record = record[part]
  return record
