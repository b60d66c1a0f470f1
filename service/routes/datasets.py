from __future__ import annotations

import mimetypes
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ftune.models.data.images import is_image_name
from ftune.models.data.sandbox import unpack_and_inspect
from ftune.models.data.trees import remove_tree
from ftune.service.auth.principal import Principal
from ftune.service.context import AppContext
from ftune.service.dataset_versions import (
    check_archive,
    create_version,
    from_archive,
    from_unlabeled,
    inside,
    parts_of,
)
from ftune.service.datasets import (
    DatasetChecks,
    dataset_kind,
    dataset_view,
    delete_dataset,
    get_dataset,
    ingest_archive,
    list_datasets,
)
from ftune.service.db.tables import Dataset, Tenant
from ftune.service.deps import Admin, Ctx, Member, rate_limited
from ftune.service.disk import disk_allowance, over_disk_allowance
from ftune.service.errors import (
    InvalidInput,
    NotFound,
    ServiceError,
    TooManyRequests,
    UnsupportedMediaType,
)
from ftune.service.ids import new_id
from ftune.service.ingest.multipart import receive_multipart, upload_too_large
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.quotas import Limits, limits_of, upload_allowance, usage_of
from ftune.service.schemas import DatasetOut, DatasetUploadOut, VersionIn

router = APIRouter(tags=["datasets"])
# The archive's field: `file`, or `files` as /predict names its images.
UPLOAD_FIELDS = {"file", "files"}
ONE_ARCHIVE = ("file: send the dataset as one archive, a zip, tar or tar.gz of its folder, "
               "not its images one by one; for example `zip -r flowers.zip flowers/` then "
               "`curl -H \"$AUTH\" -F file=@flowers.zip -F name=flowers "
               ".../v1/datasets`")

_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "zip, tar or tar.gz of DATA/<class>/<images> or "
                                "DATA/train|val/<class>/<images>"},
        "name": {"type": "string", "description": "default: the archive's file name"},
        "kind": {"type": "string", "enum": ["labeled", "unlabeled"],
                 "description": "unlabeled: images without labels, in any folders (for "
                                "pretraining and pseudo-labels); default labeled"},
    }}}}}}


@router.post("/datasets", status_code=201, response_model=DatasetUploadOut,
             openapi_extra=_UPLOAD_FORM, dependencies=[Depends(rate_limited("uploads"))],
             responses={200: {"description": "the same content was already uploaded"},
                        413: {"description": "over FTUNE_MAX_UPLOAD_MB"},
                        422: {"description": "not a usable dataset; the body has the report"},
                        429: {"description": "over a quota, the upload rate limit or the "
                                             "tenant's uploads at once"},
                        503: {"description": "this server is handling as many uploads as "
                                             "it allows (FTUNE_MAX_UNPACKS)"},
                        507: {"description": "the server's disk is down to its reserve"}})
async def upload_dataset(request: Request, ctx: Ctx, who: Member,
                         dedupe: Annotated[bool, Query()] = True) -> JSONResponse:
    """Upload an archive (zip, tar, tar.gz) of an image-folder or labels.csv dataset, or
    (form field ``kind=unlabeled``) of unlabelled images in any folders.

    Streamed to disk, unpacked safely, checked; the response carries the lint report.
    Content this tenant uploaded before returns the existing dataset with 200
    (``?dedupe=false``: a new one). The tenant's quotas (datasets, stored bytes) are checked
    before and while the upload streams, and again when the dataset is recorded. A tenant
    runs at most FTUNE_MAX_UPLOADS_PER_TENANT uploads at once (429 past it), a server
    FTUNE_MAX_UNPACKS (503), both with Retry-After."""
    tenant_id = who.home_tenant
    allowance, limits = await run_in_threadpool(_upload_allowance, ctx, tenant_id)
    async with ctx.uploads.slots(tenant_id, limits.uploads_at_once):
        return await _receive_and_ingest(request, ctx, tenant_id, allowance, limits, dedupe)


