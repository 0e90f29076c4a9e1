"""The region build flow: scenes -> cloud masks -> d-pixels -> (training) -> embeddings ->
int8 zone stores, for one region and year.

The flow only composes tasks, names steps and reports: the work happens in the stage
functions of :mod:`tasks`. Tasks pass small references (URIs and content keys).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.heads import run_evaluation
from flows.runs import claim_current_run, crash_dead_runs
from tasks import prefect_tasks as pt
from tasks.config import BuildConfig, RunnerConfig
from tasks.grid import Tile, plan_tiles
from tasks.heads.stages import EvaluationRef
from tasks.preflight import preflight
from tasks.preview import preview_markdown
from tasks.refs import CheckpointRef, DPixelRef, EmbeddingRef, MaskRef, PublishRef, SceneRef
from tasks.stop import install_stop_handlers
from tasks.storage import join, normalise
from tasks.threads import apply_torch_threads, available_cores, quiet_openmp, threads_per_worker


class BuildResult(BaseModel):
    """What a build produced."""

    store_uri: str = Field(description="The year's Zarr store.")
    groups: list[str] = Field(description="Zone groups written.")
    tiles: list[str] = Field(description="Tile ids built.")
    model_version: str
    n_valid_pixels: int
    seconds: float
    evaluation: EvaluationRef | None = Field(
        default=None, description="The evaluation step's result (evaluation.enabled).")


def plan(config: BuildConfig) -> list[Tile]:
    """The tiles of a build."""
    return plan_tiles(config.region.geometry(), config.tile_size_px)


def _tile_rows(scenes: list[SceneRef], masks: list[MaskRef], dps: list[DPixelRef],
               embs: list[EmbeddingRef], pubs: list[PublishRef]) -> list[dict[str, Any]]:
    rows = []
    for s, m, d, e, p in zip(scenes, masks, dps, embs, pubs, strict=True):
        rows.append({
            "tile": s.tile.id, "s2_scenes": s.n_s2, "s2_kept": m.n_kept,
            "s1_asc": s.n_s1_ascending, "s1_desc": s.n_s1_descending,
            "cloud_fraction": round(m.cloud_fraction, 3),
            "mean_valid_s2_per_pixel": round(d.mean_valid_s2, 1),
            "embedded_pixels": e.n_valid, "nodata_pixels": e.n_nodata,
            "published": "skipped (same content)" if p.skipped else "written",
            "seconds_acquire": s.seconds, "seconds_mask": m.seconds, "seconds_dpixels": d.seconds,
            "seconds_embed": e.seconds, "seconds_publish": p.seconds,
        })
    return rows


def torch_threads(cfg: RunnerConfig) -> tuple[int, int]:
    """Torch threads of (each worker's tasks, training) for a runner config; 0 means "let each
    worker decide" (a remote Dask cluster with ``torch_threads: auto``: its cores // its
    threads). Workers x threads <= cores; training, which runs alone, gets every core."""
    if cfg.kind == "dask" and cfg.dask_address and cfg.torch_threads == "auto":
        return 0, 0
    per_worker = threads_per_worker(cfg.torch_threads, cfg.max_workers)
    return per_worker, (available_cores() if cfg.torch_threads == "auto" else per_worker)


def task_runner_for(cfg: RunnerConfig) -> TaskRunner:
    """The Prefect task runner a build config asks for."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.max_workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.max_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(
    name="build-region",
    validate_parameters=True,
    flow_run_name="build-{config.region.name}-{config.year}",
)
def build_region(config: BuildConfig) -> BuildResult:
    """Build TESSERA embeddings for one region and year and publish them as int8 Zarr.

    Validates the config and probes storage before any work, then runs the stages on the
    task runner the config names (threads, processes or Dask).
    """
    install_stop_handlers()  # SIGTERM from a runner's cancellation stops the tasks (tasks/stop.py)
    quiet_openmp()  # worker processes started below inherit it (tasks/threads.py)
    cfg = preflight(config)
    claim_current_run()
    crash_dead_runs()  # runs of killed builds do not stay RUNNING (flows/runs.py)
    stages = build_stages.with_options(task_runner=task_runner_for(cfg.runner))
    return stages(config=cfg)


