"""RGB previews of a zone store: the convention's optional ``rgb`` array and a PNG quicklook.

Colours: a PCA fitted per zone group (per store, per year), so colours are comparable across
the tiles of one zone and year, not across years or zones.

1. Sample: up to ``n_sample`` committed pixels, spread evenly over the committed tiles (the
   tile records), from each tile's top-left shard window, dequantised (``q * s``).
2. Fit: mean and the top three principal axes (SVD of the centred sample); each axis' sign is
   fixed so its largest loading is positive (deterministic colours).
3. Stretch: per component, the 2nd and 98th percentiles of the sample map to 0 and 255.
4. Write ``rgb`` uint8 (H, W, 4), shards 256 x 256 like the data arrays, alpha 255 where the
   scale is finite and 0 elsewhere, shard window by shard window over the committed tiles.
   The fitted parameters are stored in the group attribute ``tessera:rgb_pca`` and
   ``tessera:has_rgb_preview`` is set last. Tiles published later have no colour (alpha 0)
   until the preview is rebuilt.
5. Quicklook: the ``rgb`` array decimated to at most ``max_side`` pixels, written as PNG to
   ``{output_uri}/previews/{year}/{group}.png``.

The whole rebuild holds the zone's exclusive :class:`~tasks.publish.ZoneLease`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import zarr
from PIL import Image
from pydantic import BaseModel, ConfigDict
from zarr.codecs import BloscCodec

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import StorageError
from tasks.grid import SHARD_PX, Tile
from tasks.publish import (
    INNER_CHUNK_PX,
    RECORDS_DIR,
    ZoneExtent,
    ZoneLease,
    year_store_uri,
)
from tasks.storage import get_fs, join, write_bytes_atomic, zarr_store
from tessera_model.quantise import dequantise

__all__ = ["PreviewRef", "fit_pca", "make_preview", "pca_rgb", "preview_markdown", "preview_url"]


class PreviewRef(BaseModel):
    """A zone group's preview: the PNG quicklook's URI and the group it colours."""

    model_config = ConfigDict(frozen=True)

    png_uri: str
    group: str
    n_tiles: int
    width: int
    height: int


def fit_pca(sample: np.ndarray) -> dict[str, Any]:
    """PCA colour model of a (N, B) float sample: mean, 3 axes, 2/98 % stretch per axis."""
    x = sample[np.isfinite(sample).all(-1)].astype(np.float64)
    if len(x) < 3:
        raise StorageError(f"Expected at least 3 valid pixels to fit a preview. Got {len(x)}.")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:3]
    axes *= np.sign(axes[np.arange(3), np.abs(axes).argmax(1)])[:, None]
    proj = (x - mean) @ axes.T
    lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
    return {
        "mean": mean.tolist(),
        "axes": axes.tolist(),
        "lo": lo.tolist(),
        "hi": np.maximum(hi, lo + 1e-6).tolist(),
    }


def pca_rgb(e: np.ndarray, pca: dict[str, Any]) -> np.ndarray:
    """(..., B) float embeddings to (..., 4) uint8 RGBA with a fitted PCA; alpha 0 on NaN."""
    mean, axes = np.asarray(pca["mean"]), np.asarray(pca["axes"])
    lo, hi = np.asarray(pca["lo"]), np.asarray(pca["hi"])
    valid = np.isfinite(e).all(-1)
    proj = (np.where(valid[..., None], e, 0) - mean) @ axes.T
    rgb = np.clip((proj - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    out = np.concatenate([rgb, alpha[..., None]], axis=-1)
    out[~valid, :3] = 0
    return out


def _tile_windows(store_uri: str, ext: ZoneExtent, storage: StorageConfig) -> list[Tile]:
    fs, path = get_fs(join(store_uri, RECORDS_DIR), storage)
    prefix = f"{ext.zone:02d}{'S' if ext.south else 'N'}-"
    try:
        fs.invalidate_cache(path)
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    return [Tile.from_id(n[:-5]) for n in names if n.startswith(prefix) and n.endswith(".json")]


def make_preview(
    output_uri: str,
    year: int,
    group: str,
    storage: StorageConfig,
    cfg: PublishConfig | None = None,
    n_sample: int = 20_000,
    max_side: int = 1024,
) -> PreviewRef:
    """(Re)build a zone group's ``rgb`` preview array and PNG quicklook (module docstring).

    Returns:
        A :class:`PreviewRef`; ``png_uri`` is what a flow attaches as an image artifact.

    Raises:
        StorageError: no such group, or no committed pixel to fit colours on.
    """
    cfg = cfg or PublishConfig()
    store_uri = year_store_uri(output_uri, year)
    where = join(store_uri, group)
    with ZoneLease(
        store_uri,
        group,
        storage,
        exclusive=True,
        ttl_s=cfg.lease_ttl_s,
        timeout_s=cfg.lease_timeout_s,
    ):
        try:
            g = zarr.open_group(zarr_store(where, storage), mode="r+")
        except FileNotFoundError:
            raise StorageError(f"Expected zone group {where}. Got none.") from None
        ext = ZoneExtent.from_attrs(dict(g.attrs))
        tiles = _tile_windows(store_uri, ext, storage)
        emb, sc = g["embeddings"], g["scales"]
        per_tile = max(n_sample // max(len(tiles), 1), 1)
        rng = np.random.default_rng(0)
        samples = []
        for t in tiles:
            r, c = ext.offset(t)
            win = dequantise(
                emb[r : r + SHARD_PX, c : c + SHARD_PX, :], sc[r : r + SHARD_PX, c : c + SHARD_PX]
            )
            flat = win.reshape(-1, win.shape[-1])
            flat = flat[np.isfinite(flat).all(-1)]
            if len(flat):
                samples.append(flat[rng.choice(len(flat), min(per_tile, len(flat)), replace=False)])
        if not samples:
            raise StorageError(f"{where}: Expected committed pixels to fit a preview. Got none.")
        pca = fit_pca(np.concatenate(samples))

        if "rgb" not in g:
            g.create_array(
                "rgb",
                shape=(ext.height, ext.width, 4),
                dtype="uint8",
                chunks=(INNER_CHUNK_PX, INNER_CHUNK_PX, 4),
                shards=(SHARD_PX, SHARD_PX, 4),
                compressors=BloscCodec(
                    cname="zstd", clevel=cfg.compression_level, shuffle="shuffle"
                ),
                fill_value=0,
                dimension_names=["northing", "easting", "rgba"],
                attributes={
                    "grid_mapping": "spatial_ref",
                    "long_name": "PCA RGB preview (alpha 255 valid, 0 none); tessera:rgb_pca",
                },
            )
        rgb = g["rgb"]
        if tuple(rgb.shape[:2]) != (ext.height, ext.width):
            rgb.resize((ext.height, ext.width, 4))
        for t in tiles:  # whole shards, no read-modify-write
            r, c = ext.offset(t)
            for rr in range(r, r + t.height, SHARD_PX):
                for cc in range(c, c + t.width, SHARD_PX):
                    e = dequantise(
                        emb[rr : rr + SHARD_PX, cc : cc + SHARD_PX, :],
                        sc[rr : rr + SHARD_PX, cc : cc + SHARD_PX],
                    )
                    rgb[rr : rr + SHARD_PX, cc : cc + SHARD_PX, :] = pca_rgb(e, pca)
        g.attrs.update({"tessera:rgb_pca": pca, "tessera:has_rgb_preview": True})

        step = max(1, int(np.ceil(max(ext.height, ext.width) / max_side)))
        quick = rgb[::step, ::step, :]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(quick), mode="RGBA").save(buf, format="PNG")
        png_uri = join(output_uri, "previews", str(year), f"{group}.png")
        write_bytes_atomic(png_uri, buf.getvalue(), storage)
    return PreviewRef(
        png_uri=png_uri,
        group=group,
        n_tiles=len(tiles),
        width=quick.shape[1],
        height=quick.shape[0],
    )


def preview_url(png_uri: str, storage: StorageConfig, expires_s: int = 7 * 86400) -> str:
    """A URL a browser can open for a quicklook (for ``create_image_artifact``).

    ``s3://`` gives a presigned URL valid for ``expires_s``: it carries the access key *id*
    and a signature, never the secret key (use :func:`preview_markdown` to expose neither);
    a local path gives a ``file://`` URI.
    """
    if png_uri.startswith("s3://"):
        fs, path = get_fs(png_uri, storage)
        return str(fs.sign(path, expiration=expires_s))
    from pathlib import Path

    return Path(png_uri.removeprefix("file://")).resolve().as_uri()


def preview_markdown(png_uri: str, storage: StorageConfig, title: str = "preview") -> str:
    """Markdown embedding the quicklook as a data URI (for ``create_markdown_artifact``).

    Self-contained: no URL, no credential of any kind; keep ``max_side`` small (<= 512).
    """
    import base64

    fs, path = get_fs(png_uri, storage)
    with fs.open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f"![{title}](data:image/png;base64,{data})"
