"""Tuned-model service functions: look up, alias, delete, and build downloads (a zip of the
bundle, ONNX, TorchScript). Loaded models for predictions live in ``predictor_cache``."""

from __future__ import annotations

import re
import shutil
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ftune.models.bundle import BUNDLE_FILES, EVALUATION_FILE
from ftune.models.export_formats import EXPORT_FORMATS
from ftune.models.serving.engines import INT8_FILE, choose
from ftune.service.auth.principal import Principal
from ftune.service.auth.tenancy import visible_or_404, visible_rows
from ftune.service.blobs import deletions
from ftune.service.blobs.base import BlobInfo, BlobMissing
from ftune.service.blobs.fetched import CorruptBlob
from ftune.service.blobs.keys import (
    export_key,
    export_prefix,
    model_key,
    prefixes_of,
    serving_key,
)
from ftune.service.db.session import Database
from ftune.service.db.tables import ModelAlias, Tenant, TunedModel
from ftune.service.db.writes import rows_changed
from ftune.service.disk import disk_allowance
from ftune.service.errors import Conflict, InvalidInput, NotFound, TooManyRequests
from ftune.service.exports import ExportSlots
from ftune.service.ids import is_id
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page
from ftune.service.quotas import limits_of, usage_of
from ftune.service.settings import Settings
from ftune.service.storage import Storage

EXTRA_FILES = (EVALUATION_FILE,)  # in the download beside what Predictor.load reads
ALIAS = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


REF_FORMS = "an id, a name (its latest version), name:version or name:alias"


def get_model(session: Session, principal: Principal, ref: str) -> TunedModel:
    """A model by id, name (its latest version), ``name:version`` or ``name:alias``; names
    resolve within the caller's tenant, and another tenant's model is a 404. An id (32 hex
    characters) is always read as an id, even where a model is named like one."""
    if is_id(ref):
        model = session.get(TunedModel, ref)
    elif ":" in ref:
        model = _by_tag(session, principal.home_tenant, ref)
    else:
        model = session.scalar(select(TunedModel).where(
            TunedModel.tenant_id == principal.home_tenant, TunedModel.name == ref)
            .order_by(TunedModel.version.desc()).limit(1))
    return visible_or_404(principal, model, not_found=f"model {ref} not found (use "
                          f"{REF_FORMS}; GET /v1/models lists yours)")


def _by_tag(session: Session, tenant: str, ref: str) -> TunedModel | None:
    """``name:version`` or ``name:alias`` within ``tenant``."""
    name, tag = ref.rsplit(":", 1)
    if tag.isascii() and tag.isdigit():
        if len(tag) > 9:
            raise NotFound(f"model {ref} not found (no such version)")
        return session.scalar(select(TunedModel).where(
            TunedModel.tenant_id == tenant, TunedModel.name == name,
            TunedModel.version == int(tag)))
    alias = session.get(ModelAlias, (tenant, name, tag))
    return session.get(TunedModel, alias.model_id) if alias else None


def set_alias(session: Session, principal: Principal, *, alias: str, ref: str) -> ModelAlias:
    if not ALIAS.fullmatch(alias) or alias.isdigit():  # ASCII only: isdigit means a version
        raise InvalidInput("alias must be 1 to 100 letters, digits, '-', '_' or '.', and not "
                           "only digits (those are versions)")
    model = get_model(session, principal, ref)
    key = (model.tenant_id, model.name, alias)
    row = session.get(ModelAlias, key)
    if row is None:
        try:
            with session.begin_nested():  # a concurrent PUT may create it first
                row = ModelAlias(tenant_id=model.tenant_id, name=model.name, alias=alias,
                                 model_id=model.id)
                session.add(row)
            return row
        except IntegrityError:
            row = session.get(ModelAlias, key, populate_existing=True)
    if row is None:  # made by a concurrent PUT and deleted again (with its model) meanwhile
        raise Conflict(f"alias {model.name}:{alias} changed while this request ran; try again")
    row.model_id = model.id
    session.flush()
    return row


def aliases_of(session: Session, model: TunedModel) -> list[str]:
    return sorted(session.scalars(select(ModelAlias.alias).where(
        ModelAlias.tenant_id == model.tenant_id, ModelAlias.name == model.name,
        ModelAlias.model_id == model.id)))


