"""Tests of the PCA RGB preview and PNG quicklook (tasks/preview.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from tasks.errors import StorageError
from tasks.preview import fit_pca, make_preview, pca_rgb, preview_markdown, preview_url
from tasks.publish import prepare_zone_stores, publish_tile
from tests.tasks.test_publish import CFG, MODEL, T_A, T_C, YEAR, _embedding, _storage, _write_emb


def test_fit_pca_orders_axes_and_stretches() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8)) * np.array([10, 5, 2, 0.1, 0.1, 0.1, 0.1, 0.1])
    pca = fit_pca(x.astype(np.float32))
    axes = np.abs(np.asarray(pca["axes"]))
    assert axes.argmax(1).tolist() == [0, 1, 2]
    rgba = pca_rgb(x.astype(np.float32), pca)
    assert rgba.dtype == np.uint8 and (rgba[:, 3] == 255).all()
    frac_sat = ((rgba[:, :3] == 0) | (rgba[:, :3] == 255)).mean(0)
    assert (frac_sat < 0.06).all() and (frac_sat > 0.01).all()  # 2/98 % stretch
    nan_row = np.full((1, 8), np.nan, np.float32)
    assert pca_rgb(nan_row, pca).tolist() == [[0, 0, 0, 0]]


def test_preview_array_and_png(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_C], YEAR, CFG, storage, MODEL)
    with pytest.raises(StorageError, match="committed pixels"):
        make_preview(storage.output_uri, YEAR, "utm31", storage)
    for t, seed in ((T_A, 1), (T_C, 2)):
        publish_tile(_write_emb(tmp_path, t, _embedding(t, seed)), YEAR, CFG, storage, MODEL)
    ref = make_preview(storage.output_uri, YEAR, "utm31", storage, max_side=256)
    assert ref.n_tiles == 2 and ref.png_uri.endswith(f"previews/{YEAR}/utm31.png")
    g = zarr.open_group(f"{storage.output_uri}/{YEAR}.zarr/utm31", mode="r")
    assert g.attrs["tessera:has_rgb_preview"] is True
    rgb = g["rgb"]
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 4) and rgb.shards == (256, 256, 4)
    alpha = rgb[:][..., 3]
    finite = np.isfinite(g["scales"][:])
    np.testing.assert_array_equal(alpha == 255, finite)
    assert (alpha[~finite] == 0).all() and finite.sum() > 0
    deq = g["embeddings"][:256, :256].astype(np.float32) * g["scales"][:256, :256][..., None]
    np.testing.assert_array_equal(rgb[:256, :256], pca_rgb(deq, g.attrs["tessera:rgb_pca"]))
    png = Image.open(io.BytesIO(Path(ref.png_uri).read_bytes()))
    assert png.size == (256, 256) and png.mode == "RGBA"
    assert preview_url(ref.png_uri, storage) == Path(ref.png_uri).resolve().as_uri()
    md = preview_markdown(ref.png_uri, storage, "utm31")
    assert md.startswith("![utm31](data:image/png;base64,iVBORw0KGgo")
