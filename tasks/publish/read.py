"""Reading zone groups back: a lazy xarray Dataset and its dequantised embeddings."""

from __future__ import annotations

import importlib.util

import numpy as np
import xarray as xr

from tasks.config import StorageConfig
from tasks.grid import SHARD_PX
from tasks.publish.coords import _group_name, year_store_uri
from tasks.storage import zarr_store


def open_zone(output_uri: str, year: int, group: str | int, storage: StorageConfig) -> xr.Dataset:
    """Open a zone group as an xarray Dataset (lazy), CRS and transform via ``spatial_ref``.

    With dask installed the arrays are chunked one shard per chunk (256 x 256 x B): default
    small chunks make window reads several times slower. Without dask they are lazily indexed.

    Args:
        output_uri: Root holding ``{year}.zarr``.
        year: The year.
        group: Group name (``"utm31"``, ``"utm31s"``) or a northern zone number.
        storage: Storage config (S3 endpoint).

    Returns:
        Dataset with ``embeddings`` int8 (northing, easting, band) and ``scales`` float32
        (northing, easting); ``ds.rio.crs`` and ``ds["scales"].rio.transform()`` work.
    """
    name = group if isinstance(group, str) else _group_name(group, False)
    store = zarr_store(year_store_uri(output_uri, year), storage, read_only=True)
    chunks: dict[str, int] | None = None
    if importlib.util.find_spec("dask") is not None:
        chunks = {"northing": SHARD_PX, "easting": SHARD_PX, "band": -1}
    return xr.open_zarr(store, group=name, consolidated=False, chunks=chunks)


def dequantise_zone(ds: xr.Dataset) -> xr.DataArray:
    """Dequantised float32 embeddings of a (window of a) zone Dataset.

    Uses :func:`tessera_model.quantise.dequantise`; pixels with a NaN scale read as NaN.
    Select a window first: without dask this loads what it is given.

    Args:
        ds: A Dataset from :func:`open_zone` (or a selection of it).

    Returns:
        float32 DataArray (northing, easting, band).
    """
    from tessera_model.quantise import dequantise

    def _deq(q: np.ndarray, s: np.ndarray) -> np.ndarray:
        return np.asarray(dequantise(q, s), dtype=np.float32)

    out = xr.apply_ufunc(
        _deq,
        ds["embeddings"],
        ds["scales"],
        input_core_dims=[["band"], []],
        output_core_dims=[["band"]],
        dask="parallelized",
        output_dtypes=[np.float32],
    )
    return out.rename("embedding").transpose("northing", "easting", "band")