def list_models(session: Session, principal: Principal, *, limit: int = DEFAULT_LIMIT,
                cursor: str | None = None,
                serve_policy: str = "auto") -> tuple[list[dict], str | None]:
    """Newest first, a page at a time, with their aliases: two queries whatever the limit."""
    models, next_cursor = read_page(session, visible_rows(principal, TunedModel),
                                    Keyset(TunedModel.created_at, TunedModel.id),
                                    limit=limit, cursor=cursor)
    aliases: dict[str, list[str]] = {m.id: [] for m in models}
    for model_id, alias in session.execute(
            select(ModelAlias.model_id, ModelAlias.alias)
            .where(ModelAlias.model_id.in_(list(aliases))).order_by(ModelAlias.alias)):
        aliases[model_id].append(alias)
    return [model_view(m, aliases[m.id], serve_policy) for m in models], next_cursor


def model_view(model: TunedModel, aliases: list[str] | None = None,
               serve_policy: str = "auto") -> dict:
    """``serve_policy``: the API's FTUNE_SERVE_ENGINE, which decides the engine shown."""
    return {"id": model.id, "tenant_id": model.tenant_id, "name": model.name,
            "version": model.version, "aliases": aliases or [], "job_id": model.job_id,
            "dataset_id": model.dataset_id, "dataset_hash": model.dataset_hash,
            "backbone": model.backbone, "classes": model.classes, "task": model.task,
            "metrics": model.metrics,
            "spec": model.spec, "created_at": model.created_at,
            "size_bytes": model.size_bytes, "exports_bytes": model.exports_bytes,
            "serving": serving_view(serve_policy, model.serving)}


def report_of(serving: dict | None) -> dict | None:
    return None if serving is None else serving.get("report")


def serving_view(policy: str, serving: dict | None) -> dict:
    """``GET /v1/models/{ref}``'s ``serving``: the engine this API serves it with, why, and
    the figures (null until prepared)."""
    report = report_of(serving)
    choice = choose(policy, report)
    return {"policy": policy, "engine": choice.engine, "why": choice.why,
            "onnx": (report or {}).get("onnx"), "int8": (report or {}).get("int8")}


def delete_models(session: Session, principal: Principal, *, ref: str, all_versions: bool,
                  force: bool) -> list[str]:
    """Delete one version (or every version of its name); returns the ids. Their objects are
    scheduled for deletion: remove ``prefixes_of(models=ids)`` after the commit. Refused while
    an alias points at one, unless forced (the aliases go too). A bare name, which reads as
    its latest version elsewhere, is refused here unless every version goes: deleting
    whichever version is latest is rarely what was meant."""
    if not all_versions and not is_id(ref) and ":" not in ref:
        raise InvalidInput(f"{ref!r} alone does not say which version to delete: give "
                           f"{ref}:VERSION (GET /v1/models lists them), or ?all_versions=true "
                           "to delete every version")
    model = get_model(session, principal, ref)
    models = [model] if not all_versions else list(session.scalars(select(TunedModel).where(
        TunedModel.tenant_id == model.tenant_id, TunedModel.name == model.name)))
    ids = [m.id for m in models]
    aliases = list(session.scalars(select(ModelAlias).where(
        ModelAlias.tenant_id == model.tenant_id, ModelAlias.model_id.in_(ids))))
    if aliases and not force:
        names = ", ".join(f"{a.name}:{a.alias}" for a in aliases)
        raise Conflict(f"{names} points at this model; move the alias, or delete with "
                       "?force=true (the alias goes too)")
    for alias in aliases:
        session.delete(alias)
    session.flush()
    for version in models:
        session.delete(version)
    session.flush()
    deletions.schedule(session, prefixes_of(models=ids))
    return ids


def delete_exports(session: Session, storage: Storage, principal: Principal, *,
                   ref: str) -> int:
    """Remove the model's downloads and its ONNX Runtime files (its next first prediction
    prepares them again); returns the bytes freed."""
    model = get_model(session, principal, ref)
    freed = 0
    for key in list(storage.blobs.keys(export_prefix(model.id))):
        found = storage.blobs.info(key)
        storage.blobs.delete(key)
        freed += found.size if found is not None else 0
    model.exports_bytes = 0
    model.serving = None
    return freed


def bundle_folder(storage: Storage, model: TunedModel) -> Path:
    """The model's bundle on this host, fetched from the store the first time (and verified
    against its hash); 409 when the store no longer has it."""
    if model.blob_sha256 is None:
        raise Conflict(f"model {model.id} has no stored files (it was trained before the "
                       "blob store and its files were not found when the API started)")
    try:
        folder = storage.local_tree(model_key(model.id), model.blob_sha256,
                                    owner=model.tenant_id)
    except BlobMissing:
        raise Conflict(f"model {model.id}'s files are missing from the store "
                       f"({storage.blobs.location}): deleted while this request ran, or "
                       "lost (then delete the model and train it again)") from None
    except CorruptBlob as exc:
        raise Conflict(f"model {model.id}'s stored files are damaged: {exc}") from None
    missing = [name for name in BUNDLE_FILES if not (folder / name).is_file()]
    if missing:
        raise Conflict(f"model {model.id}'s stored bundle lacks {', '.join(missing)}")
    return folder


