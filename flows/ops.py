"""Operational flows: backfills over regions x years, the annual build, GPU training.

Each region-year runs as its own ``build-region`` flow run (a subflow), so it is visible,
retryable and cached on its own; a backfill bounds how many run at once, both within the
backfill (its task runner) and across backfills (the ``tessera-builds`` global concurrency
limit, when it exists on the server).
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.build import BuildResult, build_region, plan, preflight
from flows.runs import claim_current_run, crash_dead_runs
from tasks import prefect_tasks as pt
from tasks.config import (
    BuildConfig,
    RegionConfig,
    _deep_merge,
    last_complete_year,
    validate_build_config,
)
from tasks.refs import CheckpointRef

BUILD_LIMIT = "tessera-builds"
"""Global concurrency limit shared by every backfill and annual build."""


class BackfillItem(BaseModel):
    """One region-year of a backfill."""

    region: str
    year: int
    store_uri: str = Field(description="Published store.")
    n_valid_pixels: int
    seconds: float


def region_year_configs(regions: list[RegionConfig], years: list[int],
                        base: dict[str, Any] | None = None) -> list[BuildConfig]:
    """Validate every region-year's build config up front (nothing runs if one is bad)."""
    out = []
    for region in regions:
        for year in years:
            data = _deep_merge(base or {}, {"region": region.model_dump(mode="json"), "year": year})
            out.append(validate_build_config(data))
    return out


@task(name="build-region-year", task_run_name="{config.region.name}-{config.year}")
def build_region_year(config: BuildConfig) -> BackfillItem:
    """Run one region-year as its own build-region flow run, within the global build limit."""
    with concurrency(BUILD_LIMIT, occupy=1, strict=False):
        r: BuildResult = build_region(config=config)
    return BackfillItem(region=config.region.name, year=config.year, store_uri=r.store_uri,
                        n_valid_pixels=r.n_valid_pixels, seconds=r.seconds)


@flow(name="backfill", validate_parameters=True)
def backfill(regions: list[RegionConfig], years: list[int], base: dict[str, Any] | None = None,
             max_parallel: Annotated[int, Field(ge=1, le=64)] = 2) -> list[BackfillItem]:
    """Build every region x year; at most ``max_parallel`` builds at once.

    Region-years already published with the same config and model are served from cache.
    """
    configs = region_year_configs(regions, years, base)
    claim_current_run()
    crash_dead_runs()
    for c in configs:
        preflight(c)
    log = get_run_logger()
    log.info("backfill of %d region-year(s), %d at a time", len(configs), max_parallel)
    with ThreadPoolTaskRunner(max_workers=max_parallel) as tr:
        futures = [tr.submit(build_region_year, parameters={"config": c}) for c in configs]
        return [f.result() for f in futures]


@flow(name="annual-build", validate_parameters=True)
def annual_build(regions: list[RegionConfig], base: dict[str, Any] | None = None,
                 year: int | None = None,
                 max_parallel: Annotated[int, Field(ge=1, le=64)] = 2) -> list[BackfillItem]:
    """Build the last complete year (or ``year``) for a list of named regions."""
    y = year or last_complete_year()
    get_run_logger().info("annual build of %d for %s", y, ", ".join(r.name for r in regions))
    return backfill(regions=regions, years=[y], base=base, max_parallel=max_parallel)


@flow(name="train", validate_parameters=True, flow_run_name="train-{config.region.name}-{config.year}")
def train_region(config: BuildConfig) -> CheckpointRef:
    """Acquire, mask and extract a region's d-pixels and train a model on them.

    Meant for a GPU work pool: the training task holds a slot of the ``gpu`` concurrency
    limit while it runs.
    """
    cfg = preflight(config)
    claim_current_run()
    crash_dead_runs()
    st = cfg.storage
    results = pt.result_storage_for(st)
    dps = []
    for tile in plan(cfg):
        sc = pt.acquire_task.with_options(result_storage=results)(tile, cfg.year, cfg.source, st)
        mk = pt.mask_task.with_options(result_storage=results)(sc, cfg.mask, st)
        dps.append(pt.dpixels_task.with_options(result_storage=results)(sc, mk, cfg.dpixels, st))
    ts = pt.training_set_task.with_options(result_storage=results)(dps, cfg.training, cfg.seed, st)
    return pt.train_task.with_options(result_storage=results)(ts, cfg.model, cfg.training, cfg.seed, st)