async def _receive_and_ingest(request: Request, ctx: AppContext, tenant_id: str,
                              allowance: int, limits: Limits, dedupe: bool) -> JSONResponse:
    settings = ctx.settings
    disk = disk_allowance(ctx.storage, settings, "the upload")
    # The tightest of the three bounds refuses the upload, with its own status and reason.
    bounds: list[tuple[int, Callable[[int], ServiceError]]] = [
        (int(settings.max_upload_mb * 2**20), upload_too_large),
        (allowance, _over_storage_quota),
        (disk, partial(over_disk_allowance, "the upload"))]
    max_bytes, over_limit = min(bounds, key=lambda bound: bound[0])
    form = await receive_multipart(request, dest=ctx.storage.uploads,
                                   file_fields=UPLOAD_FIELDS, max_bytes=max_bytes,
                                   over_limit=over_limit, too_many_files=ONE_ARCHIVE)
    try:
        files = form.files
        if not files:
            raise InvalidInput("file: missing; send the archive as the multipart field 'file'")
        checks = DatasetChecks.from_settings(settings.engine)
        kind = dataset_kind(form.fields.get("kind"))

        def ingest() -> JSONResponse:
            # Checked again: the disk may have filled while the upload streamed.
            disk = disk_allowance(ctx.storage, settings, "unpacking the upload")
            with ctx.db.session() as session:
                dataset, created = ingest_archive(
                    session, ctx.storage, tenant_id=tenant_id, archive=files[0].written,
                    filename=files[0].filename, name=form.fields.get("name"), checks=checks,
                    allowance=allowance, disk_allowance=disk, dedupe=dedupe, kind=kind,
                    quota=limits)
                body = {**dataset_view(dataset), "report": dataset.report,
                        "deduplicated": not created}
            request.state.audit_object = dataset.id
            return JSONResponse(jsonable_encoder(DatasetUploadOut.model_validate(body)),
                                status_code=201 if created else 200)

        return await run_in_threadpool(ingest)
    finally:
        form.cleanup()


def _upload_allowance(ctx: AppContext, tenant_id: str) -> tuple[int, Limits]:
    """Bytes the tenant may still store (429 when it may not upload at all), and its limits."""
    with ctx.db.session() as session:
        limits = limits_of(session.get(Tenant, tenant_id), ctx.settings)
        return upload_allowance(usage_of(session, tenant_id), limits), limits


def _over_storage_quota(max_bytes: int) -> ServiceError:
    return TooManyRequests(f"quota stored_gb exceeded: the upload is larger than the "
                           f"{max_bytes} bytes left in the tenant's storage quota; free some "
                           "or ask an operator to raise it")


@router.get("/datasets", response_model=Page[DatasetOut])
def list_all(ctx: Ctx, who: Member, limit: Limit = DEFAULT_LIMIT,
             cursor: Cursor = None) -> dict:
    """Newest first."""
    with ctx.db.session() as session:
        datasets, next_cursor = list_datasets(session, who, limit=limit, cursor=cursor)
        return {"items": [dataset_view(d) for d in datasets], "next_cursor": next_cursor}


@router.get("/datasets/{dataset_id}", response_model=DatasetOut)
def get_one(dataset_id: str, ctx: Ctx, who: Member) -> dict:
    with ctx.db.session() as session:
        return dataset_view(get_dataset(session, who, dataset_id))


@router.get("/datasets/{dataset_id}/report")
def report(dataset_id: str, ctx: Ctx, who: Member) -> dict:
    """The lint report made at upload: counts, problems found, and what to do about them."""
    with ctx.db.session() as session:
        return get_dataset(session, who, dataset_id).report or {}


@router.get("/datasets/{dataset_id}/images/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}}})
def image(dataset_id: str, path: str, ctx: Ctx, who: Member) -> Response:
    """One image of a dataset as it was uploaded (the labelling view shows them)."""
    with ctx.db.session() as session:
        dataset = get_dataset(session, who, dataset_id)
        parts = parts_of(session, dataset)
        owner = dataset.tenant_id
    tree = ctx.storage.local_dataset(parts, owner=owner)  # gone from the store: a 404
    if not is_image_name(Path(path)) or not inside(tree, path):
        raise NotFound(f"dataset {dataset_id} has no image {path[:200]!r}")
    return FileResponse(tree / path, media_type=mimetypes.guess_type(path)[0] or "image/*",
                        headers={"Cache-Control": "private, max-age=3600"})


@router.delete("/datasets/{dataset_id}", status_code=204)
def delete_one(dataset_id: str, ctx: Ctx, who: Admin) -> Response:
    """Admins only; 409 while a queued or running job uses the dataset."""
    with ctx.db.session() as session:
        doomed = delete_dataset(session, who, dataset_id=dataset_id)
    ctx.remove_deleted(doomed)
    return Response(status_code=204)


_VERSION_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VersionIn.model_json_schema()},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "name": {"type": "string"}}}}}}}


