"""``ftune up``: a private Redis (when REDIS_URL is unset), N workers and the API, supervised.

Ctrl-C or SIGTERM reaches only this process, which then stops the children in order: workers
first (a running job goes back to the queue at the next batch), then the API, then Redis. A
worker that dies (killed, out of memory) is restarted; its job resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import time
from typing import NoReturn

from ftune.processes import OPERATOR_KEY_FILE, STATE_FILE, Child, LaunchError, Stack, port_is_free
from ftune.service.auth.keys import create_key, operator_keys
from ftune.service.auth.principal import Role
from ftune.service.db import migrate
from ftune.service.db.session import Database, make_engine
from ftune.service.settings import Settings

log = logging.getLogger(__name__)

MAX_RESTART_DELAY_S = 60  # between restarts of a worker that keeps dying


class _Stop(BaseException):
    """Raised by the signal handler; a BaseException so no ``except Exception`` eats it."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def up(settings: Settings, *, workers: int = 1, host: str | None = None,
       port: int | None = None) -> int:
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    if not port_is_free(host, port):
        raise LaunchError(f"{host}:{port} is already in use; pass --port or stop what uses it")
    stack = _stack(settings)
    _upgrade_database(settings)  # the schema is current before any child starts
    key_note = ensure_operator_key(settings)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _start(stack, workers=workers, host=host, port=port)
        _write_state(stack)
        print(f"ftune is up: {stack.api_url} (API docs at {stack.api_url}/docs); data in "
              f"{stack.home}; Ctrl-C stops it\n{key_note}", flush=True)
        _supervise(stack)
    except _Stop as stop:
        print(f"{stop}: stopping workers, API and Redis", file=sys.stderr, flush=True)
        return 0
    finally:
        # Further Ctrl-C presses must not interrupt the orderly stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop_all()
        (stack.home / STATE_FILE).unlink(missing_ok=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _upgrade_database(settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


def ensure_operator_key(settings: Settings) -> str:
    """On first start, make an operator key, print it once and keep it in
    HOME/operator.key (mode 0600); later starts say where it is."""
    path = settings.resolved_home / OPERATOR_KEY_FILE
    if settings.auth == "off":
        return "API keys are off (FTUNE_AUTH=off): requests need no key"
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as session:
            if operator_keys(session):
                where = f"in {path}" if path.is_file() else "with whoever made it"
                return (f"operator key: {where} (send it as `Authorization: Bearer …`; make "
                        "more with `ftune keys create`)")
            _, plaintext = create_key(session, role=Role.OPERATOR, tenant_id=None,
                                      name="first operator (ftune up)")
    finally:
        db.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(plaintext + "\n")
    os.chmod(path, 0o600)
    return (f"operator key (shown once, also saved in {path}, readable only by you):\n"
            f"  {plaintext}\n  use it as `Authorization: Bearer {plaintext[:8]}…`; make team "
            "keys with POST /v1/keys or `ftune keys create`")


def _stack(settings: Settings) -> Stack:
    env = {}
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    return Stack(settings.resolved_home, env=env, redis_url=settings.redis_url)


def _start(stack: Stack, *, workers: int, host: str, port: int) -> None:
    if not stack.redis_url:
        # Append-only, so queued messages survive a restart of `ftune up`; a fresh random
        # password each start, which only the children learn.
        stack.start_redis(persistent=True, password=secrets.token_urlsafe(24))
    for _ in range(workers):
        stack.start_worker(wait=False)
    stack.start_api(host, port)


def _write_state(stack: Stack) -> None:
    """Where everything runs, for tools and tests; it holds the Redis password, so 0600."""
    path = stack.home / STATE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": stack.api_url, "redis_url": stack.redis_url, "pid": os.getpid(),
                   "children": {c.name: c.pid for c in stack.children}}, out, indent=2)


def _supervise(stack: Stack) -> NoReturn:
    """Restart workers that die, waiting longer after each recent death (a job that keeps
    killing its worker is failed by the reconciler after FTUNE_MAX_ATTEMPTS runs); the API and
    Redis stay up meanwhile. Any other death stops everything."""
    deaths: list[float] = []
    pending: list[tuple[float, Child]] = []  # (when, dead worker) waiting for its restart
    while True:
        waiting = {id(child) for _, child in pending}
        for dead in [c for c in stack.children if not c.alive() and id(c) not in waiting]:
            if not dead.name.startswith("worker"):
                raise LaunchError(f"{dead.name} exited unexpectedly with code "
                                  f"{dead.process.returncode}; stopping everything")
            now = time.monotonic()
            deaths = [t for t in deaths if t > now - 600] + [now]
            delay = min(MAX_RESTART_DELAY_S, len(deaths) - 1)  # a second more each time
            print(f"{dead.name} exited with code {dead.process.returncode}; restarting it"
                  f"{f' in {delay} s' if delay else ''}", file=sys.stderr, flush=True)
            pending.append((now + delay, dead))
        for due in [p for p in pending if p[0] <= time.monotonic()]:
            pending.remove(due)
            stack.restart(due[1])
            _write_state(stack)  # the new pid
        time.sleep(0.5)
