"""Writer leases on a zone group: shared for publishers, exclusive for growing a grid.

Works on any store with read-after-write listing (S3, local disks), without conditional
writes: write a lease object, then list the folder (:class:`ZoneLease`).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from types import TracebackType
from typing import Any

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import StorageError
from tasks.liveness import known_dead, this_process
from tasks.publish._fs import _ls
from tasks.publish.conventions import LOCKS_DIR
from tasks.storage import get_fs, join, write_bytes_atomic


def _LEASE_BODY() -> bytes:  # noqa: N802 - reads as a constant
    """A lease's content: the writer's identity (host, pid, process start), no secret."""
    return json.dumps(this_process(), sort_keys=True).encode()


class ZoneLease:
    """A writer lease on one zone group of a year store: shared (publish) or exclusive (grow).

    Protocol (correct on any store with read-after-write listing, as S3 and local disks are):
    write ``{s|x}-{time_ns}-{uuid}`` into ``.tessera/locks/{group}/``, then list the folder.
    A shared lease holds when no live exclusive one is listed; an exclusive one when nothing
    else live is listed. Otherwise it deletes itself and retries after a random back-off. Of
    two writers that both write then list, at least one sees the other, so a conflicting pair
    never both hold. Leases older than ``ttl_s`` are ignored (crashed writers), and a lease
    whose writer is known dead (it names a process of this host that is gone, e.g. a build
    killed with ``kill -9``) is removed at once, so a resume on the same machine does not
    wait out the TTL.

    Use as a context manager::

        with ZoneLease(store_uri, "utm31", storage, exclusive=True):
            ...
    """

    def __init__(
        self,
        store_uri: str,
        group: str,
        storage: StorageConfig,
        *,
        exclusive: bool,
        ttl_s: float = 300.0,
        timeout_s: float = 900.0,
    ) -> None:
        self.dir_uri = join(store_uri, LOCKS_DIR, group)
        self.storage = storage
        self.exclusive = exclusive
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._path: str | None = None
        self._since = 0.0

    def _live(self, names: list[str], now_ns: int) -> list[str]:
        live = []
        for n in names:
            try:
                t_ns = int(n.split("-")[1])
            except (IndexError, ValueError):
                continue
            if now_ns - t_ns < self.ttl_s * 1e9:
                live.append(n)
        return live

    def __enter__(self) -> ZoneLease:
        fs, dir_path = get_fs(self.dir_uri, self.storage)
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            name = f"{'x' if self.exclusive else 's'}-{time.time_ns()}-{uuid.uuid4().hex}"
            uri = join(self.dir_uri, name)
            write_bytes_atomic(uri, _LEASE_BODY(), self.storage)
            _, path = get_fs(uri, self.storage)
            names = [p.rsplit("/", 1)[-1] for p in _ls(fs, dir_path)]
            names = [n for n in names if n[:2] in ("x-", "s-")]  # not temporary files
            others = [n for n in self._live(names, time.time_ns()) if n != name]
            others = [n for n in others if not self._reap_dead(fs, dir_path, n)]
            conflict = bool(others) if self.exclusive else any(n[0] == "x" for n in others)
            if not conflict:
                self._path, self._since = path, time.monotonic()
                return self
            fs.rm(path)
            if time.monotonic() > deadline:
                kind = "exclusive" if self.exclusive else "shared"
                raise StorageError(
                    f"{self.dir_uri}: Expected to take a {kind} lease within "
                    f"{self.timeout_s:.0f} s. Got conflicting leases {others[:3]} (another "
                    "build writing this zone; stale leases expire after "
                    f"{self.ttl_s:.0f} s)."
                )
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)

    def _reap_dead(self, fs: Any, dir_path: str, name: str) -> bool:
        """Remove the lease ``name`` if its writer is known dead; True if it was removed."""
        try:
            with fs.open(f"{dir_path}/{name}", "rb") as f:
                holder = json.loads(f.read() or b"{}")
        except (FileNotFoundError, ValueError):
            return False
        if not isinstance(holder, dict) or not known_dead(holder):
            return False
        try:
            fs.rm(f"{dir_path}/{name}")
        except FileNotFoundError:
            pass
        return True

    def renew(self) -> None:
        """Keep a long hold alive: past a third of the TTL, write a fresh lease, drop the old.

        Writers call it between blocks, so a live writer's lease never looks stale.
        """
        if self._path is None or time.monotonic() - self._since < self.ttl_s / 3:
            return
        fs, _ = get_fs(self.dir_uri, self.storage)
        name = f"{'x' if self.exclusive else 's'}-{time.time_ns()}-{uuid.uuid4().hex}"
        uri = join(self.dir_uri, name)
        write_bytes_atomic(uri, _LEASE_BODY(), self.storage)
        old, (_, self._path), self._since = self._path, get_fs(uri, self.storage), time.monotonic()
        fs.rm(old)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._path is not None:
            fs, _ = get_fs(self.dir_uri, self.storage)
            try:
                fs.rm(self._path)
            except FileNotFoundError:
                pass
            self._path = None


def _lease(
    store_uri: str, group: str, cfg: PublishConfig, storage: StorageConfig, *, exclusive: bool
) -> ZoneLease:
    return ZoneLease(
        store_uri,
        group,
        storage,
        exclusive=exclusive,
        ttl_s=cfg.lease_ttl_s,
        timeout_s=cfg.lease_timeout_s,
    )
