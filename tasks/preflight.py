"""Checks a build passes before any work starts (no Prefect import).

:func:`preflight` validates a config and probes what a build will touch, so a bad input
fails in a second with a :class:`~tasks.errors.ConfigError` naming the field, before a
Prefect server starts, a folder is created or a task runs:

- the output and work roots can be written (a probe that removes everything it created,
  deepest first, so a failed start leaves nothing behind);
- a given checkpoint exists (a local ``stat`` or an S3 ``HEAD``);
- Sentinel Hub credentials named by environment variables are set;
- an evaluation with the synthetic Earth's ground truth (``evaluation.labels`` land_cover or
  canopy_height) reads scenes of the synthetic Earth (its own source, or a local endpoint
  that serves it), not real imagery those labels do not describe.

Credentials held in a named Prefect block can only be read through the Prefect API;
:func:`check_credential_blocks` reads them once (no retry), and the command line calls it
right after the API is up, before the build flow starts. Values are never kept or shown.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.config import BuildConfig, StorageConfig, validate_build_config
from tasks.credentials import s3_credentials, sentinelhub_credentials
from tasks.errors import ConfigError

__all__ = [
    "check_credential_blocks",
    "check_readable",
    "check_evaluation_labels",
    "check_writable",
    "local_checks",
    "preflight",
    "serves_synthetic_earth",
]


def _local_path(uri: str) -> Path | None:
    """The local path of a URI (plain path or ``file://``), or None for a remote one."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        return None
    return Path(uri).expanduser()


def _probe_local_dir(root: Path, uri: str, field: str) -> None:
    """Create ``root`` (and missing parents), write and delete a probe file, then remove the
    folders this probe created, deepest first."""
    missing: list[Path] = []
    p = root.absolute()
    while not p.exists():
        if p.is_symlink():  # a dangling link: it would be followed on mkdir
            raise ConfigError(field, f"expected a writable folder. Got a broken symbolic link {str(p)!r}")
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        what = "a file" if p == root.absolute() else f"a file {str(p)!r} on its path"
        raise ConfigError(field, f"expected a writable folder at {uri!r}. Got {what}")
    created: list[Path] = []
    probe = root / f".write-probe-{uuid.uuid4().hex}"
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(field, f"expected a writable folder at {uri!r}. Got {reason}") from None
    finally:
        probe.unlink(missing_ok=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:  # something else wrote there meanwhile: leave it
                break


def check_writable(uri: str, cfg: StorageConfig, field: str) -> None:
    """Probe that a root URI can be written, leaving nothing behind.

    Local roots: missing folders are created for the probe and removed again. Remote roots:
    a probe object is written and deleted.

    Raises:
        ConfigError: naming ``field``; the message never holds a secret.
    """
    local = _local_path(uri)
    if local is not None:
        _probe_local_dir(local, uri, field)
        return
    from tasks.storage import get_fs, join, redact

    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        fs, path = get_fs(probe, cfg)
        fs.pipe_file(path, b"ok")
        fs.rm(path)
    except ConfigError:
        raise
    except Exception as exc:
        msg = f"expected a writable location at {uri!r}. Got {type(exc).__name__}: {exc}"
        raise ConfigError(field, redact(msg, cfg)) from None


def check_readable(uri: str, cfg: StorageConfig, field: str) -> None:
    """Check that a file URI exists: a local ``stat`` or one S3 ``HEAD``.

    Raises:
        ConfigError: naming ``field``; the message never holds a secret.
    """
    local = _local_path(uri)
    if local is not None:
        if local.is_file() and os.access(local, os.R_OK):
            return
        got = ("a folder" if local.is_dir() else "an unreadable file" if local.exists()
               else "no file")
        raise ConfigError(field, f"expected an existing, readable file. Got {got} at {uri!r}")
    from tasks.storage import get_fs, redact

    try:
        fs, path = get_fs(uri, cfg)
        ok = fs.isfile(path)
    except ConfigError:
        raise
    except Exception as exc:
        msg = f"expected a readable object at {uri!r}. Got {type(exc).__name__}: {exc}"
        raise ConfigError(field, redact(msg, cfg)) from None
    if not ok:
        raise ConfigError(field, f"expected an existing file. Got no object at {uri!r}")


def local_checks(cfg: BuildConfig) -> None:
    """Every check that needs no Prefect API: storage roots, checkpoint, credentials from the
    environment. Each raises :class:`ConfigError` naming its field."""
    sh = cfg.source.sentinelhub
    if cfg.source.kind == "sentinelhub" and not sh.secret_block:
        sentinelhub_credentials(None, sh.client_id_env, sh.client_secret_env,
                                field_name="source.sentinelhub")
    check_evaluation_labels(cfg)
    _storage_checks(cfg, with_block=False)


_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _loopback(url: str | None) -> bool:
    host = urlsplit(url or "").hostname or ""
    return host in _LOOPBACK or host.startswith("127.")


def serves_synthetic_earth(cfg: BuildConfig) -> bool:
    """Whether the build's scenes come from the synthetic Earth: its own source, or the
    Sentinel Hub or STAC endpoint on this machine (``tessera shub-endpoint`` /
    ``stac-endpoint``, which serve it)."""
    src = cfg.source
    if src.kind == "synthetic":
        return True
    if src.kind == "sentinelhub":
        return src.sentinelhub.preset == "custom" and _loopback(src.sentinelhub.base_url)
    if src.kind == "stac":
        return all(_loopback(c.api_url) for c in src.stac.catalogues())
    return False


def check_evaluation_labels(cfg: BuildConfig) -> None:
    """Refuse an evaluation against the synthetic Earth's ground truth on real scenes.

    Raises:
        ConfigError: (``evaluation.labels``) the labels are synthetic but the source is not.
    """
    ev = cfg.evaluation
    if ev.enabled and ev.labels != "file" and not serves_synthetic_earth(cfg):
        raise ConfigError(
            "evaluation.labels",
            f"expected labels: file (with evaluation.labels_uri) for source.kind "
            f"{cfg.source.kind!r}: {ev.labels!r} is the synthetic Earth's ground truth and "
            f"does not describe real scenes. Got labels {ev.labels!r} with a "
            f"{cfg.source.kind!r} source that is not a local synthetic-Earth endpoint "
            f"(or set evaluation.enabled=false)")


def check_credential_blocks(cfg: BuildConfig) -> None:
    """Read the Prefect blocks a config names for credentials, once (no retry), then run the
    storage checks that need them. Needs the Prefect API.

    Raises:
        ConfigError: naming the field whose block is missing or malformed.
    """
    sh = cfg.source.sentinelhub
    if cfg.source.kind == "sentinelhub" and sh.secret_block:
        sentinelhub_credentials(sh.secret_block, sh.client_id_env, sh.client_secret_env,
                                field_name="source.sentinelhub")
    if cfg.storage.s3_credentials_block:
        s3_credentials(cfg.storage.s3_credentials_block)
        _storage_checks(cfg, with_block=True)


def _storage_checks(cfg: BuildConfig, with_block: bool) -> None:
    """Probe the checkpoint and the storage roots: with ``with_block`` only the S3 URIs whose
    credentials come from a Prefect block, else all the others."""
    st = cfg.storage

    def mine(uri: str) -> bool:
        return (bool(st.s3_credentials_block) and uri.startswith("s3://")) == with_block

    ckpt = cfg.training.checkpoint_uri or ""
    if not cfg.training.enabled and ckpt.startswith("hf://"):
        if with_block:  # one HEAD request through the Hub client; the token may be in a block
            from tasks.checkpoints import hf_identity, parse_hf_uri
            from tasks.credentials import hf_token

            hf_identity(parse_hf_uri(ckpt), hf_token(cfg.model.hf_token_secret),
                        cfg.model.hf_endpoint)
    elif not cfg.training.enabled and mine(ckpt):
        check_readable(ckpt, st, "training.checkpoint_uri")
    for uri, field in ((st.output_uri, "storage.output_uri"), (st.work_uri, "storage.work_uri")):
        if mine(uri):
            check_writable(uri, st, field)


def preflight(config: BuildConfig | dict[str, Any], blocks: bool = True) -> BuildConfig:
    """Validate a config and check, before any work, that its storage is writable, its
    checkpoint exists and its credentials resolve.

    Credentials are only checked here; each process resolves its own when it needs them
    (:mod:`tasks.credentials`), so none travels in a parameter or result.

    Args:
        config: a config or its dict form.
        blocks: also read the Prefect blocks the config names (needs the Prefect API);
            False runs only :func:`local_checks`.

    Raises:
        ConfigError: naming the first field that fails.
    """
    cfg = validate_build_config(config)
    local_checks(cfg)
    if blocks:
        check_credential_blocks(cfg)
    return cfg
