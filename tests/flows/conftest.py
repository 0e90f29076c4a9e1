"""Fixtures for builds on object storage: a moto S3 server in a subprocess (it outlives a
killed build), fake AWS credentials in the environment, a bucket per module."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.s3support import MotoServer, s3fs_for

FAKE_KEY_ID = "AKIA-FLOWTEST-KEYID-5b1e"
FAKE_SECRET = "fake-flowtest-secret/9d4c+never-shown"


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    """AWS credentials (fake, distinctive) in this process's environment, read by botocore's
    own chain here and in every child process; restored afterwards."""
    values = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
              "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*values, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(values)
    yield values
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def moto_s3(aws_env) -> Iterator[str]:
    """The endpoint URL of a moto S3 server running as a subprocess on loopback."""
    pytest.importorskip("moto.server")
    server = MotoServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_bucket(moto_s3) -> str:
    """A fresh bucket for one test module."""
    name = f"tessera-{uuid.uuid4().hex[:10]}"
    s3fs_for(moto_s3).mkdir(name)
    return name
