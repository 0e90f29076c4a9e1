"""Checkpoints from where users keep them: a local path, ``s3://`` (fsspec), the Hugging Face Hub.

``hf://OWNER/REPO/PATH/IN/REPO[@REVISION]`` names a file of a Hub model repository, e.g.
``hf://geotessera/TESSERA-V-2.0-2B-M/ckpt/student_medium.pt@41db8ee5...``. It is fetched with
``huggingface_hub.hf_hub_download`` into the Hub's own cache (``HF_HUB_CACHE`` / ``HF_HOME``,
or ``cache_dir``), so every process of a machine downloads it once; the endpoint is
``HF_ENDPOINT`` (read by ``huggingface_hub``) unless one is given; the token comes from
:func:`tasks.credentials.hf_token` (``HF_TOKEN`` or a Prefect Secret block). A revision given
as a branch or tag is resolved to its commit once (:func:`resolve_hf`), and the pinned URI is
what later stages use, so a moving branch never changes a build half way.

The SHA-256 of the bytes is computed for every checkpoint (it is also the checkpoint's
content key) and compared with the expected one where it is known: given in the config, or
an official file listed in :data:`OFFICIAL_SHA256`. A missing file or a wrong hash raises
:class:`~tasks.errors.ConfigError` before any tile is embedded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import IO, Any

from tasks.config import ModelConfig, StorageConfig
from tasks.credentials import hf_token
from tasks.errors import ConfigError
from tasks.refs import CheckpointRef
from tasks.storage import get_fs, join, normalise, write_bytes_atomic

HF_SCHEME = "hf://"
FIELD = "training.checkpoint_uri"
OFFICIAL_SHA256: dict[tuple[str, str], str] = {
    ("geotessera/TESSERA-V-2.0-2B-N", "ckpt/student_nano.pt"):
        "bc9929e3643dfab2744c2ce14e7c14f698703a94e9562e4e0982f9d6540b0691",
    ("geotessera/TESSERA-V-2.0-2B-S", "ckpt/student_small.pt"):
        "92619d4ffc2936895f145fdcf710140b58c23c860e02f01873828b10c6958d95",
    ("geotessera/TESSERA-V-2.0-2B-M", "ckpt/student_medium.pt"):
        "3823be7db9d9cfc93f3c2a47c7699be82821ab4e1117d4d2befdb746941ee96e",
    ("geotessera/TESSERA-V-2.0-2B-L", "ckpt/student_large.pt"):
        "b5f20239dbb1849c01a3e407b095aafe39b0bf764300206af78cb9b85f9ec1e1",
}
"""SHA-256 of the official v2 student files (``shared/reference/tessera-v2.md`` section 5, as
recorded by third-party converters that pin them; a mismatch is refused)."""
OFFICIAL_PRESET: dict[tuple[str, str], str] = {
    ("geotessera/TESSERA-V-2.0-2B-N", "ckpt/student_nano.pt"): "v2-nano",
    ("geotessera/TESSERA-V-2.0-2B-S", "ckpt/student_small.pt"): "v2-small",
    ("geotessera/TESSERA-V-2.0-2B-M", "ckpt/student_medium.pt"): "v2-medium",
    ("geotessera/TESSERA-V-2.0-2B-L", "ckpt/student_large.pt"): "v2-large",
}
"""The preset each official file needs."""
_HF_URI = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)/(?P<file>[^@]+?)(?:@(?P<rev>[^@/]+))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22


@dataclass(frozen=True)
class HfFile:
    """A file of a Hub model repository at a revision (a branch, tag or commit)."""

    repo_id: str
    filename: str
    revision: str = "main"

    @property
    def uri(self) -> str:
        """``hf://repo/file@revision``."""
        return f"{HF_SCHEME}{self.repo_id}/{self.filename}@{self.revision}"


def parse_hf_uri(uri: str) -> HfFile:
    """Parse ``hf://OWNER/REPO/PATH[@REVISION]`` (revision default ``main``).

    Raises:
        ConfigError: for a malformed URI (names ``training.checkpoint_uri``).
    """
    m = _HF_URI.match(uri)
    if not m:
        raise ConfigError(
            FIELD,
            "Expected hf://OWNER/REPO/PATH/IN/REPO[@REVISION], e.g. "
            f"'hf://geotessera/TESSERA-V-2.0-2B-M/ckpt/student_medium.pt@main'. Got {uri!r}.",
        )
    return HfFile(m["repo"], m["file"], m["rev"] or "main")


