"""No secret persisted or shown: server-backed S3 builds with distinctive canary credentials.

A real ``prefect server start`` (its own PREFECT_HOME) and ``tessera build`` subprocesses
against it, on S3 (moto on loopback, behind a pass-through proxy that records which access
key id signed each request, in memory). Once with the credentials in the build's
environment (training on, two torchrun processes), once through a Prefect ``Secret`` block
named in ``storage.s3_credentials_block`` (the ``processes`` runner, so worker processes
resolve it). Then every place a secret could land is searched for the canaries (as they are,
URL-quoted, JSON-escaped, UTF-16, inside base64): the server's database (raw bytes of every
file under PREFECT_HOME, and every row of every table), the API's blocks, flow and task runs
(parameters, states, results), artifacts, logs and variables, every object in the bucket,
every file under /tmp written since the test began, and the command's own output.

Prefect encrypts block document data at rest (Fernet; the key lives in the same database's
``configuration`` table), so the Secret block's own value is not in the raw bytes either;
reading it back through the API with ``include_secrets`` is the one place it may appear.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.s3support import FaultProxy, files_newer_than, find_needles, free_port, s3fs_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = [0.105, 52.192, 0.112, 52.196]
BLOCK_NAME = "s3-canary"


def _canary(kind: str, tag: str) -> str:
    return f"{kind}-canary-7f3a-{tag}-{uuid.uuid4().hex}"


ENV_KEY_ID, ENV_SECRET = _canary("KEYID", "env"), _canary("SECRET", "env") + "/+x"
BLOCK_KEY_ID, BLOCK_SECRET = _canary("KEYID", "blk"), _canary("SECRET", "blk") + "/+y"
ALL_CANARIES = (ENV_KEY_ID, ENV_SECRET, BLOCK_KEY_ID, BLOCK_SECRET)


class Server:
    """A Prefect server subprocess and what the test needs to reach it."""

    def __init__(self, api: str, home: Path, started: float) -> None:
        self.api, self.home, self.started = api, home, started


@pytest.fixture(scope="module")
def server(tmp_path_factory, aws_env) -> Iterator[Server]:  # noqa: ANN001
    from deployments.server import ensure_limits, start_server

    started = time.time() - 1
    home = tmp_path_factory.mktemp("secrets-prefect-home")
    port = free_port()
    env_before = dict(os.environ)
    os.environ["PREFECT_HOME"] = str(home)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL"):
        os.environ.pop(k, None)
    try:
        proc = start_server(port=port, timeout=180)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    api = f"http://127.0.0.1:{port}/api"
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):
            ensure_limits(gpu=1, builds=2)
        yield Server(api, home, started)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def proxy(moto_s3: str) -> Iterator[FaultProxy]:
    """A pass-through proxy (no faults) that records the key ids signing requests."""
    with FaultProxy(moto_s3) as px:
        yield px


def _config(bucket: str, endpoint: str, prefix: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "region": {"bbox": REGION, "name": f"secrets-{prefix}"},
        "year": 2023,
        "storage": {"output_uri": f"s3://{bucket}/{prefix}/out",
                    "work_uri": f"s3://{bucket}/{prefix}/work",
                    "s3_endpoint_url": endpoint},
    }
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v}
    return data


def _cli_build(server: Server, data: dict[str, Any], tmp: Path,
               env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """``tessera build -c FILE`` against the server; credentials only in ``env_extra``."""
    cfg_file = tmp / "build.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"PREFECT_API_URL": server.api, "PREFECT_HOME": str(server.home),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
                **env_extra})
    return subprocess.run([sys.executable, "-m", "deployments.cli", "build", "-c", str(cfg_file)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900,
                          cwd=tmp)


@pytest.fixture(scope="module")
def env_build(server, proxy, s3_bucket, tmp_path_factory):  # noqa: ANN001, ANN201
    """Credentials in the environment; training on with two torchrun processes."""
    before = set(proxy.key_ids)
    t0 = time.perf_counter()
    data = _config(s3_bucket, proxy.url, "env",
                   training={"steps": 3, "batch_size": 32, "pixels_per_tile": 256,
                             "processes": 2})
    out = _cli_build(server, data, tmp_path_factory.mktemp("env-build"),
                     {"AWS_ACCESS_KEY_ID": ENV_KEY_ID, "AWS_SECRET_ACCESS_KEY": ENV_SECRET})
    return out, proxy.key_ids - before, time.perf_counter() - t0


@pytest.fixture(scope="module")
def block_build(server, proxy, s3_bucket, moto_s3, tiny_checkpoint, tmp_path_factory):  # noqa: ANN001, ANN201
    """Credentials in a Prefect Secret block; the ``processes`` runner."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        Secret(value=json.dumps({"access_key_id": BLOCK_KEY_ID,
                                 "secret_access_key": BLOCK_SECRET})).save(BLOCK_NAME, overwrite=True)
    ckpt = f"s3://{s3_bucket}/models/tiny.pt"
    s3fs_for(moto_s3).put_file(tiny_checkpoint, ckpt.removeprefix("s3://"))
    before = set(proxy.key_ids)
    t0 = time.perf_counter()
    data = _config(s3_bucket, proxy.url, "block",
                   storage={"s3_credentials_block": f"secret/{BLOCK_NAME}"},
                   training={"enabled": False, "checkpoint_uri": ckpt},
                   runner={"kind": "processes", "max_workers": 2})
    out = _cli_build(server, data, tmp_path_factory.mktemp("block-build"), {})
    return out, proxy.key_ids - before, time.perf_counter() - t0


