"""From embeddings to maps as flows: ``train-head``, ``evaluate``, ``predict-map``, and the
evaluation step a build runs at its end (:func:`run_evaluation`).

The flows compose and report; the work is in :mod:`tasks.heads.stages`. Each stage commits
its own output (a content-keyed folder and a commit marker), so the tasks need no Prefect
cache of their own.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks import prefect_tasks as pt
from tasks.config import BuildConfig
from tasks.heads import stages
from tasks.heads.config import PredictMapConfig, TrainHeadConfig
from tasks.heads.evaluate import EvaluationFailed
from tasks.heads.models import HeadRef
from tasks.heads.predict import MapRef, legend_markdown, map_preview_png
from tasks.preflight import preflight
from tasks.preview import preview_markdown
from tasks.refs import CheckpointRef, DPixelRef
from tasks.stop import install_stop_handlers
from tasks.storage import join, write_bytes_atomic

_opts = {"cache_policy": NO_CACHE, "persist_result": False,
         "retry_condition_fn": pt.retry_transient}


@task(name="evaluate-build", retries=1, retry_delay_seconds=pt.RETRY_DELAYS, **_opts)
def evaluate_task(dps, ckpt, year, cfg, source, storage, seed):  # noqa: ANN001, ANN201
    return stages.evaluate_build(dps, ckpt, year, cfg, source, storage, seed)


@task(name="train-head", retries=1, retry_delay_seconds=pt.RETRY_DELAYS, **_opts)
def train_head_task(cfg):  # noqa: ANN001, ANN201
    return stages.train_head(cfg)


@task(name="predict-map", retries=1, retry_delay_seconds=pt.RETRY_DELAYS, **_opts)
def predict_map_task(cfg):  # noqa: ANN001, ANN201
    return stages.predict_head_map(cfg)


def run_evaluation(cfg: BuildConfig, dps: list[DPixelRef], ckpt: CheckpointRef) -> stages.EvaluationRef:
    """The build's evaluation step: report, artifacts and log; fails the run on a failed gate
    when ``evaluation.fail_build`` (raises :class:`EvaluationFailed`)."""
    log = get_run_logger()
    ev = cfg.evaluation
    ref: stages.EvaluationRef = evaluate_task(dps, ckpt, cfg.year, ev, cfg.source, cfg.storage,
                                              cfg.seed)
    st = cfg.storage
    images = [preview_markdown(ref.curves_png, st, "label-efficiency curves")]
    if ref.confusion_png:
        images.append(preview_markdown(ref.confusion_png, st, "confusion matrix"))
    if ref.map_png:
        images.append(preview_markdown(ref.map_png, st, "predicted map"))
        images.append(legend_markdown(ref.classes))
    create_markdown_artifact(
        markdown=f"## Evaluation: {ev.labels}\n\n{ref.markdown}\n\n" + "\n\n".join(images),
        key=f"evaluation-{ev.labels.replace('_', '-')}",
        description=f"Label-efficiency evaluation, {cfg.region.name} {cfg.year}")
    report = stages.evaluation_json(ref, st)
    create_table_artifact(table=report.rows, key=f"evaluation-table-{ev.labels.replace('_', '-')}",
                          description="Label-efficiency rows (mean and std over seeds)")
    log.info("evaluation (%s), written to %s:\n%s", ev.labels, ref.uri, ref.markdown)
    if ref.map_uri:
        log.info("predicted map: %s (preview %s)", ref.map_uri, ref.map_png)
    if not ref.passed and ev.fail_build:
        raise EvaluationFailed(failure_message(ref))
    return ref


def failure_message(ref: stages.EvaluationRef) -> str:
    """What a failed gate says: the failed checks and the report's folder on the first line,
    then the table and the predicted map's preview (the command line prints it all)."""
    first = ("Expected the evaluation to pass its gates. Got: "
             + "; ".join(c for c in ref.checks if c.startswith("FAIL")) + f" (report: {ref.uri})")
    more = [ref.table] if ref.table else []
    if ref.map_png:
        more.append(f"Predicted map preview: {ref.map_png}")
    return "\n\n".join([first, *more])


