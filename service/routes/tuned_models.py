from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.context import AppContext, get_context
from service.errors import InvalidInput
from service.ingest.multipart import receive_multipart
from service.predictions import decode_images, parse_top_k, predict_images
from service.schemas import ModelOut, PredictOut
from service.tuned_models import get_model, list_models, model_view, model_zip

router = APIRouter(tags=["models"])
Ctx = Annotated[AppContext, Depends(get_context)]

_PREDICT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "default": 5},
    }}}}}}


@router.get("/models", response_model=list[ModelOut])
def list_all(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
    with ctx.db.session() as session:
        return [model_view(m) for m in list_models(session, limit=limit)]


@router.get("/models/{model_id}", response_model=ModelOut)
def get_one(model_id: str, ctx: Ctx) -> dict:
    with ctx.db.session() as session:
        return model_view(get_model(session, model_id))


@router.get("/models/{model_id}/download", response_class=FileResponse)
def download(model_id: str, ctx: Ctx) -> FileResponse:
    """A zip of exactly what ``models.Predictor.load`` reads."""
    with ctx.db.session() as session:
        get_model(session, model_id)
    path = model_zip(ctx.storage, model_id)
    return FileResponse(path, media_type="application/zip", filename=f"model-{model_id}.zip")


@router.post("/models/{model_id}/predict", response_model=PredictOut,
             openapi_extra=_PREDICT_FORM)
async def predict(model_id: str, request: Request, ctx: Ctx,
                  top_k: Annotated[int | None, Query(ge=1, le=1000)] = None) -> dict:
    """Classify one or more images: one list of ``{label, score}`` per image, in order."""
    settings = ctx.settings

    def lookup() -> None:
        with ctx.db.session() as session:
            get_model(session, model_id)

    await run_in_threadpool(lookup)
    form = await receive_multipart(
        request, dest=ctx.storage.uploads, file_fields={"files", "file"},
        max_bytes=int(settings.max_predict_images * settings.max_predict_image_mb * 2**20),
        max_files=settings.max_predict_images)
    try:
        files = form.files  # both field names, in the order sent
        if not files:
            raise InvalidInput("files: send one or more images as the multipart field 'files'")
        k = top_k if top_k is not None else parse_top_k(form.fields.get("top_k"))

        def run() -> list[list[dict]]:
            images = decode_images(files)
            return predict_images(ctx.predictors.get(model_id), images, k)

        return {"predictions": await run_in_threadpool(run)}
    finally:
        form.cleanup()
