from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ftune.service.datasets import (
    DatasetChecks,
    dataset_view,
    delete_dataset,
    discard_dataset_files,
    get_dataset,
    ingest_archive,
    list_datasets,
)
from ftune.service.deps import Ctx
from ftune.service.errors import InvalidInput
from ftune.service.ingest.multipart import receive_multipart
from ftune.service.schemas import DatasetOut, DatasetUploadOut

router = APIRouter(tags=["datasets"])

_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "zip, tar or tar.gz of DATA/<class>/<images> or "
                                "DATA/train|val/<class>/<images>"},
        "name": {"type": "string", "description": "default: the archive's file name"},
    }}}}}}


@router.post("/datasets", status_code=201, response_model=DatasetUploadOut,
             openapi_extra=_UPLOAD_FORM,
             responses={200: {"description": "the same content was already uploaded"},
                        413: {"description": "over FTUNE_MAX_UPLOAD_MB"},
                        422: {"description": "not a usable dataset; the body has the report"}})
async def upload_dataset(request: Request, ctx: Ctx,
                         dedupe: Annotated[bool, Query()] = True) -> JSONResponse:
    """Upload an archive (zip, tar, tar.gz) of an image-folder or labels.csv dataset.

    Streamed to disk, unpacked safely, checked; the response carries the lint report.
    Content uploaded before returns the existing dataset with 200 (``?dedupe=false``: a new
    one)."""
    settings = ctx.settings
    form = await receive_multipart(request, dest=ctx.storage.uploads, file_fields={"file"},
                                   max_bytes=int(settings.max_upload_mb * 2**20))
    try:
        files = form.files_named("file")
        if not files:
            raise InvalidInput("file: missing; send the archive as the multipart field 'file'")
        checks = DatasetChecks.from_settings(settings.engine)

        def ingest() -> JSONResponse:
            with ctx.db.session() as session:
                dataset, created = ingest_archive(
                    session, ctx.storage, archive=files[0].path, filename=files[0].filename,
                    name=form.fields.get("name"), checks=checks, dedupe=dedupe)
                body = {**dataset_view(dataset), "report": dataset.report,
                        "deduplicated": not created}
            return JSONResponse(jsonable_encoder(DatasetUploadOut.model_validate(body)),
                                status_code=201 if created else 200)

        return await run_in_threadpool(ingest)
    finally:
        form.cleanup()


@router.get("/datasets", response_model=list[DatasetOut])
def list_all(ctx: Ctx) -> list[dict]:
    with ctx.db.session() as session:
        return [dataset_view(d) for d in list_datasets(session)]


@router.get("/datasets/{dataset_id}", response_model=DatasetOut)
def get_one(dataset_id: str, ctx: Ctx) -> dict:
    with ctx.db.session() as session:
        return dataset_view(get_dataset(session, dataset_id))


@router.get("/datasets/{dataset_id}/report")
def report(dataset_id: str, ctx: Ctx) -> dict:
    """The lint report made at upload: counts, problems found, and what to do about them."""
    with ctx.db.session() as session:
        return get_dataset(session, dataset_id).report or {}


@router.delete("/datasets/{dataset_id}", status_code=204)
def delete_one(dataset_id: str, ctx: Ctx) -> Response:
    """409 while a queued or running job uses the dataset."""
    with ctx.db.session() as session:
        delete_dataset(session, dataset_id=dataset_id)
    discard_dataset_files(ctx.storage, dataset_id)
    return Response(status_code=204)