# ---------------------------------------------------------------------- where to look


def _api_blobs(server: Server) -> Iterator[tuple[str, bytes]]:
    """Everything the API holds: blocks, flow and task runs, artifacts, logs, variables."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def dump(obj: Any) -> bytes:
        return json.dumps(obj.model_dump(mode="json"), default=str).encode()

    with temporary_settings(updates={PREFECT_API_URL: server.api}), \
            get_client(sync_client=True) as client:
        for doc in client.read_block_documents(include_secrets=False):
            yield f"api block {doc.name}", dump(doc)
            if doc.name != BLOCK_NAME:  # every other block, secrets revealed: none may hold one
                full = client.read_block_document(doc.id, include_secrets=True)
                yield f"api block {doc.name} (include_secrets)", dump(full)
        for run in client.read_flow_runs(limit=200):
            yield f"api flow run {run.name}", dump(run)
        for run in client.read_task_runs(limit=200):
            yield f"api task run {run.name}", dump(run)
        for art in client.read_artifacts(limit=200):
            yield f"api artifact {art.key}", dump(art)
        for log in client.read_logs(limit=200):
            yield "api log", dump(log)
        offset = 200
        while batch := client.read_logs(limit=200, offset=offset):
            for log in batch:
                yield "api log", dump(log)
            offset += len(batch)
        for var in client.read_variables():
            yield f"api variable {var.name}", dump(var)


def _db_rows(home: Path) -> Iterator[tuple[str, bytes]]:
    """Every row of every table of the server's sqlite database, as text."""
    db = home / "prefect.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            rows = con.execute(f'SELECT * FROM "{t}"').fetchall()  # noqa: S608 (table names from sqlite)
            yield f"db table {t}", repr(rows).encode()
    finally:
        con.close()


def _bucket_objects(moto_s3: str, bucket: str) -> Iterator[tuple[str, bytes]]:
    fs = s3fs_for(moto_s3)
    for key in fs.find(bucket):
        yield f"s3://{key}", fs.cat_file(key)


def _own_outputs() -> list[str]:
    """This process's stdout/stderr files (a bash job's logs), which pytest itself writes."""
    out = []
    for fd in (1, 2):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def _search(server: Server, moto_s3: str, bucket: str, secrets: tuple[str, ...],
            shown: bytes) -> list[str]:
    blobs: list[tuple[str, bytes]] = [("the command's output", shown)]
    blobs += list(_api_blobs(server))
    blobs += list(_db_rows(server.home))
    blobs += list(files_newer_than(str(server.home), 0))
    blobs += list(_bucket_objects(moto_s3, bucket))
    hits = find_needles(blobs, secrets)
    tmp_hits = find_needles(files_newer_than(tempfile.gettempdir(), server.started,
                                             skip=_own_outputs()), secrets)
    assert any(w == "db table block_document" for w, _ in blobs)
    assert any("/prefect-results/" in w for w, _ in blobs), "no Prefect results on S3 to search"
    return hits + tmp_hits