@flow(
    name="build-region-stages",
    validate_parameters=True,
    flow_run_name="stages-{config.region.name}-{config.year}",
)
def build_stages(config: BuildConfig) -> BuildResult:
    """The stages of one build, as tasks (see :func:`build_region`)."""
    t0 = time.perf_counter()
    log = get_run_logger()
    claim_current_run()
    cfg = config
    st = cfg.storage
    tiles = plan(cfg)
    threads, train_threads = torch_threads(cfg.runner)
    log.info("Building %d tile(s) of %s for %d: %s (torch threads per worker: %s)", len(tiles),
             cfg.region.name, cfg.year, ", ".join(t.id for t in tiles), threads or "auto")
    results = pt.result_storage_for(st)

    def opt(t):  # noqa: ANN001, ANN202
        return t.with_options(result_storage=results)

    n_steps = len(tiles) * 5 + 1
    progress = create_progress_artifact(progress=0.0, key="build-progress",
                                        description=f"Tiles x stages done, {cfg.region.name} {cfg.year}")
    done_steps = 0

    def advance(futures: list[PrefectFuture]) -> list[Any]:
        nonlocal done_steps
        out = [f.result() for f in futures]
        done_steps += len(futures)
        update_progress_artifact(progress, progress=100.0 * done_steps / n_steps)
        return out

    if cfg.source.kind == "sentinelhub":  # processing units, before any Process request
        pu = pt.estimate_pu_task(tiles, cfg.year, cfg.source.sentinelhub, st)
        create_markdown_artifact(markdown=pu.markdown(), key="sentinelhub-processing-units",
                                 description="Sentinel Hub processing-unit estimate")
    scene_f = [opt(pt.acquire_task).submit(t, cfg.year, cfg.source, st) for t in tiles]
    mask_f = [opt(pt.mask_task).submit(s, cfg.mask, st) for s in scene_f]
    dp_f = [opt(pt.dpixels_task).submit(s, m, cfg.dpixels, st) for s, m in zip(scene_f, mask_f, strict=True)]
    scenes = advance(scene_f)
    masks = advance(mask_f)
    dps: list[DPixelRef] = advance(dp_f)
    for d in dps:
        log.info("tile %s: %d S2 scenes kept, %.1f valid S2 observations per pixel",
                 d.tile.id, d.n_s2, d.mean_valid_s2)

    if cfg.training.enabled:
        ts = opt(pt.training_set_task).submit(dps, cfg.training, cfg.seed, st)
        ckpt_f = opt(pt.train_task).submit(ts, cfg.model, cfg.training, cfg.seed, st,
                                           threads=train_threads)
    else:
        ckpt_f = opt(pt.given_checkpoint_task).submit(cfg.training.checkpoint_uri, cfg.model, st)
    ckpt: CheckpointRef = advance([ckpt_f])[0]
    log.info("model %s (checkpoint %s)", ckpt.model_version, ckpt.uri)

    prep = opt(pt.prepare_stores_task).submit(tiles, cfg.year, cfg.publish, st, ckpt.model_version)
    emb_f = [opt(pt.embed_task).submit(d, ckpt, cfg.embedding, cfg.seed, st, threads=threads)
             for d in dps]
    pub_f = [opt(pt.publish_task).submit(e, cfg.year, cfg.publish, st, ckpt.model_version, wait_for=[prep])
             for e in emb_f]
    embs: list[EmbeddingRef] = advance(emb_f)
    pubs: list[PublishRef] = advance(pub_f)
    groups = sorted(set(prep.result()))
    opt(pt.finalise_stores_task).submit(pubs, cfg.year, st).result()
    cat = opt(pt.update_catalog_task).submit(pubs, cfg.year, st, cfg.publish)
    previews = {g: opt(pt.preview_task).submit(pubs, cfg.year, g, st, cfg.publish) for g in groups}
    for g, fut in previews.items():
        pv = fut.result()
        # a self-contained image (data URI): no URL, no credential leaves the process
        create_markdown_artifact(markdown=preview_markdown(pv.png_uri, st, f"{g} {cfg.year}"),
                                 key=f"preview-{g}", description=f"PCA RGB quicklook of {g} {cfg.year}")
    log.info("catalogue: %d tile(s), %s", cat.result().n_tiles, cat.result().manifest_uri)
    evaluation = None
    if cfg.evaluation.enabled:  # label-efficiency report + predicted map (flows/heads.py)
        apply_torch_threads(train_threads)  # runs alone, in this thread
        evaluation = run_evaluation(cfg, dps, ckpt)

    rows = _tile_rows(scenes, masks, dps, embs, pubs)
    create_table_artifact(table=rows, key="build-tiles",
                          description=f"Per-tile summary, {cfg.region.name} {cfg.year}")
    store = join(normalise(st.output_uri), f"{cfg.year}.zarr")
    result = BuildResult(
        store_uri=store, groups=groups, tiles=[t.id for t in tiles],
        model_version=ckpt.model_version, n_valid_pixels=sum(e.n_valid for e in embs),
        seconds=round(time.perf_counter() - t0, 2), evaluation=evaluation,
    )
    log.info("published %d pixels to %s (groups %s) in %.1f s", result.n_valid_pixels, store,
             ", ".join(groups), result.seconds)
    return result