# Every file in a download is rw-r--r--, whatever mode the worker wrote it with (the bundle
# has 0600 and 0644 files): unzipped, the model reads the same for everyone who may read it.
ZIP_FILE_MODE = 0o100644
COPY_CHUNK = 1 << 20


def _build_zip(source: Path, target: Path) -> None:
    """The bundle as a zip (what the ``safetensors`` download is)."""
    # Weights are already dense floats: storing them uncompressed is as small and faster.
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in BUNDLE_FILES + EXTRA_FILES:
            if (source / name).is_file():
                entry = zipfile.ZipInfo.from_file(source / name, arcname=name)
                entry.external_attr = ZIP_FILE_MODE << 16
                with open(source / name, "rb") as data, archive.open(entry, "w") as out:
                    shutil.copyfileobj(data, out, COPY_CHUNK)


def _copy_prepared(storage: Storage, model: TunedModel, fmt: str, target: Path,
                   prepare_serving: Callable[[TunedModel], dict] | None) -> None:
    """The int8 model from the serving preparation, where its guard offered it (409 naming
    why not)."""
    if prepare_serving is None:
        raise Conflict(f"the {fmt} download is made by the serving preparation, which this "
                       "process does not run")
    serving = prepare_serving(model)
    int8 = (report_of(serving) or {}).get("int8") or {}
    if not int8.get("offered"):
        raise Conflict(f"model {model.id}'s int8 model is not offered: {int8.get('why')}")
    folder = storage.local_tree(serving_key(model.id), serving["sha256"],
                                owner=model.tenant_id)
    shutil.copyfile(folder / INT8_FILE, target)


def build_download(db: Database, storage: Storage, settings: Settings, *, model: TunedModel,
                   fmt: str, slots: ExportSlots,
                   prepare_serving: Callable[[TunedModel], dict] | None = None) -> BlobInfo:
    """The model's download in ``fmt`` in the store, built the first time (models never
    change) if the tenant's storage quota allows; its size then counts against that quota.
    ``prepare_serving``: the model's serving preparation (service/serving.py), which makes
    the formats that come from it (int8)."""
    key = export_key(model.id, fmt)
    if (found := storage.blobs.info(key)) is not None:
        return found
    with db.session() as session:
        usage = usage_of(session, model.tenant_id)
        limits = limits_of(session.get(Tenant, model.tenant_id), settings)
    disk_allowance(storage, settings, f"building the {fmt} download")
    if usage.stored_bytes >= limits.stored_bytes:
        raise TooManyRequests(f"quota stored_gb exceeded: building this download needs space "
                              f"and the tenant holds {usage.stored_bytes} of "
                              f"{limits.stored_bytes} bytes; delete exports or models first")
    source = bundle_folder(storage, model)
    # Built on this host's disk (a unique name: two requests may build it at once), then
    # stored whole; the local file goes either way.
    local = storage.export_file(model.id, fmt)
    local = local.with_name(f".{uuid.uuid4().hex[:8]}{local.name}")
    try:
        if EXPORT_FORMATS[fmt].serving:
            _copy_prepared(storage, model, fmt, local, prepare_serving)
        elif EXPORT_FORMATS[fmt].traced:
            slots.run(source, local, fmt, timeout_s=settings.export_timeout_s,
                      name=model.name)
        else:
            _build_zip(source, local)
        stored = storage.blobs.put_file(key, local)
    finally:
        local.unlink(missing_ok=True)
    record_exports(db, storage, model.id, f"its {fmt} download was built")
    return stored


def record_exports(db: Database, storage: Storage, model_id: str, what: str,
                   **values: object) -> None:
    """After storing under the model's exports: its ``exports_bytes`` (what the tenant's
    quota counts) from the store, with ``values``, on its row. A model deleted while
    ``what`` happened has what was stored removed (it would outlive its row) and is a 404."""
    total = sum(info.size for k in storage.blobs.keys(export_prefix(model_id))
                if (info := storage.blobs.info(k)) is not None)
    with db.session() as session:
        kept = rows_changed(session, update(TunedModel).where(TunedModel.id == model_id)
                            .values(exports_bytes=total, **values))
    if not kept:
        storage.blobs.delete_prefix(export_prefix(model_id))
        raise NotFound(f"model {model_id} was deleted while {what}")
