"""Local deployments: ``tessera serve`` runs them in this process against a Prefect API.

The one place where deployments are declared (names, parameters, descriptions, tags).
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.build import build_region
from tasks.config import demo_config


def deployments() -> list[RunnerDeployment]:
    """Every deployment this project serves."""
    return [
        build_region.to_deployment(
            name="build-region",
            description="Build TESSERA embeddings for one region and year (typed config form).",
            parameters={"config": demo_config().model_dump(mode="json")},
            tags=["tessera", "build"],
        ),
    ]


def serve_all(limit: int | None = None) -> None:
    """Serve the deployments until interrupted (needs a Prefect API, e.g. a local server)."""
    serve(*deployments(), limit=limit)
