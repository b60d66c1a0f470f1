"""Server-side administration, run where the database is reachable (operators):
``ftune db`` (schema), ``ftune keys``, ``ftune tenants`` and ``ftune cache`` (what is kept
derived from datasets, such as decoded images)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from ftune.config import process_settings
from ftune.processes import LaunchError

PAGE = 500  # rows read at a time by the listing commands


def add_admin_commands(sub: argparse._SubParsersAction) -> None:
    _add_db_commands(sub)
    _add_key_commands(sub)
    _add_tenant_commands(sub)
    _add_cache_commands(sub)
    _add_backup_commands(sub)


def _command(group: argparse._SubParsersAction, name: str, run: object,
             help: str) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help)
    parser.add_argument("--home", help="data directory (FTUNE_HOME); the database is "
                        "DATABASE_URL or HOME/ftune.db")
    parser.set_defaults(run=run)
    return parser


def _add_db_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("db", help="the database schema: upgrade, current, downgrade"
                           ).add_subparsers(required=True, metavar="ACTION")
    upgrade = _command(group, "upgrade", _db_upgrade,
                       "upgrade the schema (what `ftune up` and `ftune api` do on start)")
    upgrade.add_argument("revision", nargs="?", default="head")
    _command(group, "current", _db_current, "the schema revision of the database")
    downgrade = _command(group, "downgrade", _db_downgrade, "go back to REVISION (roll back "
                         "a release: run this with the newer release, then install the older)")
    downgrade.add_argument("revision")


def _add_key_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("keys", help="API keys (operators, on the server)"
                           ).add_subparsers(required=True, metavar="ACTION")
    create = _command(group, "create", _keys_create,
                      "make a key and print it (once: only its hash is stored)")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--operator", action="store_true", help="an operator key (all tenants)")
    who.add_argument("--tenant", help="the tenant (name or id) the key belongs to")
    create.add_argument("--role", choices=["admin", "member"], default="admin")
    create.add_argument("--name", default="made on the server", help="what the key is for")
    create.add_argument("--expires-in-days", type=float, help="stop working after this")
    listing = _command(group, "list", _keys_list, "keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's")
    listing.add_argument("--all", action="store_true", help="revoked ones too")
    revoke = _command(group, "revoke", _keys_revoke, "revoke a key by its id")
    revoke.add_argument("key_id")


def _add_tenant_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("tenants", help="tenants (operators, on the server)"
                           ).add_subparsers(required=True, metavar="ACTION")
    create = _command(group, "create", _tenants_create, "a new tenant")
    create.add_argument("name")
    _command(group, "list", _tenants_list, "every tenant")


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("cache", help="decoded images kept for later jobs (HOME/cache or "
                           "FTUNE_CACHE_DIR)").add_subparsers(required=True, metavar="ACTION")
    _command(group, "list", _cache_list, "entries, least recently used first, and the bytes "
             "each tenant's jobs made")
    clean = _command(group, "clean", _cache_clean, "remove entries (they are rebuilt when "
                     "needed): all of them, or one tenant's")
    clean.add_argument("--tenant", help="only the entries this tenant id's jobs made")


def _add_backup_commands(sub: argparse._SubParsersAction) -> None:
    from ftune.backup import run_backup, run_restore

    backup = _command(sub, "backup", run_backup, "a consistent backup of the running service "
                      "(database and blobs) into the new folder DEST")
    backup.add_argument("dest", metavar="DEST")
    restore = _command(sub, "restore", run_restore, "bring a backup back into an empty data "
                       "directory (and empty database); running jobs are queued again")
    restore.add_argument("source", metavar="SRC")


def _store(args: argparse.Namespace):  # -> DerivedStore
    from ftune.models.derived.store import DerivedStore

    settings = process_settings(home=args.home)
    root = settings.engine.cache_dir or settings.resolved_home / "cache"
    return DerivedStore(root, settings.engine.cache_bytes)


def _cache_list(args: argparse.Namespace) -> int:
    store = _store(args)
    for entry in store.entries():
        print(f"{entry.kind}/{entry.key}  {entry.bytes / 2**20:.1f} MB  owner={entry.owner}")
    usage = store.usage_by_owner()
    total = sum(usage.values())
    print(f"total {total / 2**20:.1f} MB of {store.max_bytes / 2**20:.0f} MB in {store.root}"
          + "".join(f"; {owner}: {n / 2**20:.1f} MB" for owner, n in usage.items()))
    return 0


def _cache_clean(args: argparse.Namespace) -> int:
    removed, freed = _store(args).clean(owner=args.tenant)
    print(f"removed {removed} entries, {freed / 2**20:.1f} MB")
    return 0


@contextlib.contextmanager
def _engine(args: argparse.Namespace) -> Iterator[Engine]:
    from ftune.service.db.session import make_engine

    engine = make_engine(process_settings(home=args.home).resolved_database_url)
    try:
        yield engine
    except OperationalError as exc:
        raise LaunchError(f"cannot reach the database: {exc.orig}") from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def _session(args: argparse.Namespace) -> Iterator:
    """A session on an upgraded database (as the API would leave it)."""
    from ftune.service.db import migrate
    from ftune.service.db.session import Database

    db = Database(process_settings(home=args.home).resolved_database_url,
                  prepare=migrate.upgrade)
    try:
        with db.session() as session:
            yield session
    except OperationalError as exc:
        raise LaunchError(f"cannot reach the database: {exc.orig}") from None
    finally:
        db.dispose()


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


def _keys_create(args: argparse.Namespace) -> int:
    from ftune.service.auth.keys import create_key
    from ftune.service.auth.principal import Role
    from ftune.service.auth.tenants import get_tenant
    from ftune.service.db.tables import utcnow

    expires = (utcnow() + timedelta(days=args.expires_in_days)
               if args.expires_in_days else None)
    with _session(args) as session:
        tenant_id = None if args.operator else get_tenant(session, args.tenant).id
        role = Role.OPERATOR if args.operator else Role(args.role)
        key, plaintext = create_key(session, role=role, tenant_id=tenant_id, name=args.name,
                                    expires_at=expires)
        print(f"{role} key {key.id} for {'every tenant' if tenant_id is None else args.tenant}"
              f"; shown once, keep it safe:\n{plaintext}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from ftune.service.auth.keys import list_keys
    from ftune.service.auth.principal import LOCAL_USER
    from ftune.service.auth.tenants import get_tenant
    from ftune.service.pages import every_row

    with _session(args) as session:
        tenant_id = get_tenant(session, args.tenant).id if args.tenant else None
        for key in every_row(lambda cursor: list_keys(session, LOCAL_USER, tenant_id,
                                                      include_revoked=args.all,
                                                      limit=PAGE, cursor=cursor)):
            state = "revoked" if key.revoked_at else "active"
            print(f"{key.id}  {key.prefix}…  {key.role:8} tenant={key.tenant_id or '-'}  "
                  f"{state}  {key.name}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from ftune.service.auth.keys import revoke_key
    from ftune.service.auth.principal import LOCAL_USER

    with _session(args) as session:
        revoke_key(session, LOCAL_USER, args.key_id)
    print(f"key {args.key_id} revoked (API processes refuse it within a second)")
    return 0


def _tenants_create(args: argparse.Namespace) -> int:
    from ftune.service.auth.tenants import create_tenant

    with _session(args) as session:
        tenant = create_tenant(session, name=args.name)
        print(f"tenant {tenant.name} ({tenant.id}); make its first key with "
              f"`ftune keys create --tenant {tenant.name} --role admin`")
    return 0


def _tenants_list(args: argparse.Namespace) -> int:
    from ftune.service.auth.tenants import list_tenants
    from ftune.service.pages import every_row

    with _session(args) as session:
        for tenant in every_row(lambda cursor: list_tenants(session, limit=PAGE,
                                                            cursor=cursor)):
            print(f"{tenant.id}  {tenant.name}  quotas={tenant.quotas or 'defaults'}")
    return 0
