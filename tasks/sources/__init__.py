"""Scene sources: where Sentinel-2 and Sentinel-1 observations of a tile come from."""

from tasks.sources.base import S1Stack, S2Stack, SceneSource

__all__ = ["S1Stack", "S2Stack", "SceneSource"]
