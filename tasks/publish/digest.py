"""The content hash of a tile's float embedding, computed where the data is produced.

Definition (``content_sha256`` of a tile record, the embedding group's ``content_sha256``
attribute): SHA-256 of the shape as JSON (``[H, W, B]``) followed by the 32-byte SHA-256 of
every :data:`SQUARE` x :data:`SQUARE` square of the float32 (H, W, B) array (edge squares
clipped to the tile), squares in row-major order, each square's bytes in C order.

A hash of square hashes, because each producer meets the data in its own pieces: the embed
stage embeds a tile in strips of rows one square wide (:func:`tasks.embed.embed_tile` hashes
each strip as it is made and stores the digest in the embedding's attributes), and
publishing reads strips of chunk rows up to four shards wide (:mod:`tasks.publish.write`
hashes them as they arrive when the attribute is absent). Each square is hashed from rows
in order, the squares in any order, so neither holds more than it already does and nothing
is read back only to hash it.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from tasks.errors import DataError
from tasks.grid import SHARD_PX

SQUARE = SHARD_PX
"""Side (pixels) of the squares hashed in order."""
ATTR = "content_sha256"
"""Embedding group attribute holding the digest, written by the embed stage."""
_HEX = re.compile(r"[0-9a-f]{64}")


class SquareDigest:
    """Feeds the content hash from pieces of the tile, each square's rows in order.

    ``add(r0, c0, piece)`` hashes a piece whose top-left pixel is ``(r0, c0)``: ``c0`` on
    the square grid, its width whole squares or reaching the tile's edge, its rows any run
    (split at square rows here). The rows of each square must arrive top to bottom without
    gap or repeat; one that does not makes the digest unavailable (:meth:`hexdigest` then
    returns ``None``), as does a square left incomplete.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self._rows = -(-self.shape[0] // SQUARE)
        self._cols = -(-self.shape[1] // SQUARE)
        n = self._rows * self._cols
        self._sha = [hashlib.sha256() for _ in range(n)]
        self._done: list[bytes | None] = [None] * n
        self._next_row = [0] * n  # rows of each square hashed so far
        self._ok = True

    def add(self, r0: int, c0: int, piece: np.ndarray) -> None:
        """Hash ``piece`` (float32 (h, w, B)) whose top-left pixel is (r0, c0)."""
        if not self._ok:
            return
        h, w = piece.shape[:2]
        if piece.dtype != np.float32 or piece.ndim != 3 or piece.shape[2] != self.shape[2]:
            raise ValueError(
                f"Expected a float32 piece of {self.shape[2]} bands. Got {piece.dtype} "
                f"{piece.shape}."
            )
        if c0 % SQUARE or (w % SQUARE and c0 + w != self.shape[1]):
            raise ValueError(
                f"Expected a piece on the {SQUARE}-px column grid. Got columns {c0}-{c0 + w}."
            )
        piece = np.ascontiguousarray(piece)
        dr = 0
        while dr < h:  # the piece's rows, split at square rows
            r = r0 + dr
            k = min(h - dr, SQUARE - r % SQUARE)
            for dc in range(0, w, SQUARE):
                i = r // SQUARE * self._cols + (c0 + dc) // SQUARE
                if self._next_row[i] != r % SQUARE or self._done[i] is not None:
                    self._ok = False
                    return
                part = piece[dr : dr + k, dc : dc + SQUARE]
                if part.shape[1] == w:  # the piece is one square wide: contiguous
                    self._sha[i].update(part)
                else:
                    for row in part:  # each row of a square is contiguous
                        self._sha[i].update(row)
                self._next_row[i] += k
                if self._next_row[i] == min(SQUARE, self.shape[0] - r // SQUARE * SQUARE):
                    self._done[i] = self._sha[i].digest()
            dr += k

    def hexdigest(self) -> str | None:
        """The digest once every square is complete; ``None`` if out of order or short."""
        if not self._ok or any(d is None for d in self._done):
            return None
        top = hashlib.sha256(json.dumps(list(self.shape)).encode())
        for d in self._done:
            top.update(d)  # type: ignore[arg-type]
        return top.hexdigest()


def content_sha256(e: np.ndarray) -> str:
    """The content hash of a whole float32 (H, W, B) array (tests, benchmarks)."""
    d = SquareDigest(e.shape)  # type: ignore[arg-type]
    d.add(0, 0, np.asarray(e, dtype=np.float32))
    out = d.hexdigest()
    assert out is not None
    return out


def check_digest(value: object, where: str) -> str | None:
    """A stored ``content_sha256`` attribute, validated (``None`` when absent).

    Raises:
        DataError: not 64 lowercase hex digits.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise DataError(
            f"{where}: Expected attribute {ATTR!r} 64 lowercase hex digits. Got {value!r}."
        )
    return value
