"""Given checkpoints from a local path and the Hugging Face Hub (a local Hub-like endpoint)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.checkpoints import (
    OFFICIAL_SHA256,
    identity,
    open_for_embedding,
    parse_hf_uri,
    work_copy_uri,
)
from tasks.config import ModelConfig, StorageConfig
from tasks.credentials import hf_token
from tasks.errors import ConfigError
from tasks.train import given_checkpoint
from tessera_model import ModelSpec, TesseraModel

from .hf_endpoint import FakeHub, HubRepo

COMMIT = "41db8ee5ddfcf6867f965526c2097d70c3c55c31"
ROOT = Path(__file__).resolve().parents[2]


def student_bytes(preset: str = "v2-nano", seed: int = 0) -> bytes:
    """An official-format v2 student file (``model`` + ``args``) with random weights."""
    spec = ModelSpec.preset(preset)
    torch.manual_seed(seed)
    model = TesseraModel(spec, with_projector=False)
    args = {"repr_dim": 128, "latent_dim": spec.d_model // 4, "num_layers": spec.n_layers,
            "nhead": spec.n_heads, "dim_feedforward": spec.ffn_dim, "max_seq_len": 256,
            "enable_qk_norm": False, "matryoshka_dims": "16,32,64,128"}  # fmt: skip
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "args": args}, buf)
    return buf.getvalue()


NANO = student_bytes()
NANO_SHA = hashlib.sha256(NANO).hexdigest()


@pytest.fixture(scope="module")
def hub():
    repos = {
        "me/students": HubRepo({"ckpt/student_nano.pt": NANO}, commit=COMMIT),
        "geotessera/TESSERA-V-2.0-2B-N": HubRepo({"ckpt/student_nano.pt": NANO}, commit=COMMIT),
        "me/private": HubRepo({"ckpt/student_nano.pt": NANO}, commit=COMMIT, token="hf_test_tok"),
    }
    server = FakeHub(repos=repos).start()
    yield server
    server.stop()


@pytest.fixture
def storage(tmp_path):
    return StorageConfig(output_uri=str(tmp_path / "out"), work_uri=str(tmp_path / "work"))


def cfg(hub: FakeHub, tmp_path: Path, **kw: object) -> ModelConfig:
    return ModelConfig(preset="v2-nano", hf_endpoint=hub.url,
                       hf_cache_dir=str(tmp_path / "hf-cache"), **kw)  # fmt: skip


def test_parse_hf_uri():
    f = parse_hf_uri("hf://geotessera/TESSERA-V-2.0-2B-M/ckpt/student_medium.pt@abc")
    assert (f.repo_id, f.filename, f.revision) == (
        "geotessera/TESSERA-V-2.0-2B-M", "ckpt/student_medium.pt", "abc")
    assert parse_hf_uri("hf://a/b/c.pt").revision == "main"
    with pytest.raises(ConfigError, match="training.checkpoint_uri.*hf://OWNER/REPO"):
        parse_hf_uri("hf://only-repo")


def test_hub_file_is_pinned_verified_copied_and_cached(hub, tmp_path, storage, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    m = cfg(hub, tmp_path, checkpoint_sha256=NANO_SHA)
    ref = given_checkpoint("hf://me/students/ckpt/student_nano.pt@main", m, storage)
    assert ref.uri == f"hf://me/students/ckpt/student_nano.pt@{COMMIT}"
    assert ref.key == NANO_SHA[:20] and ref.model_version == f"v2-nano-{NANO_SHA[:8]}"
    assert Path(work_copy_uri(storage, ref.key)).read_bytes() == NANO
    with open_for_embedding(ref, storage) as fh:
        assert fh.read() == NANO
    gets = hub.requests["GET"]
    again = given_checkpoint(ref.uri, m, storage)  # pinned: served from the Hub cache
    assert again == ref and hub.requests["GET"] == gets
    # identity: a branch costs one HEAD and names the commit; a commit needs no request
    heads = hub.requests["HEAD"]
    ident = identity("hf://me/students/ckpt/student_nano.pt@main", storage, m)
    assert ident["commit"] == COMMIT and hub.requests["HEAD"] == heads + 1
    assert identity(ref.uri, storage, m) == {"repo": "me/students",
                                            "file": "ckpt/student_nano.pt", "commit": COMMIT}


def test_wrong_hash_missing_file_and_wrong_size_fail_before_any_tile(hub, tmp_path, storage):
    with pytest.raises(ConfigError, match=f"Expected SHA-256 {'0' * 64}.*Got {NANO_SHA}"):
        given_checkpoint("hf://me/students/ckpt/student_nano.pt",
                         cfg(hub, tmp_path, checkpoint_sha256="0" * 64), storage)
    official = OFFICIAL_SHA256[("geotessera/TESSERA-V-2.0-2B-N", "ckpt/student_nano.pt")]
    with pytest.raises(ConfigError, match=f"Expected SHA-256 {official}"):  # known, not given
        given_checkpoint("hf://geotessera/TESSERA-V-2.0-2B-N/ckpt/student_nano.pt",
                         cfg(hub, tmp_path), storage)
    with pytest.raises(ConfigError, match="no file 'ckpt/student_tiny.pt'"):
        given_checkpoint("hf://me/students/ckpt/student_tiny.pt", cfg(hub, tmp_path), storage)
    with pytest.raises(ConfigError, match="no revision 'v9'"):
        given_checkpoint("hf://me/students/ckpt/student_nano.pt@v9", cfg(hub, tmp_path), storage)
    wrong = cfg(hub, tmp_path).model_copy(update={"preset": "v2-small"})
    with pytest.raises(ConfigError, match="model.preset.*preset 'v2-small'"):
        given_checkpoint("hf://me/students/ckpt/student_nano.pt", wrong, storage)
    with pytest.raises(ConfigError, match="Expected an existing checkpoint"):
        given_checkpoint(str(tmp_path / "absent.pt"), cfg(hub, tmp_path), storage)
    assert not (tmp_path / "work" / "embeddings").exists()


def test_private_repo_token_from_environment(hub, tmp_path, storage, monkeypatch):
    uri = "hf://me/private/ckpt/student_nano.pt"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no such repository \\(or no access"):
        given_checkpoint(uri, cfg(hub, tmp_path), storage)
    monkeypatch.setenv("HF_TOKEN", "hf_test_tok")
    assert given_checkpoint(uri, cfg(hub, tmp_path), storage).key == NANO_SHA[:20]


def test_hub_token_from_a_secret_block_or_the_environment():
    assert hf_token(None, environ={"HF_TOKEN": "hf_env"}) == "hf_env"
    assert hf_token(None, environ={}) is None
    assert hf_token("secret/hf", loader=lambda slug, name: {"value": "hf_block"}) == "hf_block"
    assert hf_token("hf", loader=lambda s, n: {"value": '{"token": "hf_json"}'}) == "hf_json"
    with pytest.raises(ConfigError, match="model.hf_token_secret"):
        hf_token("secret/hf", loader=lambda s, n: {"value": {"other": 1}})


@pytest.mark.slow
def test_hf_endpoint_from_the_environment(hub, tmp_path):
    """huggingface_hub reads HF_ENDPOINT at import: a fresh process with it set, no option."""
    code = (
        "from tasks.config import ModelConfig, StorageConfig\n"
        "from tasks.train import given_checkpoint\n"
        f"st = StorageConfig(output_uri={str(tmp_path / 'o')!r}, work_uri={str(tmp_path / 'w')!r})\n"
        "ref = given_checkpoint('hf://me/students/ckpt/student_nano.pt', "
        "ModelConfig(preset='v2-nano'), st)\n"
        "print(ref.uri)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    assert out.stdout.strip().endswith(f"@{COMMIT}")
