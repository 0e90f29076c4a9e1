"""Shared fixtures: one Prefect test harness per session, an isolated PREFECT_HOME."""

from __future__ import annotations

import os
import tempfile

import pytest

# Isolate Prefect from the developer's profile and any .env before prefect is imported.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tessera-prefect-home-"))
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Before torch is imported: OpenMP threads sleep while they wait (tasks/threads.py); spinning
# threads made the suite many times slower on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session (about 10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A fixed, tiny model (fast to run), so builds with training off compare byte for byte.

    The checkpoint carries its own spec, so a build embeds with it whatever the preset.
    """
    import torch

    from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint

    torch.manual_seed(1)
    spec = ModelSpec(version="tiny-test", latent_dim=128, d_model=16, n_layers=1, n_heads=2,
                     ffn_dim=32, dropout=0.0, projector_dim=32, projector_layers=1, sample_steps=8)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(build_checkpoint(TesseraModel(spec)), path)
    return str(path)
