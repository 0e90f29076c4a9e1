"""The ``tessera`` command line.

Every bad input ends in one line on stderr naming the field and exit status 2, before a
Prefect server starts or anything is written: the config is validated, storage probed, the
checkpoint and credentials checked (:mod:`tasks.preflight`) first. A temporary Prefect
server that does not come up ends in one line saying what to do, exit status 3. A build that
published but failed its evaluation gate (``evaluation.*``; the demo has one) exits with 4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn

import yaml

from tasks.errors import FactoryError, StopRequested

EPILOG = """examples:
  tessera demo                               build the synthetic demo region (a few minutes)
  tessera build -c build.yaml                build what a config file says
  tessera build --bbox 0.1 52.19 0.16 52.2 --year 2023 --set training.steps=300
  tessera plan --bbox 5.9 45 6.1 45.05       list the tiles of a region (zone crossing shown)
  tessera config > build.yaml                write a starting config (--demo: the demo's)
  tessera plan -c build.yaml                 check a config file and list its tiles
  tessera server                             start a local Prefect server + UI and serve the deployments
  tessera serve                              serve the deployments to the Prefect API in PREFECT_API_URL
  tessera shub-endpoint --port 8765          a local Sentinel Hub endpoint serving the synthetic Earth
  tessera stac-endpoint --port 8766          a local STAC API + COG server serving the synthetic Earth
  tessera evaluate                           label-efficiency report of the demo build (after 'tessera demo')
  tessera train-head --labels crops.gpkg --column crop --year 2024    a head on your labels
  tessera predict-map tessera-out/heads/head/KEY --year 2024 --cog   a predicted map
"""

EXIT_BAD_INPUT = 2
"""Exit status for a bad command line, config, storage root, checkpoint or credentials."""
EXIT_NO_SERVER = 3
"""Exit status when the temporary Prefect server does not start."""
EXIT_EVALUATION_FAILED = 4
"""Exit status when a build published but its evaluation failed a gate (evaluation.*)."""

CLI_PREFECT_DEFAULTS = {
    # The temporary server's telemetry heartbeat logs an error every 10 minutes offline.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's default of 20 s is not enough for a first start on a busy 2-core machine
    # (measured 60-140 s); the start is retried once on top (see ensure_prefect_api).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Flow-run heartbeats every 30 s (Prefect's minimum; its default is 180 s), so runs of
    # killed processes are found within 90 s (flows/runs.py).
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
}
"""Prefect settings for command-line runs; a value the user set in the environment wins."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


class ServerStartError(RuntimeError):
    """The temporary Prefect API server did not start."""


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML/TOML/JSON build config file.")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("MIN_LON", "MIN_LAT", "MAX_LON", "MAX_LAT"))
    p.add_argument("--year", type=int, help="Year to build (default: the config's, else the "
                   "last complete year).")
    p.add_argument("--output", help="Output root (local path or s3://bucket/prefix).")
    p.add_argument("--work", help="Work root for caches and intermediates.")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Override any config field by dotted path, e.g. training.steps=50.")


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    from tasks.config import parse_overrides

    o: dict[str, Any] = parse_overrides(a.set)
    if a.bbox:
        o.setdefault("region", {})["bbox"] = a.bbox
        o["region"].setdefault("geojson", None)
    if a.year is not None:
        o["year"] = a.year
    if a.seed is not None:
        o["seed"] = a.seed
    if a.output is not None:
        o.setdefault("storage", {})["output_uri"] = a.output
    if a.work is not None:
        o.setdefault("storage", {})["work_uri"] = a.work
    return o


def _load(a: argparse.Namespace, demo: bool = False):  # noqa: ANN202
    """The build config the options describe: the demo's or a file's, with the options on top;
    the year defaults to the last complete year."""
    from tasks.config import (
        _deep_merge,
        demo_config,
        last_complete_year,
        load_config_dict,
        validate_build_config,
    )

    overrides = _overrides(a)
    if demo:
        base = demo_config().model_dump(mode="json")
    else:
        base = load_config_dict(a.config) if a.config else {}
        base.setdefault("year", last_complete_year())
    return validate_build_config(_deep_merge(base, overrides))


def _tile_plan(cfg):  # noqa: ANN001, ANN202
    """The tiles of a build (what ``flows.build.plan`` returns), without importing Prefect."""
    from tasks.grid import plan_tiles

    return plan_tiles(cfg.region.geometry(), cfg.tile_size_px)


def ensure_prefect_api(attempts: int = 2) -> None:
    """Start the temporary Prefect server now (unless ``PREFECT_API_URL`` names one), retrying
    a start that times out, so a slow start fails here with :class:`ServerStartError` rather
    than as a traceback from inside the flow."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        _check_api(settings.api.url)
        return
    if not settings.server.ephemeral.enabled:
        return
    from deployments.server import temporary_server_class

    server_class = temporary_server_class()
    timeout = settings.server.ephemeral.startup_timeout_seconds
    last: Exception | None = None
    for _ in range(attempts):
        server = server_class()
        try:
            server.start()
            # worker processes (processes/Dask runners, torchrun) use this server rather than
            # each starting a temporary server of their own
            os.environ["PREFECT_API_URL"] = server.api_url
            return
        except Exception as exc:  # noqa: BLE001 - Prefect raises RuntimeError or httpx errors
            last = exc
            server.stop()  # kill a half-started server; the next instance picks a new port
    if "Timed out" not in str(last):
        raise ServerStartError(
            f"the temporary Prefect server failed to start ({type(last).__name__}: "
            f"{str(last).splitlines()[0][:200] if str(last) else ''}). Start one in another "
            "terminal with 'tessera server', then 'export PREFECT_API_URL=http://127.0.0.1:4200/api' "
            "and run this again")
    raise ServerStartError(
        f"the temporary Prefect server did not start within {timeout} s ({attempts} tries; "
        "the machine may be busy). Start one in another terminal with 'tessera server', then "
        "'export PREFECT_API_URL=http://127.0.0.1:4200/api' and run this again (or allow more "
        "time: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300)"
    )


def _check_api(url: str) -> None:
    """One health check of the Prefect API a user named, so an unreachable one ends in one
    line rather than in a traceback from inside the flow."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        raise ServerStartError(
            f"cannot reach the Prefect API at PREFECT_API_URL={url} ({type(err).__name__}). "
            "Start it with 'tessera server' (or 'prefect server start'), or unset "
            "PREFECT_API_URL to let this command start a temporary one"
        )


