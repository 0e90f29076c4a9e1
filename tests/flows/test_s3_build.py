"""Whole builds on object storage, as an operator runs them.

Work root, output store and checkpoint all live on ``s3://`` in a moto S3 server that runs as
a subprocess on loopback (it outlives a killed build); credentials come from botocore's own
chain (fake ``AWS_*`` variables). Builds run under the session's Prefect harness, or as
``tessera build`` subprocesses against it for kill -9 and resume. One fault-free build from
a given checkpoint is the reference the other builds must match byte for byte: the
``processes`` runner, a build killed and resumed, and a build through a proxy that throttles
(503 SlowDown) and drops connections.

Builds are module-scoped and shared between tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from tests.s3support import FaultProxy, s3fs_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = [0.105, 52.192, 0.112, 52.196]  # inside one 256-px tile of zone 31
YEAR = 2023
GROUP = "utm31"


# ---------------------------------------------------------------------- helpers


def _config(bucket: str, endpoint: str, prefix: str, *, checkpoint: str | None,
            name: str = "s3", **extra: Any) -> dict[str, Any]:
    training: dict[str, Any] = (
        {"enabled": False, "checkpoint_uri": checkpoint} if checkpoint else
        {"steps": 3, "batch_size": 32, "pixels_per_tile": 256}
    )
    return {
        "region": {"bbox": REGION, "name": name},
        "year": YEAR,
        "storage": {"output_uri": f"s3://{bucket}/{prefix}/out",
                    "work_uri": f"s3://{bucket}/{prefix}/work",
                    "s3_endpoint_url": endpoint},
        "training": training,
        **extra,
    }


def _build(data: dict[str, Any]):  # noqa: ANN202
    """Run the build flow in this process; return (config, result, seconds)."""
    from flows.build import build_region
    from tasks.config import build_config

    cfg = build_config(None, data)
    t0 = time.perf_counter()
    state = build_region(config=cfg, return_state=True)
    seconds = time.perf_counter() - t0
    assert state.is_completed(), state.message
    return cfg, state.result(), seconds


def _opts(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "skip_instance_cache": True}


def _zone(out_uri: str, endpoint: str) -> zarr.Group:
    root = zarr.open_group(f"{out_uri}/{YEAR}.zarr", mode="r", storage_options=_opts(endpoint))
    return root[GROUP]


def _arrays(out_uri: str, endpoint: str) -> dict[str, np.ndarray]:
    """Every array of the zone group, decoded."""
    g = _zone(out_uri, endpoint)
    return {name: a[...] for name, a in g.arrays()}


def _chunk_objects(out_uri: str, endpoint: str) -> dict[str, bytes]:
    """Raw bytes of every chunk object of every array of the zone group (path -> bytes)."""
    fs = s3fs_for(endpoint)
    base = f"{out_uri.removeprefix('s3://')}/{YEAR}.zarr/{GROUP}"
    keys = [k for k in fs.find(base) if "/c/" in k[len(base):]]
    assert keys, f"no chunk objects under {base}"
    return {k[len(base):]: fs.cat_file(k) for k in keys}


def _assert_same_bytes(out_a: str, out_b: str, endpoint: str) -> None:
    a, b = _arrays(out_a, endpoint), _arrays(out_b, endpoint)
    assert sorted(a) == sorted(b)
    assert {"embeddings", "scales"} <= set(a)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    ca, cb = _chunk_objects(out_a, endpoint), _chunk_objects(out_b, endpoint)
    assert sorted(ca) == sorted(cb)
    differ = [k for k in ca if ca[k] != cb[k]]
    assert not differ, f"chunk objects differ: {differ[:5]}"


def _float_embeddings(work_uri: str, endpoint: str) -> np.ndarray:
    """The single tile's float32 embeddings in the work root."""
    fs = s3fs_for(endpoint)
    groups = [p for p in fs.glob(f"{work_uri.removeprefix('s3://')}/embeddings/*/*.zarr")]
    assert len(groups) == 1, groups
    g = zarr.open_group(f"s3://{groups[0]}", mode="r", storage_options=_opts(endpoint))
    return g["embedding"][:]


