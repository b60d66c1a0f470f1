from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ftune.models.bundle import CONFIG_FILE, EVALUATION_FILE
from ftune.service.cards import build_card, card_markdown, read_json
from ftune.service.context import AppContext
from ftune.service.db.tables import Dataset, Job
from ftune.service.deps import Ctx
from ftune.service.errors import InvalidInput, NotFound
from ftune.service.ids import is_id
from ftune.service.ingest.multipart import receive_multipart
from ftune.service.jobs import epoch_rows
from ftune.service.predictions import decode_images, parse_top_k
from ftune.service.schemas import AliasIn, AliasOut, ModelOut, PredictOut
from ftune.service.tuned_models import (
    aliases_of,
    get_model,
    list_models,
    model_export,
    model_view,
    model_zip,
    set_alias,
)

router = APIRouter(tags=["models"])
REF = "a model id, name:version or name:alias"

_PREDICT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "default": 5},
    }}}}}}


def _resolve(ctx: AppContext, ref: str) -> str:
    with ctx.db.session() as session:
        return get_model(session, ref).id


@router.get("/models", response_model=list[ModelOut])
def list_all(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
    with ctx.db.session() as session:
        return [model_view(m, aliases_of(session, m)) for m in list_models(session, limit=limit)]


@router.put("/models/aliases/{alias}", response_model=AliasOut)
def put_alias(alias: str, body: AliasIn, ctx: Ctx) -> dict:
    """Point ``name:alias`` (e.g. ``flowers:production``) at a model of that name."""
    with ctx.db.session() as session:
        row = set_alias(session, alias=alias, ref=body.model)
        return {"name": row.name, "alias": row.alias, "model_id": row.model_id}


@router.get("/models/{model_ref}", response_model=ModelOut, description=REF)
def get_one(model_ref: str, ctx: Ctx) -> dict:
    with ctx.db.session() as session:
        model = get_model(session, model_ref)
        return model_view(model, aliases_of(session, model))


@router.get("/models/{model_ref}/evaluation")
def evaluation(model_ref: str, ctx: Ctx) -> dict:
    """The best weights evaluated on val (and test): per-class metrics, the full confusion
    matrix, calibration error, most confused pairs, highest-loss files."""
    model_id = _resolve(ctx, model_ref)
    found = read_json(ctx.storage.model_dir(model_id) / EVALUATION_FILE)
    if not found:
        raise NotFound(f"model {model_id} has no evaluation (trained before evaluations)")
    return found


@router.get("/models/{model_ref}/card", response_class=PlainTextResponse, response_model=None,
            responses={200: {"content": {"text/markdown": {}, "application/json": {}}}})
def card(model_ref: str, ctx: Ctx,
         format: Annotated[Literal["markdown", "json"], Query()] = "markdown"
         ) -> Response:
    """The model card, Markdown (default) or ``?format=json``."""
    with ctx.db.session() as session:
        model = get_model(session, model_ref)
        folder = ctx.storage.model_dir(model.id)
        content = build_card(model=model, job=session.get(Job, model.job_id),
                             dataset=session.get(Dataset, model.dataset_id),
                             config=read_json(folder / CONFIG_FILE),
                             evaluation=read_json(folder / EVALUATION_FILE),
                             history=epoch_rows(session, model.job_id))
    if format == "json":
        return JSONResponse(jsonable_encoder(content))
    return Response(card_markdown(content), media_type="text/markdown; charset=utf-8")


@router.get("/models/{model_ref}/confusion.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def confusion(model_ref: str, ctx: Ctx,
              split: Annotated[Literal["val", "test"], Query()] = "val") -> Response:
    from ftune.service.plots import confusion_png

    model_id = _resolve(ctx, model_ref)
    result = read_json(ctx.storage.model_dir(model_id) / EVALUATION_FILE).get(split)
    if not result or "confusion_matrix" not in result:
        raise NotFound(f"model {model_id} has no {split} evaluation")
    matrix = result["confusion_matrix"]
    return Response(confusion_png(matrix["rows_true_columns_predicted"], matrix["labels"],
                                  f"model {model_id[:8]} — {split}"), media_type="image/png")


@router.get("/models/{model_ref}/download", response_class=FileResponse, description=REF)
def download(model_ref: str, ctx: Ctx,
             format: Annotated[Literal["safetensors", "torchscript", "onnx"], Query()] =
             "safetensors") -> FileResponse:
    """``safetensors`` (default): a zip of what ``models.Predictor.load`` reads, plus the
    evaluation. ``onnx`` / ``torchscript``: uint8 RGB ``[N, 3, S, S]`` in, probabilities out,
    normalisation included (see models/export.py for resizing)."""
    model_id = _resolve(ctx, model_ref)
    if format == "safetensors":
        path = model_zip(ctx.storage, model_id)
        return FileResponse(path, media_type="application/zip", filename=f"model-{model_id}.zip")
    path = model_export(ctx.storage, model_id, format)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"model-{model_id}{path.suffix}")


@router.post("/models/{model_ref}/predict", response_model=PredictOut,
             openapi_extra=_PREDICT_FORM, description=REF)
async def predict(model_ref: str, request: Request, ctx: Ctx,
                  top_k: Annotated[int | None, Query(ge=1, le=1000)] = None) -> dict:
    """Classify one or more images: one list of ``{label, score}`` per image, in order."""
    settings = ctx.settings
    # A model already loaded under its id needs no lookup (models never change); anything
    # else is resolved (aliases move) and loaded once, then cached.
    batcher = ctx.predictors.peek(model_ref) if is_id(model_ref) else None
    if batcher is None:
        batcher = await run_in_threadpool(lambda: ctx.predictors.get(_resolve(ctx, model_ref)))
    with batcher.arriving():  # peers arriving: the batcher may wait briefly to batch with them
        form = await receive_multipart(
            request, dest=ctx.storage.uploads, file_fields={"files", "file"},
            max_bytes=int(settings.max_predict_images * settings.max_predict_image_mb * 2**20),
            max_files=settings.max_predict_images)
        try:
            files = form.files  # both field names, in the order sent
            if not files:
                raise InvalidInput("files: send one or more images as the multipart field "
                                   "'files'")
            k = top_k if top_k is not None else parse_top_k(form.fields.get("top_k"))
            # Decoding and resizing happen on a worker thread, never on the event loop.
            batch = await run_in_threadpool(
                lambda: batcher.predictor.to_arrays(decode_images(files)))
        finally:
            form.cleanup()
    probs = await batcher.probabilities(batch)
    return {"predictions": batcher.predictor.top_k(probs, k)}