def _run_build(cfg, t0: float) -> int:  # noqa: ANN001
    """Check everything a stat or HEAD can check, start the Prefect API, read credential
    blocks once, then run the build flow and print where the output is."""
    from tasks.preflight import check_credential_blocks, local_checks
    from tasks.stop import install_stop_handlers
    from tasks.storage import normalise

    install_stop_handlers()  # Ctrl-C / SIGTERM stop the build within seconds (tasks/stop.py)
    local_checks(cfg)  # before any server starts or folder is created
    ensure_prefect_api()
    check_credential_blocks(cfg)  # single-shot, needs the API

    from deployments.progress import BuildProgress
    from flows.build import build_region
    from tasks.heads.evaluate import EvaluationFailed

    try:
        with BuildProgress(normalise(cfg.storage.work_uri), [t.id for t in _tile_plan(cfg)]):
            result = build_region(config=cfg)
    except EvaluationFailed as exc:  # published, but the evaluation's gate failed: its table
        print(f"\nerror: {exc}", file=sys.stderr)
        return EXIT_EVALUATION_FAILED
    except RuntimeError as exc:  # a task runner's worker may start its own temporary server
        if "ephemeral Prefect API server" in str(exc):
            raise ServerStartError("a temporary Prefect server (of a task runner's worker) did not "
                                   "start in time; start one with 'tessera server' and set "
                                   "PREFECT_API_URL=http://127.0.0.1:4200/api") from None
        raise
    seconds = time.perf_counter() - t0
    print()
    print(f"Published {result.n_valid_pixels} pixels of {len(result.tiles)} tile(s) in {seconds:.0f} s.")
    print(f"Store: {result.store_uri}  groups: {', '.join(result.groups)}")
    print("Open it with:")
    print("  import xarray as xr")
    print(f"  ds = xr.open_zarr({result.store_uri!r}, group={result.groups[0]!r}, consolidated=False)")
    print('  emb = ds["embeddings"] * ds["scales"]  # dequantised, NaN = no data')
    if result.evaluation is not None:  # evaluation.enabled (the demo): table and map preview
        ev = result.evaluation
        print()
        print(ev.table)
        print(f"Report: {ev.uri}")
        if ev.map_png:
            print(f"Predicted map preview: {ev.map_png}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tessera", description="Build TESSERA embedding maps as a Prefect workflow.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="Build the built-in synthetic demo region (no account, no network).")
    _build_args(p)
    p = sub.add_parser("build", help="Build one region and year from a config file and/or options.")
    _build_args(p)
    p = sub.add_parser("plan", help="Validate a config and list its tiles, without building.")
    _build_args(p)
    p = sub.add_parser("config", help="Print a starting build config, the demo's, or the JSON schema.")
    p.add_argument("--demo", action="store_true", help="Print the demo config.")
    p.add_argument("--schema", action="store_true", help="Print the JSON schema (the UI form).")
    p = sub.add_parser("serve", help="Serve the deployments to the Prefect API (PREFECT_API_URL).")
    p = sub.add_parser("server", help="Start a local Prefect server (UI) and serve the deployments.")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--gpu-limit", type=int, default=1, help="Concurrent training runs.")
    p.add_argument("--build-limit", type=int, default=2, help="Concurrent builds in backfills.")
    p.add_argument("--sentinelhub-limit", type=int, default=2,
                   help="Tiles acquired from Sentinel Hub at once, across all builds.")
    p.add_argument("--stac-limit", type=int, default=4,
                   help="Tiles read from STAC catalogues at once, across all builds.")
    p = sub.add_parser("shub-endpoint", help="Serve a local Sentinel Hub endpoint (the synthetic "
                       "Earth) on loopback; credentials from SH_CLIENT_ID/SH_CLIENT_SECRET.")
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "localhost", "::1"))
    p.add_argument("--port", type=int, default=8765, help="TCP port (0 = any free port).")
    p.add_argument("--seed", type=int, default=0, help="Synthetic world seed.")
    p.add_argument("--months", type=int, nargs="*", help="Serve only acquisitions in these months.")
    p.add_argument("--fault-rate", type=float, default=0.0,
                   help="Chance of a transient fault (429, 5xx, slow, truncated, corrupt, expired token).")
    p.add_argument("--permanent", choices=("401", "400"), help="Reject every token (401) or request (400).")
    p = sub.add_parser("stac-endpoint", help="Serve a local STAC API + SAS token + COG endpoint "
                       "(the synthetic Earth, Planetary Computer and Earth Search conventions) on "
                       "loopback.")
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "localhost", "::1"))
    p.add_argument("--port", type=int, default=8766, help="TCP port (0 = any free port).")
    p.add_argument("--seed", type=int, default=0, help="Synthetic world seed.")
    p.add_argument("--months", type=int, nargs="*", help="Serve only acquisitions in these months.")
    p.add_argument("--fault-rate", type=float, default=0.0,
                   help="Chance of a transient COG fault (5xx, 429, dropped connection, cut body).")
    p.add_argument("--permanent", choices=("401", "403", "missing-asset"),
                   help="Refuse every COG request (401/403) or lose the B8A assets (404).")
    p = sub.add_parser("evaluate", help="Label-efficiency evaluation of a build (its config; the "
                       "demo's by default) against raw-feature and random-init baselines.")
    _build_args(p)
    p = sub.add_parser("train-head", help="Train a classification/regression head on a label "
                       "file (GeoParquet, GeoPackage, GeoJSON, CSV) over a published store.")
    p.add_argument("--labels", required=True, help="Label file (local path or s3://).")
    p.add_argument("--column", required=True, help="Class or value column.")
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--output", help="Output root holding {year}.zarr (default tessera-out).")
    p.add_argument("--work", help="Work root.")
    p.add_argument("--name", default="head", help="Artifact name (heads/NAME/VERSION).")
    p.add_argument("--head", choices=("linear", "random_forest", "gradient_boosting", "mlp"),
                   default="linear")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Any train-head config field, e.g. split.by=polygon or id_column=pid.")
    p = sub.add_parser("predict-map", help="Apply a saved head to a published store (Zarr map, "
                       "optional COG).")
    p.add_argument("head_uri", help="The head folder (heads/NAME/VERSION).")
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--output", help="Output root holding {year}.zarr (default tessera-out).")
    p.add_argument("--work", help="Work root.")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("MIN_LON", "MIN_LAT", "MAX_LON", "MAX_LAT"))
    p.add_argument("--cog", action="store_true", help="Also write a Cloud-Optimised GeoTIFF.")
    p.add_argument("--map", dest="map_uri", help="Where the map's Zarr goes.")
    p = sub.add_parser("export-dpixels", help="Export a tile's d-pixel group to reference npy folders.")
    p.add_argument("group_uri")
    p.add_argument("dest")
    p.add_argument("--patch-px", type=int, default=500)
    p = sub.add_parser("import-dpixels", help="Import a reference d-pixel folder into a d-pixel group.")
    p.add_argument("folder")
    p.add_argument("group_uri")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``tessera`` command; returns the exit status.

    0 ok, 2 bad input, 3 no server, 4 published but an evaluation gate failed.
    """
    t0 = time.perf_counter()
    for name, value in CLI_PREFECT_DEFAULTS.items():  # before Prefect is imported
        os.environ.setdefault(name, value)
    from tasks.threads import quiet_openmp

    quiet_openmp()  # before torch is imported: OpenMP threads sleep while they wait
    try:
        a = _parser().parse_args(argv)
    except SystemExit as exc:  # a one-line usage error (2); --help exits 0 as argparse does
        if exc.code in (0, None):
            raise
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if a.cmd in API_COMMANDS and not os.environ.get("PREFECT_API_URL"):
        _use_running_server()  # before Prefect is imported, so all of Prefect sees it
    try:
        return _dispatch(a, t0)
    except (KeyboardInterrupt, StopRequested):
        print("\nstopped: committed stages are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except FactoryError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SERVER


API_COMMANDS = ("demo", "build", "evaluate", "train-head", "predict-map")
"""Commands that run a flow (they need a Prefect API)."""


def _use_running_server() -> None:
    """Use the server of a running ``tessera server`` on this machine, if there is one, rather
    than start a temporary server (deployments/server.py)."""
    from deployments.server import running_server

    if (url := running_server()) is not None:
        os.environ["PREFECT_API_URL"] = url
        print(f"Using the Prefect server of 'tessera server' at {url}", file=sys.stderr)


def _dispatch(a: argparse.Namespace, t0: float) -> int:
    if a.cmd in ("demo", "build"):
        return _run_build(_load(a, demo=a.cmd == "demo"), t0)
    if a.cmd == "plan":
        cfg = _load(a, demo=a.config is None and not a.bbox)
        tiles = _tile_plan(cfg)
        print(f"{len(tiles)} tile(s) of {cfg.tile_size_px} px for {cfg.region.name} {cfg.year}:")
        for t in tiles:
            print(f"  {t.id}  {t.crs}  bounds {t.bounds}")
        return 0
    if a.cmd == "config":
        from tasks.config import BuildConfig, demo_config, starting_config

        if a.schema:
            print(json.dumps(BuildConfig.model_json_schema(), indent=1))
        elif a.demo:
            print("# The demo: two tiles of the synthetic Earth near Cambridge, UK (tessera demo).")
            print(yaml.safe_dump(demo_config().model_dump(mode="json"), sort_keys=False))
        else:
            print("# A starting build config: set region.bbox (or region.geojson) and year; every")
            print("# other field shows its default ('tessera config --schema' describes them).")
            print(yaml.safe_dump(starting_config(), sort_keys=False))
        return 0
    if a.cmd == "serve":
        from deployments.serve import serve_all

        serve_all()
        return 0
    if a.cmd == "server":
        import os

        from deployments.server import ensure_limits, forget_server, record_server, start_server

        proc = start_server(port=a.port)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{a.port}/api"
        print(f"Prefect UI: http://127.0.0.1:{a.port}  (Ctrl-C stops the server and the deployments)")
        try:
            from deployments.serve import serve_all

            ensure_limits(gpu=a.gpu_limit, builds=a.build_limit, sentinelhub=a.sentinelhub_limit,
                          stac=a.stac_limit)
            # builds from other terminals use this server (no PREFECT_API_URL needed)
            record_server(os.environ["PREFECT_API_URL"], os.getpid())
            serve_all()
        finally:
            forget_server(os.getpid())
            proc.terminate()
            proc.wait(timeout=30)
        return 0
    if a.cmd == "shub-endpoint":
        return _shub_endpoint(a)
    if a.cmd == "stac-endpoint":
        return _stac_endpoint(a)
    if a.cmd in ("evaluate", "train-head", "predict-map"):
        return _heads_command(a)
    if a.cmd == "export-dpixels":
        from tasks.config import StorageConfig
        from tasks.dpixel_folder import export_dpixel_folders

        paths = export_dpixel_folders(a.group_uri, a.dest, StorageConfig(), patch_px=a.patch_px)
        print("\n".join(str(p) for p in paths))
        return 0
    if a.cmd == "import-dpixels":
        from tasks.config import StorageConfig
        from tasks.dpixel_folder import import_dpixel_folder

        print(import_dpixel_folder(a.folder, a.group_uri, StorageConfig()))
        return 0
    raise AssertionError(a.cmd)  # pragma: no cover


def _heads_command(a: argparse.Namespace) -> int:
    """``evaluate``, ``train-head``, ``predict-map``: validate, start the API, run the flow."""
    from pydantic import ValidationError

    from tasks.config import _deep_merge, config_error_from

    storage = {k: v for k, v in (("output_uri", a.output), ("work_uri", a.work)) if v}
    try:
        if a.cmd == "evaluate":
            cfg = _load(a, demo=a.config is None and not a.bbox)
            cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
                update={"enabled": True})})
        elif a.cmd == "train-head":
            from tasks.heads.config import TrainHeadConfig, parse_head_overrides

            base = {"labels_uri": a.labels, "label_column": a.column, "year": a.year,
                    "name": a.name, "head": {"kind": a.head}, "storage": storage}
            cfg = TrainHeadConfig.model_validate(_deep_merge(base, parse_head_overrides(a.set)))
        else:
            from tasks.heads.config import PredictMapConfig

            cfg = PredictMapConfig(head_uri=a.head_uri, year=a.year, storage=storage,
                                   bbox=a.bbox, cog=a.cog, map_uri=a.map_uri)
    except ValidationError as exc:
        raise config_error_from(exc) from None
    from tasks.heads.stages import check_inputs
    from tasks.stop import install_stop_handlers

    check_inputs(cfg)  # bad labels or a missing head fail here, before any server starts
    install_stop_handlers()
    ensure_prefect_api()
    from flows import heads

    if a.cmd == "evaluate":
        ref = heads.evaluate(config=cfg)
        print(ref.markdown)
        print(f"Report, curves and confusion matrix: {ref.uri}")
        if ref.map_uri:
            print(f"Predicted map: {ref.map_uri} (preview {ref.map_png})")
    elif a.cmd == "train-head":
        ref = heads.train_head(config=cfg)
        print(f"Head {ref.uri}: {ref.n_samples} samples of {ref.n_polygons} polygons, "
              f"held-out {ref.metrics}")
        print(f"Map it with: tessera predict-map {ref.uri} --year {ref.year}")
    else:
        ref = heads.predict_map(config=cfg)
        print(f"Map {ref.uri}: {ref.n_valid} pixels, groups {', '.join(ref.groups)}"
              + (f"; COG {', '.join(ref.cog_uris)}" if ref.cog_uris else ""))
    return 0


def _shub_endpoint(a: argparse.Namespace) -> int:
    import os

    from pydantic import ValidationError

    from tasks.config import config_error_from
    from tasks.sources.shub_endpoint import EndpointConfig, FaultConfig, LocalEndpoint

    try:
        cfg = EndpointConfig(
            host=a.host, port=a.port, world={"seed": a.seed}, months=a.months or None,
            client_id=os.environ.get("SH_CLIENT_ID", "local-client"),
            client_secret=os.environ.get("SH_CLIENT_SECRET", "local-secret"),
            faults=FaultConfig(rate=a.fault_rate, permanent=a.permanent),
        )
    except ValidationError as exc:
        raise config_error_from(exc) from None
    ep = LocalEndpoint(cfg).start()
    secret = "from $SH_CLIENT_SECRET" if "SH_CLIENT_SECRET" in os.environ else "'local-secret' (default)"
    print(f"Local Sentinel Hub endpoint at {ep.url} (token URL {ep.url}/oauth/token)")
    print(f"client id {cfg.client_id!r}, secret {secret}. Build against it with:")
    print(f"  tessera demo --set source.kind=sentinelhub --set source.sentinelhub.preset=custom "
          f"--set source.sentinelhub.base_url={ep.url}")
    print("Ctrl-C stops it.", flush=True)
    ep.serve_forever()
    return 0


def _stac_endpoint(a: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.config import config_error_from
    from tasks.sources.stac_endpoint import EndpointConfig, FaultConfig, LocalEndpoint

    try:
        cfg = EndpointConfig(host=a.host, port=a.port, world={"seed": a.seed},
                             months=a.months or None,
                             faults=FaultConfig(rate=a.fault_rate, permanent=a.permanent))
    except ValidationError as exc:
        raise config_error_from(exc) from None
    ep = LocalEndpoint(cfg).start()
    print(f"Local STAC endpoint at {ep.url}: Planetary Computer-like API {ep.url}/pc/api/stac/v1 "
          f"(SAS tokens {ep.url}/pc/api/sas/v1/token), Earth Search-like API {ep.url}/es/v1.")
    for preset in ("planetary-computer", "earth-search"):
        sets = " ".join(f"--set source.stac.{k}={v}" for k, v in ep.stac_config(preset).items())
        print(f"Build against it as {preset}:\n  tessera demo --set source.kind=stac {sets}")
    print("Ctrl-C stops it.", flush=True)
    ep.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
