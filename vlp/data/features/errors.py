"""Bad input and the build report: nothing is dropped without being counted.

Readers and builders raise :class:`BadInput` for anything wrong with the public
files (naming the file, the line or record, and what was expected). A
:class:`BuildReport` either re-raises it (the default) or, with `skip_bad`,
counts it by kind and lets the build skip that one item. Everything a build
drops on purpose (a sixth caption, a VG image that is in COCO's test split) is
counted in the same report under a reason.
"""

from __future__ import annotations

import collections
import json

# kind -> what it means (the summary prints the kinds that occurred).
KINDS = {
    'corrupt_line': 'TSV line that does not split into the expected fields',
    'bad_base64': 'field that is not valid base64',
    'wrong_length': 'decoded array whose byte length does not fit num_boxes',
    'feature_dim': 'region features of another dimension than configured',
    'wrong_shape': 'array of an unexpected shape (boxes, conf, soft labels, no regions)',
    'non_finite': 'NaN or inf values (also float16 overflow)',
    'bad_value': 'value out of range (image size, split name, id)',
    'missing_features': 'image the annotations need that has no region features',
    'missing_field': 'JSON / npz / pickle record without a required field',
    'missing_image_size': 'image whose width/height is known nowhere',
    'duplicate_image': 'image id that occurs twice',
    'too_few_captions': 'image with fewer than 5 usable captions',
    'unreadable_file': 'feature file that cannot be opened or parsed',
    'pickled': 'entry that would need unpickling (refused: unpickling can run code)',
}
_EXAMPLES_PER_KIND = 3


class BadInput(ValueError):
  """A problem with one item of the input files.

  Attributes:
    kind: one of `KINDS`.
    where: file plus line or record, e.g. `features.tsv:17` or
      `dataset_coco.json: images[3] (cocoid 42)`.
  """

  def __init__(self, kind: str, where: str, message: str):
    if kind not in KINDS:
      raise ValueError(f'unknown bad-input kind {kind!r}; expected one of {sorted(KINDS)}')
    self.kind, self.where = kind, where
    super().__init__(f'{where}: {message} [{kind}]')


class BuildReport:
  """What a build wrote, skipped and dropped.

  Attributes:
    skip_bad: count `BadInput` instead of raising it.
    examples: split -> records written.
    bad_input: kind -> items skipped (only with `skip_bad`).
    dropped: category (e.g. 'captions', 'images', 'questions') -> reason -> count.
    notes: free-form facts worth printing (e.g. the answer vocabulary size).
  """

  def __init__(self, skip_bad: bool = False):
    self.skip_bad = skip_bad
    self.examples: dict[str, int] = {}
    self.bad_input: collections.Counter = collections.Counter()
    self.bad_examples: dict[str, list[str]] = {}
    self.dropped: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter)
    self.notes: dict[str, object] = {}

  def bad(self, err: BadInput) -> None:
    """Raises `err`, or counts it when skipping bad input."""
    if not self.skip_bad:
      raise err
    self.bad_input[err.kind] += 1
    seen = self.bad_examples.setdefault(err.kind, [])
    if len(seen) < _EXAMPLES_PER_KIND:
      seen.append(str(err))

  def drop(self, category: str, reason: str, count: int = 1) -> None:
    if count:
      self.dropped[category][reason] += int(count)

  def as_dict(self) -> dict:
    return {'examples': dict(self.examples), 'bad_input': dict(self.bad_input),
            'bad_input_examples': self.bad_examples,
            'dropped': {k: dict(v) for k, v in self.dropped.items() if v},
            'notes': self.notes}

  def to_json(self) -> str:
    return json.dumps(self.as_dict(), indent=1, sort_keys=True, default=str)

  def summary(self) -> str:
    """Human-readable summary (what `python -m vlp.data.prepare` prints)."""
    lines = ['examples per split:']
    lines += [f'  {s}: {n}' for s, n in self.examples.items()]
    missing = self.bad_input.get('missing_features', 0)
    lines.append(f'images without features: {missing}'
                 + ('' if self.skip_bad else ' (any would have stopped the build)'))
    for category, reasons in sorted(self.dropped.items()):
      if reasons:
        lines.append(f'{category} dropped:')
        lines += [f'  {reason}: {n}' for reason, n in sorted(reasons.items())]
    if self.bad_input:
      lines.append('bad input skipped (--skip_bad):')
      for kind, n in sorted(self.bad_input.items()):
        lines.append(f'  {kind}: {n}  ({KINDS[kind]})')
        lines += [f'      e.g. {m}' for m in self.bad_examples.get(kind, [])[:1]]
    for key, value in self.notes.items():
      lines.append(f'{key}: {value}')
    return '\n'.join(lines)