# ---------------------------------------------------------------------- tests


def test_env_credentials_build_leaves_no_secret(server, env_build, moto_s3, s3_bucket) -> None:  # noqa: ANN001
    out, key_ids, seconds = env_build
    print(f"\nenv-credentials build (training on, torchrun x2): {seconds:.1f} s")
    assert out.returncode == 0, out.stdout.decode(errors="replace")[-4000:]
    assert key_ids == {ENV_KEY_ID}, "the build did not sign its requests with the environment's key"
    hits = _search(server, moto_s3, s3_bucket, (ENV_KEY_ID, ENV_SECRET), out.stdout)
    assert not hits, hits


def test_block_credentials_build_leaves_no_secret(server, block_build, moto_s3, s3_bucket) -> None:  # noqa: ANN001
    out, key_ids, seconds = block_build
    print(f"\nSecret-block build (processes runner): {seconds:.1f} s")
    assert out.returncode == 0, out.stdout.decode(errors="replace")[-4000:]
    assert key_ids == {BLOCK_KEY_ID}, "the build did not sign its requests with the block's key"
    hits = _search(server, moto_s3, s3_bucket, ALL_CANARIES, out.stdout)
    assert not hits, hits


def test_secret_block_is_encrypted_at_rest_and_readable_through_the_api(server, block_build) -> None:  # noqa: ANN001
    """Prefect stores block data Fernet-encrypted (key in the same database): the block's
    value is in no raw byte of PREFECT_HOME, yet the API returns it to a client that asks."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    con = sqlite3.connect(f"file:{server.home / 'prefect.db'}?mode=ro", uri=True)
    try:
        (data,) = con.execute("SELECT data FROM block_document WHERE name = ?", (BLOCK_NAME,)).fetchone()
        keys = con.execute("SELECT key FROM configuration").fetchall()
    finally:
        con.close()
    token = json.loads(data) if isinstance(data, str) and data.startswith('"') else data
    assert isinstance(token, str) and token.startswith("gAAAA")  # a Fernet token, not JSON
    assert BLOCK_SECRET not in token and BLOCK_KEY_ID not in token
    assert ("ENCRYPTION_KEY",) in keys  # the key sits beside the data it protects
    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        value = Secret.load(BLOCK_NAME).get()
    value = json.loads(value) if isinstance(value, str) else value
    assert value["secret_access_key"] == BLOCK_SECRET


def test_the_search_finds_what_is_planted(tmp_path) -> None:  # noqa: ANN001
    """Controls: the search sees a canary as it is, URL-quoted, JSON-escaped or inside base64
    at any alignment, and sees a file just written under the temporary directory."""
    import base64
    from urllib.parse import quote

    planted = _canary("SECRET", "planted") + "/+z"
    for prefix in (b"", b"x", b"xy"):
        blob = b'{"result": "' + base64.b64encode(prefix + planted.encode() + b"tail") + b'"}'
        assert find_needles([("b64", blob)], [planted]) == [f"b64: {planted[:14]}..."]
    assert find_needles([("q", quote(planted, safe="").encode())], [planted])
    assert find_needles([("j", json.dumps({"k": planted}).encode().replace(b"/", b"\\/"))], [planted])
    assert not find_needles([("other", ALL_CANARIES[0].encode())], [planted])
    since = time.time() - 1
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir(), prefix="tessera-canary-") as f:
        f.write(b"..." + planted.encode() + b"...")
        f.flush()
        hits = find_needles(files_newer_than(tempfile.gettempdir(), since, skip=_own_outputs()),
                            [planted])
    assert hits == [f"{f.name}: {planted[:14]}..."]
