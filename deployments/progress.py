"""A terminal progress bar for builds run from the command line.

It watches the work root for the commit markers the stages write (``*.done.json`` beside
each tile's result), so it needs no hook into the flow and also counts work a previous,
interrupted run completed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

STAGES = ("scenes", "masks", "dpixels", "embeddings")


class BuildProgress:
    """Show tiles x stages done while a build runs (only on a terminal, local work roots)."""

    def __init__(self, work_uri: str, tile_ids: list[str], interval: float = 0.5) -> None:
        self.root = Path(work_uri)
        self.tiles = tile_ids
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self) -> int:
        """Stage results committed for this build's tiles."""
        n = 0
        for stage in STAGES:
            for t in self.tiles:
                d = self.root / stage / t
                if d.is_dir() and any(d.glob("*.done.json")):
                    n += 1
        return n

    def __enter__(self) -> BuildProgress:
        if "://" not in str(self.root) and sys.stderr.isatty():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        total = len(self.tiles) * len(STAGES)
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
            job = bar.add_task("tiles x stages", total=total)
            while not self._stop.wait(self.interval):
                bar.update(job, completed=self.count())
