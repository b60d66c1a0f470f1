from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from models.data.archives import ArchiveLimits
from service.context import AppContext, get_context
from service.datasets import (
    dataset_view,
    delete_dataset,
    discard_dataset_files,
    get_dataset,
    ingest_archive,
    list_datasets,
)
from service.errors import InvalidInput
from service.ingest.multipart import receive_multipart
from service.schemas import DatasetOut

router = APIRouter(tags=["datasets"])
Ctx = Annotated[AppContext, Depends(get_context)]

_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "zip, tar or tar.gz of DATA/<class>/<images> or "
                                "DATA/train|val/<class>/<images>"},
        "name": {"type": "string", "description": "default: the archive's file name"},
    }}}}}}


@router.post("/datasets", status_code=201, response_model=DatasetOut,
             openapi_extra=_UPLOAD_FORM)
async def upload_dataset(request: Request, ctx: Ctx) -> dict:
    """Upload an image-folder archive; it is streamed to disk, unpacked safely and checked."""
    settings = ctx.settings
    form = await receive_multipart(request, dest=ctx.storage.uploads, file_fields={"file"},
                                   max_bytes=int(settings.max_upload_mb * 2**20))
    try:
        files = form.files_named("file")
        if not files:
            raise InvalidInput("file: missing; send the archive as the multipart field 'file'")
        limits = ArchiveLimits(max_bytes=int(settings.max_extracted_mb * 2**20),
                               max_files=settings.max_archive_files)

        def ingest() -> dict:
            with ctx.db.session() as session:
                dataset = ingest_archive(session, ctx.storage, archive=files[0].path,
                                         filename=files[0].filename, name=form.fields.get("name"),
                                         limits=limits)
                return dataset_view(dataset)

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


@router.delete("/datasets/{dataset_id}", status_code=204)
def delete_one(dataset_id: str, ctx: Ctx) -> Response:
    """409 while a queued or running job uses the dataset."""
    with ctx.db.session() as session:
        delete_dataset(session, dataset_id=dataset_id)
    discard_dataset_files(ctx.storage, dataset_id)
    return Response(status_code=204)
