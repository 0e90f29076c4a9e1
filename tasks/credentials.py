"""Credentials: one loading path for object storage and Sentinel Hub alike.

Configs never hold a secret. They name where one lives:

- nothing: the environment (S3: botocore's own chain, ``AWS_*`` variables, profile, instance
  role; Sentinel Hub: the two variables ``source.sentinelhub`` names);
- a Prefect block, by name: ``secret/NAME`` (or a bare ``NAME``) for a ``Secret`` block
  holding JSON, or ``aws-credentials/NAME`` for a prefect-aws ``AwsCredentials`` block.

Secrets are resolved at run time, in the process that uses them (a task runner's worker
process, a Dask worker, a torchrun rank), kept in that process's memory only and never
written anywhere: not into flow parameters, task results, Prefect blocks, logs or files.
Blocks are read through the Prefect API (``include_secrets``), so prefect-aws need not be
installed where the factory runs. Values are cached per process for ``CACHE_TTL_S`` seconds
so rotated credentials are picked up.

Every failure raises :class:`~tasks.errors.ConfigError` naming the config field and where
the credentials were looked for, never a value.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from tasks.errors import ConfigError

__all__ = [
    "BLOCK_TYPES",
    "CACHE_TTL_S",
    "S3Credentials",
    "SentinelHubCredentials",
    "block_ref",
    "hf_token",
    "known_secrets",
    "load_block_data",
    "redact_secrets",
    "s3_credentials",
    "sentinelhub_credentials",
]

CACHE_TTL_S = 300.0
"""Seconds a block's values are reused in one process before they are read again."""
BLOCK_TYPES = ("secret", "aws-credentials")
"""Block type slugs a credentials reference may name."""

BlockLoader = Callable[[str, str], dict[str, Any]]
"""``(block_type_slug, name) -> block data`` (secrets revealed)."""


@dataclass(frozen=True)
class S3Credentials:
    """An S3 key pair (and session token); ``repr`` never shows a secret."""

    access_key_id: SecretStr = field(repr=False)
    secret_access_key: SecretStr = field(repr=False)
    session_token: SecretStr | None = field(default=None, repr=False)
    region: str | None = None

    def options(self) -> dict[str, str]:
        """s3fs keyword options (``key``, ``secret``, ``token``)."""
        out = {"key": self.access_key_id.get_secret_value(),
               "secret": self.secret_access_key.get_secret_value()}
        if self.session_token is not None:
            out["token"] = self.session_token.get_secret_value()
        return out


@dataclass(frozen=True)
class SentinelHubCredentials:
    """An OAuth client; ``repr`` and ``str`` never show the secret."""

    client_id: str
    client_secret: SecretStr = field(repr=False)

    def __str__(self) -> str:
        return f"SentinelHubCredentials(client_id={self.client_id[:4]}...)"


def block_ref(ref: str) -> tuple[str, str]:
    """Split ``"aws-credentials/prod"`` into ``("aws-credentials", "prod")``; a bare name is a
    Secret block.

    Raises:
        ValueError: an unknown block type or an empty name.
    """
    slug, sep, name = ref.partition("/")
    if not sep:
        slug, name = "secret", ref
    if slug not in BLOCK_TYPES:
        raise ValueError(f"Expected a block type among {', '.join(BLOCK_TYPES)}. Got {slug!r}.")
    if not name:
        raise ValueError("Expected a block name after the type. Got none.")
    return slug, name


