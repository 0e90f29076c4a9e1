"""Equivalence with the public reference code itself (github ucam-eo/tessera), when present.

Runs the reference v2 student code (``tessera_infer_v2/student``) from a local git snapshot
(``TESSERA_REFERENCE_REPO``, default the ``fetch`` mirror path), with random weights shared
with ours. Nothing of it is copied into the project: the files are read from the snapshot
into a temporary folder at test time. Skips cleanly when no snapshot is there.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera_model import ModelSpec
from tessera_model.quantise import quantise
from tests.model.test_v2_family import edge_pixels, ours, random_model

REPO = Path(os.environ.get("TESSERA_REFERENCE_REPO", "/work/.mirror/ucam-eo+tessera/repo"))
FILES = ("__init__.py", "model.py", "infer.py", "quantize.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> object:
    if not REPO.exists():
        pytest.skip(f"no reference snapshot at {REPO} (set TESSERA_REFERENCE_REPO)")
    pkg = tmp_path_factory.mktemp("ref") / "tessera_ref_student"
    pkg.mkdir()
    for name in FILES:
        res = subprocess.run(
            ["git", f"--git-dir={REPO}" if (REPO / "HEAD").exists() else f"-C{REPO}", "show",
             f"HEAD:tessera_infer_v2/student/{name}"],
            capture_output=True, check=False,
        )  # fmt: skip
        if res.returncode:
            pytest.skip(f"reference snapshot lacks tessera_infer_v2/student/{name}")
        (pkg / name).write_bytes(res.stdout)
    sys.path.insert(0, str(pkg.parent))
    try:
        return importlib.import_module("tessera_ref_student")
    finally:
        sys.path.remove(str(pkg.parent))


@pytest.mark.parametrize("preset", ["v2-nano", "v2-small"])
def test_v2_student_matches_the_reference_code(reference: object, preset: str) -> None:
    spec = ModelSpec.preset(preset)
    model = random_model(spec)
    theirs_model = reference.model.PixelStudent(  # type: ignore[attr-defined]
        repr_dim=128, latent_dim=spec.d_model // 4, num_layers=spec.n_layers,
        nhead=spec.n_heads, dim_feedforward=spec.ffn_dim, dropout=0.0,
    ).eval()  # fmt: skip
    theirs_model.load_state_dict(model.state_dict(), strict=True)
    px = edge_pixels(t2=300 if preset == "v2-nano" else 60)
    n = px["s2"].shape[0]
    want = reference.infer.encode_pixels(  # type: ignore[attr-defined]
        theirs_model, px["s2"].astype(np.float32), np.broadcast_to(px["s2_doy"], (n, 300 if
        preset == "v2-nano" else 60)), px["asc"], px["asc_doy"], px["desc"], px["desc_doy"],
        s2_masks=px["s2_valid"].astype(np.uint8), batch_pixels=7, device=torch.device("cpu"),
    )  # fmt: skip
    got = ours(model, px)
    covered = ~np.isnan(got).any(1)
    assert covered.sum() == n - 1  # the pixel with no observation is no-data, not garbage
    diff = float(np.abs(got[covered] - want[covered]).max())
    assert diff < 1e-5, diff
    q_ref, s_ref = reference.quantize.quantize(want[covered])  # type: ignore[attr-defined]
    q, s = quantise(got[covered], rule="v2")
    assert np.abs(q.astype(int) - q_ref.astype(int)).max() <= 1
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
