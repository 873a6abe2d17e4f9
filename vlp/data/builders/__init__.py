"""tfds builders of vlp (importing this package registers them with tfds).

`vlp_scenes` is synthetic; the others read public files from a manual download
directory (build them with `python -m vlp.data.prepare`).
"""

from vlp.data.builders.vlp_scenes import VlpScenes, VlpScenesConfig
from vlp.data.builders.karpathy import CocoKarpathy, Flickr30kKarpathy
from vlp.data.builders.refcoco import Refcoco, Refcocog, RefcocoPlus
from vlp.data.builders.vg_captions import VgCaptions
from vlp.data.builders.vg_qa import VgQa
from vlp.data.builders.vqa_v2 import VqaV2

BUILDERS = {b.name: b for b in (CocoKarpathy, Flickr30kKarpathy, VgCaptions, VqaV2, VgQa,
                                Refcoco, RefcocoPlus, Refcocog)}

__all__ = ['VlpScenes', 'VlpScenesConfig', 'CocoKarpathy', 'Flickr30kKarpathy',
           'VgCaptions', 'VqaV2', 'VgQa', 'Refcoco', 'RefcocoPlus', 'Refcocog', 'BUILDERS']
