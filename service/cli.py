"""``ftune``: the engine's commands (train, predict, backbones) plus the service's (up, api,
worker)."""

from __future__ import annotations

import argparse
import sys

from models.cli import HANDLED_ERRORS, build_parser, run
from service.launcher import LaunchError
from service.settings import Settings


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run everything: private Redis, worker(s), API, SQLite")
    up.add_argument("--port", type=int, help="API port (default 8000, FTUNE_API_PORT)")
    up.add_argument("--host", help="API address (default 127.0.0.1, FTUNE_API_HOST)")
    up.add_argument("--home", help="data directory (default ./var, FTUNE_HOME)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.set_defaults(run=_up)

    api = sub.add_parser("api", help="run the HTTP API only (needs REDIS_URL)")
    api.add_argument("--port", type=int)
    api.add_argument("--host")
    api.add_argument("--home")
    api.set_defaults(run=_api)

    serve = sub.add_parser("serve", help="run a predict-only server (no Redis, no training)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--host")
    serve.add_argument("--home")
    serve.set_defaults(run=_serve)

    worker = sub.add_parser("worker", help="run one training worker (needs REDIS_URL)")
    worker.add_argument("--device", help="cpu, cuda, cuda:1 (default: automatic)")
    worker.add_argument("--name", help="Celery node name (default: random@host)")
    worker.add_argument("--home")
    worker.set_defaults(run=_worker)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(home=args.home) if args.home else Settings()


def _up(args: argparse.Namespace) -> int:
    from service.launcher import up

    if args.workers < 0:
        raise ValueError("--workers must be 0 or more")
    return up(_settings(args), workers=args.workers, host=args.host, port=args.port)


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(args)
    settings.broker_url  # noqa: B018 - fail now with a clear message, not on the first job
    uvicorn.run(create_app(settings), host=args.host or settings.api_host,
                port=settings.api_port if args.port is None else args.port,
                log_level="info" if args.verbose else "warning")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(args)
    uvicorn.run(create_app(settings, serve_only=True), host=args.host or settings.api_host,
                port=settings.api_port if args.port is None else args.port,
                log_level="info" if args.verbose else "warning")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from workers.main import run_worker

    settings = _settings(args)
    settings.broker_url  # noqa: B018
    logging.getLogger().setLevel(logging.INFO)
    run_worker(settings, device=args.device, name=args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(add_service_commands), argv, handled=(*HANDLED_ERRORS, LaunchError))


if __name__ == "__main__":
    sys.exit(main())
