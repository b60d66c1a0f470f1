"""``ftune backup DEST`` and ``ftune restore SRC``, run where the database and the blob store
are reachable (the work is in ``service/backup.py`` and ``service/restore.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ftune.config import process_settings
from ftune.processes import LaunchError


def run_backup(args: argparse.Namespace) -> int:
    from ftune.service.backup import take_backup
    from ftune.service.backup_manifest import BackupError
    from ftune.service.blobs.open import open_store

    settings = process_settings(home=args.home)
    try:
        manifest = take_backup(settings.resolved_database_url,
                               open_store(settings.storage, settings.resolved_home),
                               Path(args.dest))
    except BackupError as exc:
        raise LaunchError(f"backup failed: {exc}") from None
    stored = ("copied" if manifest.storage["mode"] == "copied"
              else f"listed (they stay in {manifest.storage['location']})")
    print(f"backup written to {Path(args.dest).resolve()}: {manifest.database['kind']} database "
          f"at revision {manifest.database['schema_revision']}, {len(manifest.blobs)} blobs "
          f"{stored}; rows: " + ", ".join(f"{t} {n}" for t, n in manifest.counts.items() if n))
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from ftune.service.backup_manifest import BackupError
    from ftune.service.blobs.open import open_store
    from ftune.service.restore import restore_backup

    settings = process_settings(home=args.home)
    home = settings.resolved_home
    try:
        restored = restore_backup(Path(args.source), home, settings.resolved_database_url,
                                  open_store(settings.storage, home))
    except BackupError as exc:
        raise LaunchError(f"restore refused: {exc}") from None
    before, after = restored.revision
    print(f"restored the backup of {restored.manifest.created_at} into {home}: schema "
          f"{before}" + (f" upgraded to {after}" if before != after else "")
          + f", {len(restored.manifest.blobs)} blobs; jobs queued again: "
          f"{', '.join(restored.requeued) or 'none'}")
    return 0
