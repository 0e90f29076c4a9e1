"""Thin Prefect wrappers around the stage functions.

Every task's cache key is the hash of (task name, code version, all inputs), and inputs are
configs and small references that carry their upstream content keys, so the key covers
(stage config, tile, upstream result, code version); a given checkpoint's key also covers
its bytes' identity (ETag or size and mtime), so a file replaced at the same URI is re-read.
Results are persisted as JSON in the work root (:mod:`tasks.prefect_results`), so a second
run of the same build, or another machine with the same work root, is served from cache.

Retries: a task is retried only when its error can go away on its own (throttling, 5xx,
timeouts, dropped connections, a transient Sentinel Hub fault: :func:`retry_transient`); a
config, data or credentials error fails at once.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from tasks import acquire, catalog, dpixels, embed, mask, preview, publish, train
from tasks.config import StorageConfig
from tasks.errors import StopRequested
from tasks.prefect_results import RefSerializer, ResultStorage
from tasks.prefect_results import result_storage_for as _result_storage_for
from tasks.slots import held_slot
from tasks.sources.sentinelhub import (
    PUBudgetError,
    SentinelHubError,
    SentinelHubPermanentError,
    estimate_acquisition,
)
from tasks.sources.stac import StacPermanentError, StacSourceError
from tasks.storage import code_version, content_key, is_transient
from tasks.threads import apply_torch_threads

RETRY_DELAYS = [2, 10, 30]
GPU_LIMIT = "gpu"
"""Global concurrency limit guarding training (create it with ``prefect gcl create gpu --limit N``)."""
SH_LIMIT = "sentinelhub"
"""Global concurrency limit on tiles acquired from Sentinel Hub at once (its rate limit)."""
STAC_LIMIT = "stac"
"""Global concurrency limit on tiles read from STAC catalogues at once (each tile then uses
``source.stac.max_connections`` connections)."""

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


def file_identity(uri: str, storage: StorageConfig, model: Any = None) -> dict[str, Any]:
    """What identifies a file's current bytes without reading them: for ``hf://`` the
    repository, file and commit (and ETag), on object stores its ETag, else size and
    modification time (a stat or a HEAD request); see :func:`tasks.checkpoints.identity`."""
    from tasks.checkpoints import identity

    return identity(uri, storage, model)


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a stage call: task name, its code's version and every input.

    A given checkpoint is named by a URI whose bytes may change: its key also holds the
    file's identity (:func:`file_identity`). The torch thread count (``threads``) is left
    out: it changes how fast a result is made, not the result.
    """
    name = context.task.name
    parameters = {k: v for k, v in parameters.items() if k != "threads"}
    extra: Any = None
    if name == "given-checkpoint":
        extra = file_identity(parameters["uri"], parameters["storage"], parameters.get("model"))
    return f"{name}-{content_key(code_version(*TASK_CODE[name]), parameters, extra)}"


def transient(exc: BaseException) -> bool:
    """Whether a stage's error can go away on a retry."""
    if isinstance(exc, StopRequested | SentinelHubPermanentError | PUBudgetError
                  | StacPermanentError):
        return False
    if isinstance(exc, SentinelHubError | StacSourceError):
        return True
    return is_transient(exc)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry only transient errors (:func:`transient`)."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # an unreadable result: nothing says a retry can help
            return False
    return isinstance(exc, BaseException) and transient(exc)


def result_storage_for(storage: StorageConfig) -> ResultStorage:
    """Where Prefect persists task results and cache records: ``{work}/prefect-results``,
    as JSON, read through an integrity check, never saved on the server, no credentials
    (:mod:`tasks.prefect_results`)."""
    return _result_storage_for(storage)


_common: dict[str, Any] = {
    "cache_key_fn": stage_cache_key,
    "persist_result": True,
    "result_serializer": RefSerializer(),
    "retry_condition_fn": retry_transient,
}


@task(name="acquire", retries=3, retry_delay_seconds=RETRY_DELAYS,
      task_run_name="acquire-{tile}", **_common)
def acquire_task(tile, year, source, storage):  # noqa: ANN001, ANN201
    """Retries transient faults; a permanent failure (credentials, rejected request, PU
    budget) fails at once, without a retry storm. Sentinel Hub acquisitions hold a slot of
    the ``sentinelhub`` limit, which bounds concurrent tiles across every build and backfill
    (each tile then uses ``source.sentinelhub.max_threads`` requests at a time); STAC reads
    hold a slot of the ``stac`` limit the same way."""
    limit = {"sentinelhub": SH_LIMIT, "stac": STAC_LIMIT}.get(source.kind)
    if limit is not None:
        with held_slot(limit):
            return acquire.acquire(tile, year, source, storage)
    return acquire.acquire(tile, year, source, storage)


@task(name="estimate-processing-units", retries=3, retry_delay_seconds=RETRY_DELAYS,
      cache_policy=NO_CACHE)
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
def train_task(training_set, model, cfg, seed, storage, threads=0):  # noqa: ANN001, ANN201
    """Holds a slot of the ``gpu`` concurrency limit (when it exists) while training, and
    reports steps, loss and time left in the run log and a ``training-progress`` artifact.
    Runs with ``threads`` torch threads (0: this worker's share, :mod:`tasks.threads`)."""
    apply_torch_threads(threads)
    log = get_run_logger()
    art = create_progress_artifact(progress=0.0, key="training-progress",
                                   description="Training steps done")

    def progress(p: train.TrainProgress) -> None:
        left = "?" if p.seconds_left is None else f"{p.seconds_left:.0f}"
        log.info("training step %d/%d, loss %.4f, about %s s left%s", p.step, p.steps, p.loss,
                 left, train.validation_text(p))
        update_progress_artifact(art, progress=100.0 if p.converged else 100.0 * p.fraction,
                                 description=train.progress_description(p))

    with held_slot(GPU_LIMIT):
        return train.train_model(training_set, model, cfg, seed, storage, progress=progress)


@task(name="given-checkpoint", retries=3, retry_delay_seconds=RETRY_DELAYS, **_common)
def given_checkpoint_task(uri, model, storage):  # noqa: ANN001, ANN201
    return train.given_checkpoint(uri, model, storage)


@task(name="embed", retries=1, retry_delay_seconds=RETRY_DELAYS, task_run_name="embed-{dp.tile}", **_common)
def embed_task(dp, ckpt, cfg, seed, storage, threads=0):  # noqa: ANN001, ANN201
    """Runs with ``threads`` torch threads (0: this worker's share, :mod:`tasks.threads`)."""
    apply_torch_threads(threads)
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
