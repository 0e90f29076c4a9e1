"""Publishing to S3 through s3fs against moto in server mode on loopback (started here)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

from tasks.config import StorageConfig
from tasks.errors import StorageError
from tasks.publish import open_zone, prepare_zone_stores, publish_tile, read_tile_record
from tasks.reader import open_region, pixel_vector
from tasks.storage import is_transient, redact, storage_options, with_retries, zarr_store
from tests.tasks.test_publish import CFG, MODEL, T_A, YEAR, _embedding, _write_emb

pytestmark = pytest.mark.integration

KEY, SECRET = "AKIAFAKETESTKEY0001", "fake/secret+Value=Never-Logged-123"
BUCKET = "tessera-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # credentials from the environment: botocore's chain reads them, our code never does
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = KEY, SECRET
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, anon=False).mkdir(BUCKET)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_publish_to_s3_and_read_back_within_quantisation_bound(
    s3_endpoint: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tasks")
    storage = StorageConfig(
        output_uri=f"s3://{BUCKET}/out",
        work_uri=str(tmp_path / "work"),
        s3_endpoint_url=s3_endpoint,
    )
    e = _embedding(T_A, 11)
    assert prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL) == ["utm31"]
    ref = publish_tile(_write_emb(tmp_path, T_A, e), YEAR, CFG, storage, MODEL)
    assert not ref.skipped and ref.store_uri.startswith("s3://")
    assert publish_tile(_write_emb(tmp_path, T_A, e, "again"), YEAR, CFG, storage, MODEL).skipped
    rec = read_tile_record(storage.output_uri, YEAR, T_A, storage)
    assert rec is not None and rec["n_valid"] == int(np.isfinite(e).all(-1).sum())

    valid = np.isfinite(e).all(-1)
    bound = np.abs(np.where(valid[..., None], e, 0)).max(-1) / 127 / 2 + 1e-6
    # through xarray (zarr over s3fs), CRS from spatial_ref
    store = zarr_store(f"{storage.output_uri}/{YEAR}.zarr", storage, read_only=True)
    ds = xr.open_zarr(store, group="utm31", consolidated=False)
    assert ds.rio.crs.to_epsg() == 32631 and ds.attrs["tessera:n_tiles"] == 1
    deq = ds["embeddings"].values.astype(np.float32) * ds["scales"].values[..., None]
    assert (np.abs(deq - e)[valid] <= bound[valid][:, None]).all()
    assert np.isnan(deq[~valid]).all()
    assert open_zone(storage.output_uri, YEAR, "utm31", storage).sizes["easting"] == 256
    # through the reader
    from pyproj import Transformer

    to_ll = Transformer.from_crs(32631, 4326, always_xy=True)
    w, s = to_ll.transform(T_A.x0 + 1, T_A.y1 + 1)
    east, n = to_ll.transform(T_A.x1 - 1, T_A.y0 - 1)
    da = open_region(storage.output_uri, YEAR, (w, s, east, n), storage)
    assert da.rio.crs.to_epsg() == 32631 and da.shape[2] == 128
    r0 = round((T_A.y0 - float(da.y[0]) - 5) / 10)
    c0 = round((float(da.x[0]) - 5 - T_A.x0) / 10)
    h, wd = da.shape[:2]
    sub, sub_valid = e[r0 : r0 + h, c0 : c0 + wd], valid[r0 : r0 + h, c0 : c0 + wd]
    diff = np.abs(da.values - sub)[sub_valid]
    assert (diff <= bound[r0 : r0 + h, c0 : c0 + wd][sub_valid][:, None]).all()
    r, c = np.argwhere(valid)[0]
    v = pixel_vector(
        storage.output_uri,
        YEAR,
        *to_ll.transform(T_A.x0 + 10 * c + 5, T_A.y0 - 10 * r - 5),
        storage,
    )
    assert (np.abs(v - e[r, c]) <= bound[r, c]).all()
    # the quicklook on S3, and a presigned URL for the flow's image artifact
    from urllib.request import urlopen

    from tasks.preview import make_preview, preview_url

    pv = make_preview(storage.output_uri, YEAR, "utm31", storage, max_side=128)
    url = preview_url(pv.png_uri, storage, expires_s=600)
    assert url.startswith(s3_endpoint) and SECRET not in url
    with urlopen(url, timeout=10) as resp:  # noqa: S310  (loopback test server)
        assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "werkzeug")
    assert SECRET not in ours and KEY not in ours  # (moto's own access log is not ours)


def test_s3_zone_grows_west_north_by_server_side_shard_moves(s3_endpoint: str, tmp_path) -> None:
    from tasks.grid import Tile
    from tasks.publish import ZoneExtent

    storage = StorageConfig(
        output_uri=f"s3://{BUCKET}/grow",
        work_uri=str(tmp_path / "work"),
        s3_endpoint_url=s3_endpoint,
    )
    e = _embedding(T_A, 5)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, e), YEAR, CFG, storage, MODEL)
    t_nw = Tile(zone=31, south=False, x0=T_A.x0 - 2560, y0=T_A.y0 + 2560, size_px=256)
    prepare_zone_stores([t_nw], YEAR, CFG, storage, MODEL)
    ds = open_zone(storage.output_uri, YEAR, "utm31", storage)
    ext = ZoneExtent.from_attrs(ds.attrs)
    assert (ext.x0, ext.y0, ext.width, ext.height) == (t_nw.x0, t_nw.y0, 512, 512)
    assert ds.rio.transform()[2] == t_nw.x0 and ds.sizes["easting"] == 512
    sub = ds.isel(northing=slice(256, 512), easting=slice(256, 512))
    deq = sub["embeddings"].values.astype(np.float32) * sub["scales"].values[..., None]
    valid = np.isfinite(e).all(-1)
    bound = np.abs(np.where(valid[..., None], e, 0)).max(-1) / 127 / 2 + 1e-6
    assert (np.abs(deq - e)[valid] <= bound[valid][:, None]).all()
    assert np.isnan(ds["scales"].values[:256]).all()
    rec = read_tile_record(storage.output_uri, YEAR, T_A, storage)
    assert rec is not None and (rec["row_offset"], rec["col_offset"]) == (256, 256)


BLOCK_KEY, BLOCK_SECRET = "AKIABLOCKTESTKEY0002", "block/secret+Value=Never-Shown-456"


def test_secrets_from_a_block_are_used_and_never_shown(
    s3_endpoint: str, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Credentials named by ``storage.s3_credentials_block`` are resolved at run time, sign the
    requests (the proxy sees their key id, not the environment's), and appear in no config,
    repr, error or log."""
    import tasks.credentials as credentials
    from tests.s3support import FaultProxy

    loads: list[tuple[str, str]] = []

    def block_data(slug: str, name: str) -> dict[str, str]:
        loads.append((slug, name))
        return {"value": json.dumps({"access_key_id": BLOCK_KEY, "secret_access_key": BLOCK_SECRET})}

    monkeypatch.setattr(credentials, "_prefect_block_data", block_data)
    monkeypatch.setattr(credentials, "_cache", {})
    caplog.set_level(logging.DEBUG, logger="tasks")
    with FaultProxy(s3_endpoint) as proxy:
        storage = StorageConfig(output_uri=f"s3://{BUCKET}/from-block", work_uri=str(tmp_path / "work"),
                                s3_endpoint_url=proxy.url, s3_credentials_block="secret/s3-test")
        shown = repr(storage) + storage.model_dump_json() + str(storage)
        assert BLOCK_SECRET not in shown and BLOCK_KEY not in shown
        opts = storage_options(storage.output_uri, storage)
        assert (opts["key"], opts["secret"]) == (BLOCK_KEY, BLOCK_SECRET)
        assert opts["config_kwargs"]["retries"]["mode"] == "standard"
        assert loads == [("secret", "s3-test")]
        assert prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL) == ["utm31"]
        assert loads == [("secret", "s3-test")]  # cached in this process, not re-read
        assert proxy.key_ids == {BLOCK_KEY}  # every request signed with the block's key

        bad = storage.model_copy(update={"output_uri": "s3://no-such-bucket/out"})
        with pytest.raises(Exception) as err:
            prepare_zone_stores([T_A], YEAR, CFG, bad, MODEL)
    text = f"{err.value!r} {err.value} {err.getrepr()}"
    assert BLOCK_SECRET not in text and BLOCK_KEY not in text
    assert redact(f"boom {BLOCK_SECRET} and {BLOCK_KEY}", storage) == "boom *** and ***"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "werkzeug")
    assert BLOCK_SECRET not in ours and BLOCK_KEY not in ours