def is_hf(uri: str) -> bool:
    """Whether ``uri`` names a Hugging Face Hub file."""
    return uri.startswith(HF_SCHEME)


def _hf_error(exc: Exception, f: HfFile) -> ConfigError:
    name = type(exc).__name__
    what = {
        "RepositoryNotFoundError": "no such repository (or no access: set HF_TOKEN or "
        "model.hf_token_secret)",
        "RevisionNotFoundError": f"no revision {f.revision!r}",
        "EntryNotFoundError": f"no file {f.filename!r} at revision {f.revision!r}",
        "RemoteEntryNotFoundError": f"no file {f.filename!r} at revision {f.revision!r}",
        "GatedRepoError": "a gated repository: accept its terms and set a token",
    }.get(name, f"{name}: {exc}")
    return ConfigError(FIELD, f"Expected a readable Hugging Face Hub file {f.uri}. Got {what}.")


def hf_identity(
    f: HfFile, token: str | None = None, endpoint: str | None = None
) -> dict[str, Any]:
    """The commit, ETag and size of a Hub file (one HEAD request, nothing downloaded).

    Returns:
        ``{"repo", "file", "commit", "etag", "size"}``.

    Raises:
        ConfigError: missing repository, revision or file, or no access.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(f.repo_id, f.filename, revision=f.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token or False, endpoint=endpoint)
    except Exception as exc:  # the Hub's error classes differ across versions
        raise _hf_error(exc, f) from None
    return {"repo": f.repo_id, "file": f.filename, "commit": meta.commit_hash,
            "etag": meta.etag, "size": meta.size}  # fmt: skip


def resolve_hf(f: HfFile, token: str | None = None, endpoint: str | None = None) -> HfFile:
    """The same file pinned to the commit its revision points at now."""
    commit = hf_identity(f, token, endpoint)["commit"]
    return HfFile(f.repo_id, f.filename, commit or f.revision)


def hf_download(
    f: HfFile,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """Download (or find in the Hub cache) a Hub file; returns its local path.

    Raises:
        ConfigError: missing repository, revision or file, or no access.
    """
    from huggingface_hub import hf_hub_download

    try:
        return str(hf_hub_download(f.repo_id, f.filename, revision=f.revision,
                                   token=token or False, endpoint=endpoint,
                                   cache_dir=cache_dir))  # fmt: skip
    except Exception as exc:
        raise _hf_error(exc, f) from None


@dataclass(frozen=True)
class CheckpointSource:
    """Where to read a checkpoint's bytes, and what is expected of them.

    Attributes:
        uri: the URI as the config gives it (``hf://`` pinned to a commit once resolved).
        token: Hub token (never logged, never stored).
        endpoint: Hub endpoint; ``None``: ``HF_ENDPOINT`` or the public Hub.
        cache_dir: Hub cache folder; ``None``: the Hub's default.
    """

    uri: str
    token: str | None = None
    endpoint: str | None = None
    cache_dir: str | None = None

    def __repr__(self) -> str:
        return f"CheckpointSource(uri={self.uri!r}, endpoint={self.endpoint!r})"

    def open(self, storage: StorageConfig) -> IO[bytes]:
        """A binary file object of the checkpoint (downloaded first for ``hf://``).

        Raises:
            ConfigError: the file does not exist (or no access).
        """
        if is_hf(self.uri):
            path = hf_download(parse_hf_uri(self.uri), self.token, self.endpoint, self.cache_dir)
            return open(path, "rb")  # noqa: SIM115 (the caller closes it)
        fs, path = get_fs(self.uri, storage)
        try:
            return fs.open(path, "rb")
        except FileNotFoundError:
            raise ConfigError(
                FIELD, f"Expected an existing checkpoint. Got none at {self.uri!r}."
            ) from None

    def expected_sha256(self, configured: str | None) -> str | None:
        """The SHA-256 the bytes must have: the configured one, else an official file's."""
        if configured:
            return configured.lower()
        if is_hf(self.uri):
            f = parse_hf_uri(self.uri)
            return OFFICIAL_SHA256.get((f.repo_id, f.filename))
        return None


def sha256_of(fh: IO[bytes]) -> str:
    """Hex SHA-256 of a binary stream, read in 4 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def check_sha256(uri: str, digest: str, expected: str | None,
                 field: str = "model.checkpoint_sha256") -> None:
    """Raise :class:`ConfigError` when ``expected`` is known and differs from ``digest``."""
    if expected is not None and not _SHA256.match(expected):
        raise ConfigError(field, f"Expected 64 lowercase hex digits. Got {expected!r}.")
    if expected is not None and digest != expected:
        raise ConfigError(
            field, f"Expected SHA-256 {expected} for checkpoint {uri}. Got {digest} "
            "(a corrupt, truncated or different file).",
        )


def work_copy_uri(storage: StorageConfig, key: str) -> str:
    """Where a Hub checkpoint is copied under the work root (every worker reads it there,
    without a token or a Hub cache of its own)."""
    return join(normalise(storage.work_uri), "checkpoints", "given", f"{key}.pt")


def checkpoint_key(digest: str) -> str:
    """The content key of a checkpoint: the first 20 hex digits of its SHA-256."""
    return digest[:20]


def given_checkpoint_ref(uri: str, model: ModelConfig, storage: StorageConfig) -> CheckpointRef:
    """Resolve, fetch, verify and check a given checkpoint before any tile is embedded.

    ``hf://`` revisions are pinned to their commit; the bytes are hashed (SHA-256) and compared
    with the expected hash where known; the model is built and loaded strictly (official
    files: the preset's architecture; v2 students: their ``args``, which must match the
    preset); a Hub file is copied to :func:`work_copy_uri` for the embedding workers.

    Raises:
        ConfigError: a missing file, no access, a wrong hash, or a file that does not fit
            ``model.preset`` (the message names the mismatch).
    """
    from tessera_model import ModelSpec, is_own_format, model_from_checkpoint, read_checkpoint
    from tessera_model.errors import CheckpointError

    src = CheckpointSource(uri, endpoint=model.hf_endpoint, cache_dir=model.hf_cache_dir)
    if is_hf(uri):
        token = hf_token(model.hf_token_secret)
        pinned = resolve_hf(parse_hf_uri(uri), token, model.hf_endpoint)
        src = CheckpointSource(pinned.uri, token, model.hf_endpoint, model.hf_cache_dir)
    with src.open(storage) as fh:
        digest = sha256_of(fh)
    check_sha256(src.uri, digest, src.expected_sha256(model.checkpoint_sha256))
    key = checkpoint_key(digest)
    with src.open(storage) as fh:
        try:
            obj = read_checkpoint(fh)
            preset = None if is_own_format(obj) else model.preset
            _, spec = model_from_checkpoint(obj, preset=preset)
        except CheckpointError as exc:
            raise ConfigError("model.preset", f"checkpoint {src.uri}: {exc}") from None
    family = ModelSpec.preset(model.preset).family
    if spec.family != family:  # our own format carries its spec: its family must fit
        raise ConfigError(
            "model.preset", f"Expected a {family} checkpoint for preset {model.preset!r}. "
            f"Got a {spec.family} model ({spec.version}) in {src.uri}.",
        )
    if is_hf(src.uri):
        dest = work_copy_uri(storage, key)
        fs, path = get_fs(dest, storage)
        if not fs.exists(path):
            with src.open(storage) as fh:
                write_bytes_atomic(dest, fh.read(), storage)  # one object (<= 175 MB)
    del spec
    return CheckpointRef(uri=src.uri, key=key, preset=model.preset,
                         model_version=f"{model.preset}-{digest[:8]}")


def open_for_embedding(ckpt: CheckpointRef, storage: StorageConfig) -> IO[bytes]:
    """The bytes of a checkpoint that :func:`given_checkpoint_ref` (or training) produced."""
    uri = work_copy_uri(storage, ckpt.key) if is_hf(ckpt.uri) else ckpt.uri
    return CheckpointSource(uri).open(storage)


def identity(uri: str, storage: StorageConfig, model: ModelConfig | None = None) -> dict[str, Any]:
    """What identifies a checkpoint's current bytes without reading them.

    ``hf://``: the repository, file and commit (a HEAD request resolves a branch or tag;
    a commit revision needs none) and the ETag; else the ETag of an object store, or the
    size and modification time (a stat or a HEAD request).
    """
    if is_hf(uri):
        f = parse_hf_uri(uri)
        if re.fullmatch(r"[0-9a-f]{40}", f.revision):
            return {"repo": f.repo_id, "file": f.filename, "commit": f.revision}
        m = model or ModelConfig()
        return hf_identity(f, hf_token(m.hf_token_secret), m.hf_endpoint)
    fs, path = get_fs(uri, storage)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return {"etag": str(etag).strip('"'), "size": info.get("size")}
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return {"size": info.get("size"), "mtime": str(mtime)}