@flow(name="evaluate", validate_parameters=True,
      flow_run_name="evaluate-{config.region.name}-{config.year}")
def evaluate(config: BuildConfig) -> stages.EvaluationRef:
    """Evaluate a build's embeddings (label efficiency vs baselines) without re-publishing.

    Reuses the build's committed stages (scenes, masks, d-pixels, checkpoint: served from
    cache when the build ran) and needs its published store.
    """
    install_stop_handlers()
    cfg = preflight(config)
    if not cfg.evaluation.enabled:
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
            update={"enabled": True})})
    st = cfg.storage
    results = pt.result_storage_for(st)

    def opt(t):  # noqa: ANN001, ANN202
        return t.with_options(result_storage=results)

    tiles = pt_plan(cfg)
    scenes = [opt(pt.acquire_task).submit(t, cfg.year, cfg.source, st) for t in tiles]
    masks = [opt(pt.mask_task).submit(s, cfg.mask, st) for s in scenes]
    dps = [opt(pt.dpixels_task).submit(s, m, cfg.dpixels, st).result()
           for s, m in zip(scenes, masks, strict=True)]
    if cfg.training.enabled:
        ts = opt(pt.training_set_task).submit(dps, cfg.training, cfg.seed, st)
        ckpt = opt(pt.train_task).submit(ts, cfg.model, cfg.training, cfg.seed, st).result()
    else:
        ckpt = opt(pt.given_checkpoint_task).submit(cfg.training.checkpoint_uri, cfg.model,
                                                    st).result()
    version = stages.store_model_version(st.output_uri, cfg.year, st)
    if version != ckpt.model_version:
        from tasks.errors import DataError

        raise DataError(f"Expected the store {st.output_uri}/{cfg.year}.zarr to hold model "
                        f"{ckpt.model_version} (this config's). Got {version}: run the build first.")
    return run_evaluation(cfg, dps, ckpt)


def pt_plan(cfg: BuildConfig):  # noqa: ANN201
    """The build's tiles (as :func:`flows.build.plan`)."""
    from flows.build import plan

    return plan(cfg)


@flow(name="train-head", validate_parameters=True, flow_run_name="train-head-{config.name}")
def train_head(config: TrainHeadConfig) -> HeadRef:
    """Train a classification or regression head on labels over a published store; saves a
    versioned artifact (config, store, model version, test metrics)."""
    install_stop_handlers()
    log = get_run_logger()
    ref: HeadRef = train_head_task(config)
    create_table_artifact(table=[{"metric": k, "value": v} for k, v in ref.metrics.items()],
                          key=f"head-{config.name.lower().replace('_', '-').replace('.', '-')}",
                          description=f"Held-out metrics of head {config.name} ({ref.uri})")
    log.info("head %s: %d samples of %d polygons, test metrics %s; saved to %s", config.name,
             ref.n_samples, ref.n_polygons, ref.metrics, ref.uri)
    return ref


@flow(name="predict-map", validate_parameters=True, flow_run_name="predict-map-{config.year}")
def predict_map(config: PredictMapConfig) -> MapRef:
    """Apply a saved head to a store: a Zarr map (and COG) on the store's grid, previewed."""
    install_stop_handlers()
    log = get_run_logger()
    ref: MapRef = predict_map_task(config)
    st = config.storage
    for g in ref.groups:
        png = join(ref.uri, f"preview-{g}.png")
        write_bytes_atomic(png, map_preview_png(ref.uri, g, st), st)
        create_markdown_artifact(markdown=preview_markdown(png, st, f"{g} {ref.year}") + "\n\n"
                                 + legend_markdown(ref.classes), key=f"map-{g}",
                                 description=f"Predicted map {g} {ref.year}")
    log.info("predicted map %s: %d pixels in %d windows", ref.uri, ref.n_valid, ref.n_windows)
    return ref
