"""Thin Prefect wrappers around the stage functions.

Every task's cache key is the hash of (task name, code version, all inputs), and inputs are
configs and small references that carry their upstream content keys, so the key covers
(stage config, tile, upstream result, code version). Results are persisted in the work root
(see :func:`result_storage_for`), so a second run of the same build, or another machine with
the same work root, is served from cache. I/O stages retry with growing delays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem, WritableFileSystem

from tasks import acquire, catalog, dpixels, embed, mask, preview, publish, train
from tasks.config import StorageConfig
from tasks.sources.sentinelhub import estimate_acquisition, should_retry
from tasks.storage import code_version, content_key, join, normalise, storage_options

RETRY_DELAYS = [2, 10, 30]
GPU_LIMIT = "gpu"
SH_LIMIT = "sentinelhub"
"""Global concurrency limit on tiles acquired from Sentinel Hub at once (its rate limit)."""
"""Global concurrency limit guarding training (create it with ``prefect gcl create gpu --limit N``)."""


TASK_CODE: dict[str, tuple[str, ...]] = {
    "acquire": acquire.CODE,
    "cloud-mask": mask.CODE,
    "extract-dpixels": dpixels.CODE,
    "training-set": train.CODE,
    "train": train.CODE,
    "given-checkpoint": train.CODE,
    "embed": embed.CODE,
    "prepare-stores": ("tasks.publish",),
    "publish": ("tasks.publish", "tessera_model.quantise"),
    "finalise-stores": ("tasks.publish",),
    "estimate-processing-units": acquire.CODE,
    "update-catalog": ("tasks.catalog", "tasks.publish"),
    "preview": ("tasks.preview", "tasks.publish"),
}
"""The code each task's result depends on (its cache key includes that code's hash)."""


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a stage call: task name, its code's version and every input."""
    name = context.task.name
    return f"{name}-{content_key(code_version(*TASK_CODE[name]), parameters)}"


def result_storage_for(storage: StorageConfig) -> Path | WritableFileSystem:
    """Where Prefect persists task results and cache records: ``{work}/prefect-results``.

    A local path is used as is; an object-store root is saved as a RemoteFileSystem block
    (named by a hash of its location; it holds no credentials), since Prefect requires
    remote result storage to be a saved block.
    """
    root = join(normalise(storage.work_uri), "prefect-results")
    if "://" not in root:
        return Path(root)
    block = RemoteFileSystem(basepath=root, settings=storage_options(root, storage))
    block.save(f"tessera-results-{content_key(root, storage.s3_endpoint_url)[:12]}", overwrite=True)
    return block


_common: dict[str, Any] = {"cache_key_fn": stage_cache_key, "persist_result": True}


@task(name="acquire", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=should_retry,
      task_run_name="acquire-{tile}", **_common)
def acquire_task(tile, year, source, storage):  # noqa: ANN001, ANN201
    """Retries transient faults; a permanent failure (credentials, rejected request, PU
    budget) fails at once, without a retry storm. Sentinel Hub acquisitions hold a slot of
    the ``sentinelhub`` limit, which bounds concurrent tiles across every build and backfill
    (each tile then uses ``source.sentinelhub.max_threads`` requests at a time)."""
    if source.kind == "sentinelhub":
        with concurrency(SH_LIMIT, occupy=1, strict=False):
            return acquire.acquire(tile, year, source, storage)
    return acquire.acquire(tile, year, source, storage)


@task(name="estimate-processing-units", retries=3, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=should_retry, cache_policy=NO_CACHE)
def estimate_pu_task(tiles, year, cfg, storage):  # noqa: ANN001, ANN201
    """Catalog-only PU estimate of a Sentinel Hub build; fails if it exceeds the budget."""
    return estimate_acquisition(tiles, year, cfg, storage)


@task(name="cloud-mask", retries=2, retry_delay_seconds=RETRY_DELAYS, task_run_name="mask-{scene.tile}", **_common)
def mask_task(scene, cfg, storage):  # noqa: ANN001, ANN201
    return mask.cloud_mask(scene, cfg, storage)


@task(name="extract-dpixels", retries=2, retry_delay_seconds=RETRY_DELAYS, task_run_name="dpixels-{scene.tile}", **_common)
def dpixels_task(scene, cloud, cfg, storage):  # noqa: ANN001, ANN201
    return dpixels.extract_dpixels(scene, cloud, cfg, storage)


@task(name="training-set", retries=2, retry_delay_seconds=RETRY_DELAYS, **_common)
def training_set_task(dpixel_refs, cfg, seed, storage):  # noqa: ANN001, ANN201
    return train.build_training_set(dpixel_refs, cfg, seed, storage)


@task(name="train", retries=1, retry_delay_seconds=RETRY_DELAYS, **_common)
def train_task(training_set, model, cfg, seed, storage):  # noqa: ANN001, ANN201
    """Holds a slot of the ``gpu`` concurrency limit (when it exists) while training."""
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        return train.train_model(training_set, model, cfg, seed, storage)


@task(name="given-checkpoint", retries=3, retry_delay_seconds=RETRY_DELAYS, **_common)
def given_checkpoint_task(uri, model, storage):  # noqa: ANN001, ANN201
    return train.given_checkpoint(uri, model, storage)


@task(name="embed", retries=1, retry_delay_seconds=RETRY_DELAYS, task_run_name="embed-{dp.tile}", **_common)
def embed_task(dp, ckpt, cfg, seed, storage):  # noqa: ANN001, ANN201
    return embed.embed_tile(dp, ckpt, cfg, seed, storage)


@task(name="prepare-stores", retries=3, retry_delay_seconds=RETRY_DELAYS, **_common)
def prepare_stores_task(tiles, year, cfg, storage, model_version):  # noqa: ANN001, ANN201
    return publish.prepare_zone_stores(tiles, year, cfg, storage, model_version)


@task(name="publish", retries=3, retry_delay_seconds=RETRY_DELAYS, task_run_name="publish-{emb.tile}", **_common)
def publish_task(emb, year, cfg, storage, model_version):  # noqa: ANN001, ANN201
    return publish.publish_tile(emb, year, cfg, storage, model_version)


@task(name="finalise-stores", retries=3, retry_delay_seconds=RETRY_DELAYS, **_common)
def finalise_stores_task(published, year, storage):  # noqa: ANN001, ANN201
    """Recount each zone's tiles once all publishes are done (they may have raced)."""
    groups = sorted({(p.store_uri, p.group) for p in published})
    return {g: publish.refresh_n_tiles(storage.output_uri, year, g, storage) for _, g in groups}


@task(name="update-catalog", retries=3, retry_delay_seconds=RETRY_DELAYS, **_common)
def update_catalog_task(published, year, storage, cfg):  # noqa: ANN001, ANN201
    """Regenerate the year's parquet manifest and STAC catalogue from the committed tiles."""
    return catalog.update_catalog(storage.output_uri, year, storage, cfg)


@task(name="preview", retries=2, retry_delay_seconds=RETRY_DELAYS, task_run_name="preview-{group}", **_common)
def preview_task(published, year, group, storage, cfg):  # noqa: ANN001, ANN201
    """The zone's PCA RGB preview (``rgb`` array + PNG quicklook)."""
    return preview.make_preview(storage.output_uri, year, group, storage, cfg, max_side=512)
