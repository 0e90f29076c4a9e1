"""The factory's error hierarchy.

Each class also subclasses the matching builtin, so callers can catch either. Messages say
what was expected and what came, and name the config field or the tile concerned.
"""

from __future__ import annotations


class FactoryError(Exception):
    """Base class of every error raised on purpose by the factory."""


class ConfigError(FactoryError, ValueError):
    """A configuration value is invalid; ``field`` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class StorageError(FactoryError, OSError):
    """A storage location cannot be read or written."""


class TileError(FactoryError, RuntimeError):
    """A stage failed on one tile; ``tile_id`` names it."""

    def __init__(self, tile_id: str, message: str) -> None:
        self.tile_id = tile_id
        super().__init__(f"tile {tile_id}: {message}")


class DataError(FactoryError, ValueError):
    """Input data has the wrong shape, dtype or content."""


class StopRequested(FactoryError, InterruptedError):
    """The build was asked to stop (Ctrl-C, SIGTERM, a cancellation); see :mod:`tasks.stop`.

    Raised by long loops at their next check; what was committed stays committed.
    """
