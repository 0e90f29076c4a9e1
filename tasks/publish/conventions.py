"""What a year store and its zone groups say about themselves (convention ``tessera:`` v1).

Constants of the layout (dataset version, band counts, chunking, where records, leases and
journals live), the ``zarr_conventions`` registry, and the attributes derived from a build's
``model_version``: family, preset, size, checkpoint hash and int8 rule
(:func:`quantisation_rule`). :func:`check_publish_model` refuses a Matryoshka prefix for a
model that has none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.errors import DataError

if TYPE_CHECKING:
    from tasks.publish.coords import ZoneExtent


DATASET_VERSION = "v1"
"""``tessera:dataset_version`` written and accepted."""
N_BANDS = 128
"""Embedding dimensions of the v1.0 model."""
MATRYOSHKA_DIMS = (16, 32, 64, 128)
"""Prefix sizes K a v2 embedding may be published at (tessera-v2.md section 1)."""
INNER_CHUNK_PX = 64
"""Inner chunk side within a 256 x 256 shard (readers fetching small windows)."""
BLOCK_SHARDS = 4
"""Shards per write block along easting: a block is 256 rows x up to 1,024 columns
(128 MiB of float32 input), which bounds publish memory whatever the tile size."""
RECORDS_DIR = ".tessera/tiles"
"""Per-tile commit records, relative to the year store."""
LOCKS_DIR = ".tessera/locks"
"""Writer leases, one folder per zone group, relative to the year store."""
PROVENANCE_DIR = "provenance"
"""Publication times per tile, relative to the WORK root (never published)."""
GROW_DIR = ".tessera/grow"
"""Journals and staged shards of origin moves, relative to the year store."""
DATA_ARRAYS = ("embeddings", "rgb", "scales")
"""Sharded arrays of a zone group; ``scales`` is last on purpose (it commits pixels)."""
PUBLISH_FORMAT = 2
"""Bump when the bytes written for the same input change; part of the skip key.
2: tile records without ``published_at``/``source_key`` (now in the work root's provenance)."""

#: The ``zarr_conventions`` registry of a year store and its zone groups (convention v1).
ZARR_CONVENTIONS: list[dict[str, str]] = [
    {
        "schema_url": "https://raw.githubusercontent.com/ucam-eo/zarr-convention-tessera/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/ucam-eo/zarr-convention-tessera/blob/v1/README.md",
        "uuid": "e7f90d5f-019e-4a38-802f-9fa695e26c71",
        "name": "tessera:",
        "description": "Quantised geospatial embedding vectors with per-pixel dequantisation scales",
    },
    {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/geo-proj/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/geo-proj/blob/v1/README.md",
        "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
        "name": "proj:",
        "description": "Coordinate reference system information for geospatial data",
    },
    {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
        "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
        "name": "spatial:",
        "description": "Spatial coordinate information",
    },
]


def model_family_of(model_version: str) -> str:
    """The TESSERA family a build's ``model_version`` belongs to.

    Given checkpoints are named ``{preset}-{sha256[:8]}`` (``v2-medium-3823be7d``), trained
    ones ``{spec.version}-{key[:8]}`` (v1.0-family architectures).
    """
    preset = model_version.rsplit("-", 1)[0]
    if preset.startswith("v2-"):
        return "v2"
    if preset.startswith("v1.1"):
        return "v1.1"
    return "v1.0"


def quantisation_rule(model_version: str) -> str:
    """The int8 rule of the model's version (:mod:`tessera_model.quantise`)."""
    return "v2" if model_family_of(model_version) == "v2" else "v1"


def model_attrs(model_version: str, n_bands: int) -> dict[str, Any]:
    """What a zone group records about the model: family, version, size, checkpoint hash, K."""
    preset, digest = (model_version.rsplit("-", 1) + [""])[:2]
    family = model_family_of(model_version)
    return {
        "tessera:model_version": model_version,
        "tessera:model_family": family,
        "tessera:model_preset": preset,
        "tessera:model_size": preset.split("-", 1)[1] if family == "v2" else "",
        "tessera:checkpoint_sha256_prefix": digest,
        "tessera:n_bands": n_bands,
        "tessera:matryoshka_dims": n_bands if family == "v2" else None,
        "tessera:quantisation": quantisation_rule(model_version),
    }


def check_publish_model(model_version: str, n_bands: int) -> None:
    """Refuse a Matryoshka prefix for a model that has none (before any work).

    Raises:
        DataError: ``n_bands`` < 128 for a v1.0/v1.1 model, or not one of 16/32/64/128.
    """
    if n_bands not in MATRYOSHKA_DIMS:
        raise DataError(f"Expected publish.dims in {list(MATRYOSHKA_DIMS)}. Got {n_bands}.")
    family = model_family_of(model_version)
    if n_bands != N_BANDS and family != "v2":
        raise DataError(
            f"Expected publish.dims {N_BANDS} for a {family} model ({model_version}): only v2 "
            f"students have Matryoshka prefixes. Got publish.dims={n_bands}."
        )


def _root_attrs(year: int) -> dict[str, Any]:
    return {
        "zarr_conventions": ZARR_CONVENTIONS,
        "tessera:dataset_version": DATASET_VERSION,
        "tessera:year": year,
    }


def _zone_attrs(
    ext: ZoneExtent, year: int, n_bands: int, model_version: str, build_version: str
) -> dict[str, Any]:
    return {
        **_root_attrs(year),
        "tessera:utm_zone": ext.zone,
        **model_attrs(model_version, n_bands),
        "tessera:n_tiles": 0,
        "tessera:build_version": build_version,
        "tessera:has_rgb_preview": False,
        "proj:code": f"EPSG:{ext.epsg}",
        "spatial:dimensions": ["northing", "easting"],
        "spatial:transform": ext.transform,
        "spatial:shape": [ext.height, ext.width],
        "spatial:bbox": ext.bbox,
        "spatial:registration": "pixel",
    }