def test_a_block_that_cannot_be_read_names_the_field_not_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.credentials as credentials
    from tasks.errors import ConfigError

    def broken(slug: str, name: str) -> dict[str, str]:
        raise RuntimeError(f"server said: {BLOCK_SECRET}")

    monkeypatch.setattr(credentials, "_prefect_block_data", broken)
    monkeypatch.setattr(credentials, "_cache", {})
    storage = StorageConfig(output_uri="s3://some-bucket/out", s3_credentials_block="secret/missing")
    with pytest.raises(ConfigError, match="s3_credentials_block") as err:
        storage_options(storage.output_uri, storage)
    assert BLOCK_SECRET not in str(err.value)

    monkeypatch.setattr(credentials, "_prefect_block_data",
                        lambda slug, name: {"value": json.dumps({"access_key_id": BLOCK_KEY})})
    with pytest.raises(ConfigError, match="secret_access_key") as err:
        storage_options(storage.output_uri, storage)
    assert BLOCK_KEY not in str(err.value)


def _client_error(code: str, status: int, op: str = "PutObject") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def test_transient_errors_are_retried_and_others_are_not() -> None:
    """Judged from botocore's error codes and exception types, never from message text."""
    import errno

    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "ok"

    assert with_retries(flaky, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [0.5, 2.0]

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("NoSuchKey")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, sleep=sleeps.append)
    assert len(calls) == 1

    def always_throttled() -> None:
        calls.append(1)
        raise _client_error("SlowDown", 503)

    calls.clear()
    sleeps.clear()
    with pytest.raises(Exception, match="SlowDown"):
        with_retries(always_throttled, sleep=sleeps.append)
    assert len(calls) == 4 and sleeps == [0.5, 2.0, 8.0]

    # transient: throttling and 5xx codes, a bare 503 status, dropped connections, timeouts
    assert is_transient(_client_error("SlowDown", 503))
    assert is_transient(_client_error("InternalError", 500))
    assert is_transient(_client_error("", 503))
    assert is_transient(ConnectionResetError())
    assert is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"))
    try:  # s3fs wraps botocore's error in an OSError: the cause chain is followed
        try:
            raise _client_error("SlowDown", 503)
        except Exception as inner:
            raise OSError(errno.EIO, "Please reduce your request rate.") from inner
    except OSError as wrapped:
        assert is_transient(wrapped)

    # not transient: missing, forbidden, bad requests, our own data errors
    assert not is_transient(_client_error("NoSuchKey", 404, "GetObject"))
    assert not is_transient(_client_error("AccessDenied", 403))
    assert not is_transient(_client_error("InvalidBucketName", 400, "CreateBucket"))
    assert not is_transient(StorageError("Expected a zone group. Got none."))
    # a message's text never decides: "500" inside a tile id, "503" in prose
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device: "
                                    "embeddings/31N-E0500000-N5005000-256.zarr"))
    assert not is_transient(StorageError("tile 31N-E0302080-N5005000-256: HTTP 500 in the id"))
    assert not is_transient(OSError("503 Service Unavailable"))
    try:  # a wrapped permanent error stays permanent
        try:
            raise _client_error("AccessDenied", 403)
        except Exception as inner:
            raise OSError(errno.EACCES, "denied: tile 31N-E0500000-N5005000-256") from inner
    except OSError as wrapped:
        assert not is_transient(wrapped)
