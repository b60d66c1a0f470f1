"""Data from before the blob store: datasets and models whose files sit in the data
directory (``datasets/<id>/``, ``models/<id>/``, as releases before it wrote them) and whose
row has no blob hash yet. The API stores each once, at start-up, and records its hash; the
local folder then goes. Rows whose folder is missing stay without a hash: their jobs fail
with "no longer exists" and their downloads answer 409, as for any lost object."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select, update

from ftune.models.data.trees import remove_tree
from ftune.service.blobs.keys import dataset_key, model_key
from ftune.service.db.session import Database
from ftune.service.db.tables import Dataset, TunedModel
from ftune.service.storage import Storage

log = logging.getLogger(__name__)

_TABLES = ((Dataset, "datasets", dataset_key), (TunedModel, "models", model_key))


def store_legacy_files(db: Database, storage: Storage) -> int:
    """Store what the data directory still holds for rows without a blob; how many."""
    stored = 0
    for table, folder_name, key_of in _TABLES:
        with db.session() as session:
            pending = list(session.scalars(select(table.id).where(table.blob_sha256.is_(None))))
        for object_id in pending:
            folder: Path = storage.home / folder_name / object_id
            if not folder.is_dir():
                continue
            info = storage.put_tree(key_of(object_id), folder)
            with db.session() as session:
                session.execute(update(table).where(table.id == object_id)
                                .values(blob_sha256=info.sha256))
            remove_tree(folder)
            stored += 1
            log.info("stored %s %s from the data directory in the blob store", folder_name,
                     object_id)
    return stored
