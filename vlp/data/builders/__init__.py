"""tfds builders of vlp (importing this package registers them with tfds)."""

from vlp.data.builders.vlp_scenes import VlpScenes, VlpScenesConfig

__all__ = ['VlpScenes', 'VlpScenesConfig']
