"""The ``ftune`` command: the engine's commands (train, predict, lint, export, backbones), the
service's processes (up, api, serve, worker) and ``remote`` (the API from the command line).

This module and the launcher are the only ones that know both the service and the workers.
Everything is imported when its command runs: ``ftune remote`` works from the light install
(the client and httpx only), and the rest says so there instead of failing on an import.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftune.service.settings import Settings

LIGHT_INSTALL = ("ftune: this install has the API client only (`pip install ftune`), so only "
                 "`ftune remote ...` works here; for the engine and the service, install "
                 "`pip install 'ftune[server]'` (missing: {missing})")


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run everything: private Redis, worker(s), API, SQLite")
    up.add_argument("--port", type=int, help="API port (default 8000, FTUNE_API_PORT)")
    up.add_argument("--host", help="API address (default 127.0.0.1, FTUNE_API_HOST)")
    up.add_argument("--home", help="data directory (default ./var, FTUNE_HOME)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.set_defaults(run=_up)

    api = sub.add_parser("api", help="run the HTTP API only (needs REDIS_URL)")
    _add_server_options(api)
    api.set_defaults(run=_api)

    serve = sub.add_parser("serve", help="run a predict-only server (no Redis, no training)")
    _add_server_options(serve)
    serve.set_defaults(run=_serve)

    storage = sub.add_parser("storage", help="the blob store (FTUNE_STORAGE)")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True)
    check = storage_sub.add_parser("check", help="write, read back and delete a probe in "
                                   "the configured store, from this process's host")
    check.add_argument("--home")
    check.set_defaults(run=_storage_check)

    worker = sub.add_parser("worker", help="run one training worker (needs REDIS_URL)")
    worker.add_argument("--device", help="cpu, cuda, cuda:1 (default: FTUNE_DEVICE, else "
                        "automatic)")
    worker.add_argument("--devices", help="devices a job may train on here: N (the first N "
                        "GPUs, or N CPU ranks with --device cpu), all (every visible GPU) or "
                        "GPU numbers 0,1 (this worker then sees only those; workers on one "
                        "machine can split its GPUs: --devices 0,1 and --devices 2,3). Jobs "
                        "asking for d devices go only to workers with at least d (default: "
                        "FTUNE_WORKER_DEVICES, else one)")
    worker.add_argument("--name", help="Celery node name (default: random@host)")
    worker.add_argument("--home")
    worker.set_defaults(run=_worker)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int)
    parser.add_argument("--host")
    parser.add_argument("--home")
    parser.add_argument("--forwarded-allow-ips", metavar="IPS",
                        help="behind a TLS-terminating proxy: the proxy addresses whose "
                        "X-Forwarded-* headers are trusted (default: 127.0.0.1)")


def add_remote_command(sub: argparse._SubParsersAction) -> None:
    # Listed for --help only: main() hands `ftune remote ...` to the client before parsing.
    sub.add_parser("remote", help="the API from the command line: login, datasets, jobs, "
                   "models (ftune remote --help)", add_help=False)


def _up(args: argparse.Namespace) -> int:
    from ftune.config import process_settings
    from ftune.launcher import up

    if args.workers < 0:
        raise ValueError("--workers must be 0 or more")
    settings = process_settings(home=args.home, api_host=args.host)
    _log_format(settings)
    return up(settings, workers=args.workers, host=args.host, port=args.port)


def _api(args: argparse.Namespace) -> int:
    return _run_server(args, serve_only=False)


def _serve(args: argparse.Namespace) -> int:
    return _run_server(args, serve_only=True)


def _run_server(args: argparse.Namespace, *, serve_only: bool) -> int:
    from ftune.config import process_settings
    from ftune.service.app import create_app
    from ftune.service.server import serve

    settings = process_settings(home=args.home, api_host=args.host)
    _log_format(settings)
    # torch loads with the first model: its OpenMP threads then sleep between forwards rather
    # than spin on the cores the event loop and the other lanes need (as ONNX Runtime's do).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not serve_only:
        settings.broker_url  # noqa: B018 - fail now with a clear message, not on the first job
    serve(create_app(settings, serve_only=serve_only), settings,
          port=settings.api_port if args.port is None else args.port,
          forwarded_allow_ips=args.forwarded_allow_ips,
          log_level="info" if args.verbose else "warning")
    return 0


def _log_format(settings: Settings) -> None:
    from ftune.service.logs import use_log_format

    use_log_format(settings.log_format)


def _storage_check(args: argparse.Namespace) -> int:
    from ftune.config import process_settings
    from ftune.service.blobs import BlobError, open_store

    settings = process_settings(home=args.home)
    store = open_store(settings.storage, settings.resolved_home)
    try:
        store.check()
    except BlobError as exc:
        print(f"storage unusable: {exc}", file=sys.stderr)
        return 1
    print(f"storage ok: {store.location} (wrote, read back and deleted a probe)")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from ftune.config import process_settings
    from ftune.workers.main import run_worker

    settings = process_settings(home=args.home, device=args.device)
    _log_format(settings)
    settings.broker_url  # noqa: B018
    logging.getLogger().setLevel(logging.INFO)
    run_worker(settings, name=args.name, devices=args.devices)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["remote"]:
        from ftune.client.cli import main as remote_main

        return remote_main(argv[1:])
    try:
        from ftune.admin import add_admin_commands
        from ftune.models.cli import HANDLED_ERRORS, build_parser, run
        from ftune.processes import LaunchError
        from ftune.service.db.migrate import SchemaError
        from ftune.service.errors import ServiceError
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("ftune"):
            print(LIGHT_INSTALL.format(missing=exc.name), file=sys.stderr)
            return 2
        raise
    return run(build_parser(add_service_commands, add_admin_commands, add_remote_command), argv,
               handled=(*HANDLED_ERRORS, LaunchError, SchemaError, ServiceError))


if __name__ == "__main__":
    sys.exit(main())
