"""Region-feature readers: BUTD TSV, per-image npz and npy, UNITER's image DBs
(LMDB), one output schema.

* :func:`source.open_source` (`tsv:PATH | npz:DIR | npy:DIR | lmdb:DIR`) -> a source whose
  `get(image_id)` returns :class:`regions.Regions`;
* :func:`regions.image_record` selects K regions by the spec rule, validates, casts
  and adds the 7-d box feature;
* :class:`errors.BadInput` / :class:`errors.BuildReport`: errors that name their
  source, counted instead of raised with `skip_bad`.
"""

from vlp.data.features.errors import KINDS, BadInput, BuildReport
from vlp.data.features.files import NpyFeatures, NpzFeatures, load_image_sizes
from vlp.data.features.imgdb import LmdbFeatures
from vlp.data.features.regions import RecordFormat, Regions, image_record
from vlp.data.features.source import default_spec, open_source, source_format
from vlp.data.features.tsv import BUTD_FIELDS, TsvFeatures

__all__ = ['KINDS', 'BadInput', 'BuildReport', 'NpyFeatures', 'NpzFeatures', 'LmdbFeatures',
           'load_image_sizes', 'RecordFormat', 'Regions', 'image_record', 'default_spec',
           'open_source', 'source_format', 'BUTD_FIELDS', 'TsvFeatures']