def _prefect_block_data(slug: str, name: str) -> dict[str, Any]:
    """A block document's data with secrets revealed, read through the Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name=name, block_type_slug=slug,
                                                 include_secrets=True)
    data = dict(doc.data or {})
    return {k: (v.get_secret_value() if isinstance(v, SecretStr) else v) for k, v in data.items()}


_cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
_cache_lock = threading.Lock()
_seen: set[str] = set()
"""Secret values this process has resolved (for :func:`redact_secrets`); memory only."""


def load_block_data(ref: str, field_name: str, loader: BlockLoader | None = None) -> dict[str, Any]:
    """The data of the block ``ref`` names (cached per process for ``CACHE_TTL_S``).

    Raises:
        ConfigError: the reference is malformed or the block cannot be read (the error's
            type is named, never a value).
    """
    try:
        slug, name = block_ref(ref)
    except ValueError as exc:
        raise ConfigError(field_name, str(exc)) from None
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get((slug, name))
        if hit is not None and loader is None and now - hit[0] < CACHE_TTL_S:
            return hit[1]
    try:
        data = (loader or _prefect_block_data)(slug, name)
    except Exception as exc:  # never echo the block's content
        raise ConfigError(field_name, f"cannot load Prefect {slug} block {name!r} "
                          f"({type(exc).__name__})") from None
    if loader is None:
        with _cache_lock:
            _cache[(slug, name)] = (now, data)
    return data


def _secret_json(data: dict[str, Any]) -> Any:
    value = data.get("value")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _remember(*values: str | None) -> None:
    for v in values:
        if v and len(v) >= 4:
            _seen.add(v)


def s3_credentials(block: str | None, field_name: str = "storage.s3_credentials_block",
                   loader: BlockLoader | None = None) -> S3Credentials | None:
    """The S3 credentials a config names, or None for botocore's own chain (environment,
    profile, instance role).

    ``secret/NAME`` blocks hold ``{"access_key_id", "secret_access_key"[, "session_token"]}``;
    ``aws-credentials/NAME`` blocks are prefect-aws ``AwsCredentials``.
    """
    if not block:
        return None
    data = load_block_data(block, field_name, loader)
    slug, name = block_ref(block)
    if slug == "aws-credentials":
        kid, sec = data.get("aws_access_key_id"), data.get("aws_secret_access_key")
        tok, region = data.get("aws_session_token"), data.get("region_name")
    else:
        value = _secret_json(data)
        if not isinstance(value, dict):
            value = {}
        kid, sec = value.get("access_key_id"), value.get("secret_access_key")
        tok, region = value.get("session_token"), value.get("region")
    if not kid or not sec:
        what = ("aws_access_key_id and aws_secret_access_key" if slug == "aws-credentials"
                else 'JSON {"access_key_id": ..., "secret_access_key": ...}')
        raise ConfigError(field_name, f"expected {slug} block {name!r} to hold {what}. "
                          "Got another value")
    _remember(str(kid), str(sec), str(tok) if tok else None)
    return S3Credentials(SecretStr(str(kid)), SecretStr(str(sec)),
                         SecretStr(str(tok)) if tok else None, str(region) if region else None)


def sentinelhub_credentials(
    secret_block: str | None,
    client_id_env: str,
    client_secret_env: str,
    environ: Mapping[str, str] | None = None,
    loader: BlockLoader | None = None,
    field_name: str = "source.sentinelhub",
) -> SentinelHubCredentials:
    """A Sentinel Hub OAuth client: from the block named (``{"client_id", "client_secret"}``
    JSON in a Secret block), else from the two environment variables named."""
    if secret_block:
        fld = f"{field_name}.secret_block"
        value = _secret_json(load_block_data(secret_block, fld, loader))
        if not (isinstance(value, dict) and value.get("client_id") and value.get("client_secret")):
            raise ConfigError(fld, f"expected block {secret_block!r} to hold "
                              '{"client_id": ..., "client_secret": ...}. Got another value')
        _remember(str(value["client_secret"]))
        return SentinelHubCredentials(str(value["client_id"]), SecretStr(str(value["client_secret"])))
    env = os.environ if environ is None else environ
    cid, secret = env.get(client_id_env), env.get(client_secret_env)
    if not cid or not secret:
        missing = [n for n, v in ((client_id_env, cid), (client_secret_env, secret)) if not v]
        raise ConfigError(
            field_name,
            f"expected Sentinel Hub credentials in environment variable(s) {', '.join(missing)} "
            "(or set secret_block to a Prefect Secret block). Got none",
        )
    _remember(secret)
    return SentinelHubCredentials(cid, SecretStr(secret))


HF_TOKEN_ENV = "HF_TOKEN"
"""Environment variable of a Hugging Face Hub token (huggingface_hub's own name for it)."""


def hf_token(
    secret_block: str | None,
    environ: Mapping[str, str] | None = None,
    loader: BlockLoader | None = None,
    field_name: str = "model.hf_token_secret",
) -> str | None:
    """A Hugging Face Hub token: from the Secret block named (the token as a string, or
    ``{"token": ...}``), else ``HF_TOKEN`` from the environment, else None (public files)."""
    if secret_block:
        value = _secret_json(load_block_data(secret_block, field_name, loader))
        if value is None:
            value = load_block_data(secret_block, field_name, loader).get("value")
        token = value.get("token") if isinstance(value, dict) else value
        if not isinstance(token, str) or not token:
            raise ConfigError(field_name, f"expected block {secret_block!r} to hold a Hub token "
                              '(a string or {"token": ...}). Got another value')
        _remember(token)
        return token
    env = os.environ if environ is None else environ
    token = env.get(HF_TOKEN_ENV) or None
    _remember(token)
    return token


def known_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Secret values this process knows: resolved ones and the AWS ones in the environment."""
    env = os.environ if environ is None else environ
    out = set(_seen)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", HF_TOKEN_ENV):
        v = env.get(name)
        if v and len(v) >= 4:
            out.add(v)
    return out


def redact_secrets(text: str) -> str:
    """``text`` with every secret this process knows replaced by ``***``."""
    for s in sorted(known_secrets(), key=len, reverse=True):
        text = text.replace(s, "***")
    return text
