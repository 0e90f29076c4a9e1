"""Errors raised by :mod:`tessera_model`.

A small hierarchy; every class also subclasses the matching builtin so callers may catch
either (``except ValueError`` keeps working).
"""

from __future__ import annotations


class TesseraModelError(Exception):
    """Base class of every error raised by :mod:`tessera_model`."""


class SpecError(TesseraModelError, ValueError):
    """A model specification or preset name is invalid."""


class InputShapeError(TesseraModelError, ValueError):
    """An input array has the wrong shape or dtype."""


class CheckpointError(TesseraModelError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class StateDictMismatchError(CheckpointError):
    """A state dict's keys or shapes differ from the model's.

    Attributes:
        missing: keys the model expects that the checkpoint lacks.
        unexpected: keys in the checkpoint that the model does not have.
        shape_mismatches: ``{key: (expected_shape, found_shape)}``.
    """

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if shape_mismatches:
            parts.append(
                "shape mismatches: "
                + ", ".join(
                    f"{k} expected {tuple(e)} got {tuple(g)}"
                    for k, (e, g) in shape_mismatches.items()
                )
            )
        super().__init__("State dict does not match the model: " + "; ".join(parts))