def _check_published(cfg, result, endpoint: str) -> None:  # noqa: ANN001
    """The published store opens with xarray over s3fs, with its CRS, and the dequantised
    vectors match the float embeddings in the work root within the int8 bound."""
    import rioxarray  # noqa: F401  (registers .rio)

    assert result.store_uri == f"{cfg.storage.output_uri}/{YEAR}.zarr"
    assert result.groups == [GROUP]
    ds = xr.open_zarr(result.store_uri, group=GROUP, consolidated=False,
                      storage_options=_opts(endpoint))
    assert ds["embeddings"].dtype == np.int8 and ds["embeddings"].shape[-1] == 128
    assert ds["scales"].dtype == np.float32
    assert ds.rio.crs.to_epsg() == 32631
    f = _float_embeddings(cfg.storage.work_uri, endpoint)
    q = ds["embeddings"].values.astype(np.float32)
    s = ds["scales"].values
    assert q.shape == f.shape
    valid = np.isfinite(f).all(-1)
    assert valid.sum() == result.n_valid_pixels > 1000
    assert np.array_equal(np.isfinite(s), valid)
    deq = q * s[..., None]
    bound = np.abs(np.where(valid[..., None], f, 0)).max(-1) / 127 / 2 + 1e-6
    assert (np.abs(deq - f)[valid] <= bound[valid][:, None]).all()
    assert np.isnan(deq[~valid]).all()


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    """Seconds per build, printed at the end of the module (pytest -s shows them)."""
    out: dict[str, float] = {}
    yield out
    print("\nS3 build timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))


@pytest.fixture(scope="module")
def s3_checkpoint(s3_bucket: str, moto_s3: str, tiny_checkpoint: str) -> str:
    """The tiny checkpoint, uploaded to S3."""
    uri = f"s3://{s3_bucket}/models/tiny.pt"
    s3fs_for(moto_s3).put_file(tiny_checkpoint, uri.removeprefix("s3://"))
    return uri


@pytest.fixture(scope="module")
def reference(prefect_harness, s3_bucket, moto_s3, s3_checkpoint, timings):  # noqa: ANN001, ANN201
    """(b) A fault-free build from the given S3 checkpoint, threads runner."""
    cfg, result, seconds = _build(_config(s3_bucket, moto_s3, "ref", checkpoint=s3_checkpoint,
                                          name="s3-ref"))
    timings["given checkpoint"] = seconds
    return cfg, result


# ---------------------------------------------------------------------- the proxy on its own


def test_fault_proxy_passes_s3_traffic_through(moto_s3: str, s3_bucket: str) -> None:
    """Content-Length, ranges, HEAD, PUT bodies, multipart uploads and chunked bodies pass
    unchanged; with faults on, botocore's retries (and s3fs's) still give the same bytes."""
    import http.client

    rng = np.random.default_rng(0)
    big = rng.bytes(11 << 20)  # three parts of a 5 MiB multipart upload
    base = f"{s3_bucket}/proxy-self-test"
    with FaultProxy(moto_s3) as px:
        fs = s3fs_for(px.url)
        with fs.open(f"{base}/big.bin", "wb", block_size=5 << 20) as f:
            f.write(big)
        fs.pipe_file(f"{base}/small.txt", b"hello")
        assert fs.info(f"{base}/big.bin")["size"] == len(big)  # HEAD's Content-Length
        assert fs.cat_file(f"{base}/big.bin") == big
        assert fs.cat_file(f"{base}/big.bin", start=1000, end=70_000) == big[1000:70_000]
        assert sorted(fs.ls(base)) == [f"{base}/big.bin", f"{base}/small.txt"]
        conn = http.client.HTTPConnection("127.0.0.1", int(px.url.rsplit(":", 1)[1]), timeout=30)
        conn.request("PUT", f"/{base}/chunked.txt", body=iter([b"abc", b"", b"defg"]),
                     encode_chunked=True)
        assert conn.getresponse().status == 200
        conn.close()
        stats = px.stats
        assert stats["method_POST"] >= 2 and stats["range_request"] >= 1
        assert stats["chunked_request"] == 1 and stats["method_HEAD"] >= 1
    direct = s3fs_for(moto_s3)
    assert direct.cat_file(f"{base}/chunked.txt") == b"abcdefg"
    assert direct.cat_file(f"{base}/big.bin") == big

    with FaultProxy(moto_s3, slowdown=0.1, drop=0.05, midbody=0.05, seed=3) as px:
        fs = s3fs_for(px.url, config_kwargs={"retries": {"max_attempts": 8, "mode": "standard"}})
        for i in range(25):
            fs.pipe_file(f"{base}/f{i}", big[: 10_000 + i])
        for i in range(25):
            assert fs.cat_file(f"{base}/f{i}") == big[: 10_000 + i]
        with fs.open(f"{base}/big2.bin", "wb", block_size=5 << 20) as f:
            f.write(big)
        assert direct.cat_file(f"{base}/big2.bin") == big
        stats = px.stats
    assert stats["slowdown"] > 0 and stats["drop"] + stats["reset"] > 0 and stats["midbody"] > 0


# ---------------------------------------------------------------------- builds


def test_build_with_training_on_s3(prefect_harness, s3_bucket, moto_s3, timings) -> None:  # noqa: ANN001
    """(a) Training on: scenes, d-pixels, training set, checkpoint, embeddings, results and
    the store all on S3."""
    cfg, result, seconds = _build(_config(s3_bucket, moto_s3, "trained", checkpoint=None,
                                          name="s3-trained"))
    timings["training on"] = seconds
    _check_published(cfg, result, moto_s3)
    fs = s3fs_for(moto_s3)
    work = cfg.storage.work_uri.removeprefix("s3://")
    assert [p for p in fs.find(f"{work}/checkpoints") if p.endswith(".pt")], "no checkpoint on S3"
    results = fs.find(f"{work}/prefect-results")
    assert results, "no Prefect results on S3"
    for key in results:  # JSON records, no pickle anywhere
        body = fs.cat_file(key)
        assert isinstance(json.loads(body), dict) and b"pickle" not in body, key
    assert not Path("tessera-work").exists() and not Path("tessera-out").exists()


def test_build_from_s3_checkpoint(reference, moto_s3) -> None:  # noqa: ANN001
    """(b) Training off, the checkpoint read from S3."""
    cfg, result = reference
    _check_published(cfg, result, moto_s3)
    assert cfg.training.checkpoint_uri.startswith("s3://") and not cfg.training.enabled


def test_processes_runner_on_s3(prefect_harness, reference, s3_bucket, moto_s3, s3_checkpoint,
                                timings) -> None:  # noqa: ANN001
    """(c) The ``processes`` runner: each worker process resolves its own credentials and
    reads and writes S3; the same bytes as the threads runner."""
    data = _config(s3_bucket, moto_s3, "procs", checkpoint=s3_checkpoint, name="s3-procs",
                   runner={"kind": "processes", "max_workers": 2})
    cfg, result, seconds = _build(data)
    timings["processes runner"] = seconds
    _check_published(cfg, result, moto_s3)
    _assert_same_bytes(cfg.storage.output_uri, reference[0].storage.output_uri, moto_s3)


def _s3_markers(fs, work: str) -> dict[str, str]:  # noqa: ANN001
    """Commit markers under the work root: key -> ETag (a rewrite would change LastModified)."""
    fs.invalidate_cache()
    out = {}
    for p, info in fs.find(work, detail=True).items():
        if p.endswith(".done.json"):
            out[p] = f"{info.get('ETag')}|{info.get('LastModified')}"
    return out


def test_kill_9_and_resume_on_s3(prefect_harness, reference, s3_bucket, moto_s3, s3_checkpoint,
                                 tmp_path, timings) -> None:  # noqa: ANN001
    """(d) ``tessera build`` killed with SIGKILL mid-way, then run again to completion: the
    stages committed before the kill are not redone, and the published arrays are the
    reference's, byte for byte."""
    from prefect.settings import PREFECT_API_URL

    # A writer killed while holding a zone group's lease does not block the resume: its
    # lease names a process of this host that is gone, so it is removed at once (the default
    # 300 s TTL applies only to writers on other hosts).
    data = _config(s3_bucket, moto_s3, "killed", checkpoint=s3_checkpoint, name="s3-killed")
    cfg_file = tmp_path / "build.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    cmd = [sys.executable, "-m", "deployments.cli", "build", "-c", str(cfg_file)]
    fs = s3fs_for(moto_s3)
    work = data["storage"]["work_uri"].removeprefix("s3://")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    seen: list[str] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"the build ended (rc {proc.returncode}) before it could be killed: "
            f"{proc.stderr.read().decode(errors='replace')[-3000:]}")
        fs.invalidate_cache()
        try:
            seen = [p for p in fs.find(work) if "/dpixels/" in p and p.endswith(".done.json")
                    or "/embeddings/" in p]
        except FileNotFoundError:
            seen = []
        if seen:
            break
        time.sleep(0.2)
    assert seen, "no d-pixels committed within 300 s"
    timings["killed build, start to kill -9 (CLI)"] = time.perf_counter() - t0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _s3_markers(fs, work)
    out = data["storage"]["output_uri"].removeprefix("s3://")
    locks = [p for p in fs.find(f"{out}/{YEAR}.zarr/.tessera/locks")] if fs.exists(out) else []
    print(f"\nkilled after {seen[:3]}; leases left behind: {locks}")
    assert any("/dpixels/" in k for k in before)
    assert not any("/embeddings/" in k for k in before) or not fs.exists(
        f"{data['storage']['output_uri'].removeprefix('s3://')}/{YEAR}.zarr/{GROUP}/scales"), \
        "the build had finished publishing before the kill"

    t1 = time.perf_counter()
    again = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=600)
    assert again.returncode == 0, again.stdout.decode(errors="replace")[-3000:]
    timings["resumed build (CLI)"] = time.perf_counter() - t1
    after = _s3_markers(fs, work)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"stages committed before the kill were redone: {changed}"
    _assert_same_bytes(data["storage"]["output_uri"], reference[0].storage.output_uri, moto_s3)


def test_throttling_and_dropped_connections_give_same_bytes(
    prefect_harness, reference, s3_bucket, moto_s3, s3_checkpoint, timings  # noqa: ANN001
) -> None:
    """(e) Through a proxy that answers 503 SlowDown to 5 % of requests, drops the
    connection of 3 % and cuts 2 % of GET bodies in the middle: the reference's bytes."""
    with FaultProxy(moto_s3, slowdown=0.05, drop=0.03, midbody=0.02, seed=20231) as px:
        data = _config(s3_bucket, px.url, "faulty", checkpoint=s3_checkpoint, name="s3-faulty")
        cfg, result, seconds = _build(data)
        stats = px.stats
    timings["through faults"] = seconds
    print(f"\nfault proxy: {dict(stats)}")
    assert stats["slowdown"] > 0 and stats["drop"] + stats["reset"] > 0 and stats["midbody"] > 0
    assert result.n_valid_pixels == reference[1].n_valid_pixels
    _assert_same_bytes(cfg.storage.output_uri, reference[0].storage.output_uri, moto_s3)
