"""The one place where deployments are declared: names, flows, parameters, schedules, tags.

``tessera serve`` serves them from this process to the Prefect API in ``PREFECT_API_URL``;
``tessera server`` also starts a local Prefect server first. To run them on a work pool
(process, Docker or Kubernetes) instead, see :func:`deploy_to_pool` and the README.
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.build import build_region
from flows.heads import evaluate, predict_map, train_head
from flows.ops import annual_build, backfill, train_region
from tasks.config import RegionConfig, demo_config

ANNUAL_CRON = "0 6 15 1 *"
"""Annual builds run on 15 January, 06:00 UTC: the previous year is complete and its last
scenes have been processed by then."""

DEFAULT_REGIONS: list[RegionConfig] = [demo_config().region]
"""Named regions that the annual build covers unless its parameters say otherwise."""


def deployments() -> list[RunnerDeployment]:
    """Every deployment this project serves."""
    demo = demo_config().model_dump(mode="json")
    regions = [r.model_dump(mode="json") for r in DEFAULT_REGIONS]
    return [
        build_region.to_deployment(
            name="build-region",
            description="Build TESSERA embeddings for one region and year (typed config form).",
            parameters={"config": demo},
            tags=["tessera", "build"],
        ),
        annual_build.to_deployment(
            name="annual-build",
            description="Build the last complete year for the configured named regions.",
            cron=ANNUAL_CRON,
            parameters={"regions": regions, "max_parallel": 2},
            tags=["tessera", "annual"],
        ),
        backfill.to_deployment(
            name="backfill",
            description="Build regions x years, a bounded number at a time, one run each.",
            parameters={"regions": regions, "years": [demo["year"]], "max_parallel": 2},
            tags=["tessera", "backfill"],
        ),
        train_region.to_deployment(
            name="train",
            description="Train a model on a region's d-pixels (GPU pool; holds the 'gpu' limit).",
            parameters={"config": demo},
            tags=["tessera", "gpu"],
        ),
        evaluate.to_deployment(
            name="evaluate",
            description="Label-efficiency evaluation of a built region's embeddings against "
            "raw-feature and random-init baselines (synthetic ground truth or a label file).",
            parameters={"config": {**demo, "evaluation": {**demo["evaluation"], "enabled": True}}},
            tags=["tessera", "heads"],
        ),
        train_head.to_deployment(
            name="train-head",
            description="Train a classification/regression head on labels (GeoParquet, "
            "GeoPackage, GeoJSON, CSV) over a published store; a versioned artifact.",
            tags=["tessera", "heads"],
        ),
        predict_map.to_deployment(
            name="predict-map",
            description="Apply a saved head to a published store: class + probability or "
            "value maps (Zarr, optional COG) on the store's grid.",
            tags=["tessera", "heads"],
        ),
    ]


def serve_all(limit: int | None = None) -> None:
    """Serve the deployments until interrupted (needs a Prefect API, e.g. a local server)."""
    serve(*deployments(), limit=limit)


def deploy_to_pool(work_pool: str, image: str | None = None, **kwargs: Any) -> list[Any]:
    """Register the same deployments on a work pool (process, Docker or Kubernetes).

    Args:
        work_pool: Name of an existing work pool (``prefect work-pool create ...``).
        image: Container image for Docker/Kubernetes pools (with this project installed).
        **kwargs: Passed to :func:`prefect.deploy` (e.g. ``build=False, push=False``).
    """
    from prefect import deploy

    return deploy(*deployments(), work_pool_name=work_pool, image=image, **kwargs)
