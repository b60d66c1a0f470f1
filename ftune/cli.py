"""The ``ftune`` command: the engine's commands (train, predict, lint, export, backbones) and the
service's processes (up, api, serve, worker).

This module and the launcher are the only ones that know both the service and the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from ftune.models.cli import HANDLED_ERRORS, build_parser, run
from ftune.models.settings import EngineSettings, configure, load_settings
from ftune.processes import LaunchError
from ftune.service import settings as service_settings
from ftune.service.settings import Settings


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

    db = sub.add_parser("db", help="the database schema: upgrade, current, downgrade")
    db_sub = db.add_subparsers(required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="upgrade the schema (what `ftune up` and "
                                "`ftune api` do on start)")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.add_argument("--home")
    upgrade.set_defaults(run=_db_upgrade)
    current = db_sub.add_parser("current", help="the schema revision of the database")
    current.add_argument("--home")
    current.set_defaults(run=_db_current)
    downgrade = db_sub.add_parser("downgrade", help="go back to REVISION (roll back a release: "
                                  "run this with the newer release, then install the older)")
    downgrade.add_argument("revision")
    downgrade.add_argument("--home")
    downgrade.set_defaults(run=_db_downgrade)

    worker = sub.add_parser("worker", help="run one training worker (needs REDIS_URL)")
    worker.add_argument("--device", help="cpu, cuda, cuda:1 (default: FTUNE_DEVICE, else "
                        "automatic)")
    worker.add_argument("--name", help="Celery node name (default: random@host)")
    worker.add_argument("--home")
    worker.set_defaults(run=_worker)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int)
    parser.add_argument("--host")
    parser.add_argument("--home")


def _settings(args: argparse.Namespace, **engine_overrides: object) -> Settings:
    """The process's settings, validated once; the engine gets its part of them."""
    overrides = {k: v for k, v in engine_overrides.items() if v is not None}
    engine = load_settings(EngineSettings, **overrides)
    settings = service_settings.load(**({"home": args.home} if args.home else {}),
                                     engine=engine)
    configure(settings.engine)
    return settings


def _up(args: argparse.Namespace) -> int:
    from ftune.launcher import up

    if args.workers < 0:
        raise ValueError("--workers must be 0 or more")
    return up(_settings(args), workers=args.workers, host=args.host, port=args.port)


def _api(args: argparse.Namespace) -> int:
    return _run_server(args, serve_only=False)


def _serve(args: argparse.Namespace) -> int:
    return _run_server(args, serve_only=True)


def _run_server(args: argparse.Namespace, *, serve_only: bool) -> int:
    import uvicorn

    from ftune.service.app import create_app

    settings = _settings(args)
    if not serve_only:
        settings.broker_url  # noqa: B018 - fail now with a clear message, not on the first job
    uvicorn.run(create_app(settings, serve_only=serve_only),
                host=args.host or settings.api_host,
                port=settings.api_port if args.port is None else args.port,
                log_level="info" if args.verbose else "warning")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from ftune.workers.main import run_worker

    settings = _settings(args, device=args.device)
    settings.broker_url  # noqa: B018
    logging.getLogger().setLevel(logging.INFO)
    run_worker(settings, name=args.name)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from ftune.service.db import migrate

    with _engine(args) as engine:
        before, after = migrate.upgrade(engine, args.revision)
    print(f"database at revision {after}" + (f" (was {before})" if before != after else
                                             " (already current)"))
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from ftune.service.db import migrate

    with _engine(args) as engine:
        current = migrate.current_revision(engine)
    head = migrate.head_revision()
    if current == head:
        print(f"{current} (current)")
        return 0
    print(f"{current or 'none (no ftune schema yet)'}: this release needs {head}; run "
          "`ftune db upgrade`")
    return 1


def _db_downgrade(args: argparse.Namespace) -> int:
    from ftune.service.db import migrate

    with _engine(args) as engine:
        before, after = migrate.downgrade(engine, args.revision)
    print(f"database at revision {after or 'none'} (was {before})")
    return 0


@contextlib.contextmanager
def _engine(args: argparse.Namespace) -> Iterator[Engine]:
    from ftune.service.db.session import make_engine

    engine = make_engine(_settings(args).resolved_database_url)
    try:
        yield engine
    except OperationalError as exc:
        raise LaunchError(f"cannot reach the database: {exc.orig}") from None
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    from ftune.service.db.migrate import SchemaError

    return run(build_parser(add_service_commands), argv,
               handled=(*HANDLED_ERRORS, LaunchError, SchemaError))


if __name__ == "__main__":
    sys.exit(main())