@router.post("/datasets/{dataset_id}/versions", status_code=201,
             response_model=DatasetUploadOut, openapi_extra=_VERSION_BODY,
             dependencies=[Depends(rate_limited("uploads"))],
             responses={429: {"description": "over a quota"}})
async def new_version(dataset_id: str, request: Request, ctx: Ctx, who: Member) -> JSONResponse:
    """A new version of a labelled dataset: its images plus new labelled ones, either
    labels (JSON) for images of a dataset of unlabelled images, or (multipart ``file``) an
    archive of labelled images laid out as an upload. Images already in the dataset (by
    content) are left out. The parent is never changed; the version names it
    (``parent_id``, ``version``), says what it added (``added``, and ``changes`` in its lint
    report), and counts against the storage quota only for the bytes it adds."""
    checks = DatasetChecks.from_settings(ctx.settings.engine)
    tenant_id = who.home_tenant
    _, limits = await run_in_threadpool(_upload_allowance, ctx, tenant_id)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":  # unpacked in a child: counted as an upload
        async with ctx.uploads.slots(tenant_id, limits.uploads_at_once):
            return await _version_from_archive(request, ctx, who, dataset_id, checks, limits)
    if media != "application/json":
        raise UnsupportedMediaType("send labels as application/json, or an archive of new "
                                   f"images as multipart/form-data (got {media or 'none'})")
    try:
        body = VersionIn.model_validate(await request.json())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    except ValueError:  # not JSON
        raise InvalidInput("the body is not JSON: send {unlabeled_dataset_id, labels}") \
            from None

    def create() -> JSONResponse:
        dataset = create_version(
            ctx.db, ctx.storage, who, parent_id=dataset_id, checks=checks, limits=limits,
            name=body.name, collect=lambda session, parent: from_unlabeled(
                session, ctx.storage, who, parent, body.unlabeled_dataset_id, body.labels))
        return _version_answer(request, dataset)

    return await run_in_threadpool(create)


async def _version_from_archive(request: Request, ctx: AppContext, who: Principal,
                                dataset_id: str, checks: DatasetChecks,
                                limits: Limits) -> JSONResponse:
    settings = ctx.settings
    form = await receive_multipart(request, dest=ctx.storage.uploads, file_fields={"file"},
                                   max_bytes=int(settings.max_upload_mb * 2**20),
                                   too_many_files=ONE_ARCHIVE)
    try:
        if not form.files:
            raise InvalidInput("file: missing; send the new images as one archive")
        archive = form.files[0]

        def create() -> JSONResponse:
            staging = ctx.storage.datasets / f".{new_id()}.additions"
            try:
                # The new images alone: checked in the sandbox as an upload is, except for
                # how many classes and images so few make (the version is checked whole).
                check_archive(unpack_and_inspect(
                    archive.written, staging, limits=checks.limits, min_per_class=1,
                    max_pixels=checks.max_pixels, max_classes=checks.max_classes,
                    memory_mb=checks.memory_mb, cpu_s=checks.cpu_s, timeout_s=checks.timeout_s))
                dataset = create_version(
                    ctx.db, ctx.storage, who, parent_id=dataset_id, checks=checks,
                    limits=limits, name=form.fields.get("name"),
                    collect=lambda *_: from_archive(staging, archive.filename))
            finally:
                remove_tree(staging)
            return _version_answer(request, dataset)

        return await run_in_threadpool(create)
    finally:
        form.cleanup()


def _version_answer(request: Request, dataset: Dataset) -> JSONResponse:
    request.state.audit_object = dataset.id
    body = {**dataset_view(dataset), "report": dataset.report, "deduplicated": False}
    return JSONResponse(jsonable_encoder(DatasetUploadOut.model_validate(body)),
                        status_code=201)
