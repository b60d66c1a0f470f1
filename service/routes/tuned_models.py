from __future__ import annotations

import asyncio
import functools
import itertools
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool

from ftune.models.bundle import CONFIG_FILE, EVALUATION_FILE
from ftune.models.export_formats import DEFAULT_FORMAT, EXPORT_FORMATS, ExportFormat
from ftune.service.auth.principal import Principal
from ftune.service.batching import DynamicBatcher
from ftune.service.blobs.keys import prefixes_of
from ftune.service.cards import build_card, card_markdown, read_json
from ftune.service.context import AppContext
from ftune.service.db.tables import Dataset, Job, TunedModel
from ftune.service.deps import Admin, Ctx, Member, rate_limited
from ftune.service.disk import disk_allowance
from ftune.service.errors import Conflict, InvalidInput, NotFound
from ftune.service.explanations import EXPLAIN_THREAD, explain_batch
from ftune.service.ids import is_id
from ftune.service.ingest.multipart import receive_multipart
from ftune.service.jobs import epoch_rows, get_job, job_view, queue_position
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.predictions import decode_batch, parse_top_k
from ftune.service.schemas import AliasIn, AliasOut, JobOut, ModelOut, PredictOut, SuggestionsIn
from ftune.service.suggestions import submit_suggestions
from ftune.service.tuned_models import (
    aliases_of,
    build_download,
    bundle_folder,
    delete_exports,
    delete_models,
    get_model,
    list_models,
    model_view,
    set_alias,
)

router = APIRouter(tags=["models"])
REF = "a model id, a name (its latest version), name:version or name:alias"

_PREDICT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "default": 5},
    }}}}}}


def _resolve(ctx: AppContext, who: Principal, ref: str) -> TunedModel:
    with ctx.db.session() as session:
        return get_model(session, who, ref)


@router.get("/models", response_model=Page[ModelOut])
def list_all(ctx: Ctx, who: Member, limit: Limit = DEFAULT_LIMIT,
             cursor: Cursor = None) -> dict:
    """Newest first."""
    with ctx.db.session() as session:
        items, next_cursor = list_models(session, who, limit=limit, cursor=cursor,
                                         serve_policy=ctx.settings.serve_engine)
        return {"items": items, "next_cursor": next_cursor}


@router.put("/models/aliases/{alias}", response_model=AliasOut)
def put_alias(alias: str, body: AliasIn, request: Request, ctx: Ctx, who: Admin) -> dict:
    """Admins only: point ``name:alias`` (e.g. ``flowers:production``) at a model of that
    name, within the tenant."""
    with ctx.db.session() as session:
        row = set_alias(session, who, alias=alias, ref=body.model)
        request.state.audit_object = row.model_id
        return {"name": row.name, "alias": row.alias, "model_id": row.model_id}


@router.get("/models/{model_ref}", response_model=ModelOut, description=REF)
def get_one(model_ref: str, ctx: Ctx, who: Member) -> dict:
    with ctx.db.session() as session:
        model = get_model(session, who, model_ref)
        return model_view(model, aliases_of(session, model), ctx.settings.serve_engine)


@router.delete("/models/{model_ref}", status_code=204, description=REF)
def delete_one(model_ref: str, ctx: Ctx, who: Admin,
               all_versions: Annotated[bool, Query()] = False,
               force: Annotated[bool, Query()] = False) -> Response:
    """Admins only: delete this version (``all_versions``: every version of its name) with
    its files and downloads. 409 while an alias points at it, unless ``force`` (the alias goes
    too)."""
    with ctx.db.session() as session:
        ids = delete_models(session, who, ref=model_ref, all_versions=all_versions, force=force)
    ctx.remove_deleted(prefixes_of(models=ids))
    return Response(status_code=204)


@router.delete("/models/{model_ref}/exports", status_code=204, description=REF)
def delete_model_exports(model_ref: str, ctx: Ctx, who: Admin) -> Response:
    """Admins only: remove the model's built downloads (zip, ONNX, TorchScript) to free quota;
    they are built again when next downloaded."""
    with ctx.db.session() as session:
        delete_exports(session, ctx.storage, who, ref=model_ref)
    return Response(status_code=204)


@router.get("/models/{model_ref}/evaluation")
def evaluation(model_ref: str, ctx: Ctx, who: Member) -> dict:
    """The best weights evaluated on val (and test): per-class metrics, the full confusion
    matrix, calibration error, most confused pairs, highest-loss files."""
    model = _resolve(ctx, who, model_ref)
    model_id = model.id
    found = read_json(bundle_folder(ctx.storage, model) / EVALUATION_FILE)
    if not found:
        raise NotFound(f"model {model_id} has no evaluation (trained before evaluations)")
    return found


@router.get("/models/{model_ref}/card", response_class=PlainTextResponse, response_model=None,
            responses={200: {"content": {"text/markdown": {}, "application/json": {}}}})
def card(model_ref: str, ctx: Ctx, who: Member,
         format: Annotated[Literal["markdown", "json"], Query()] = "markdown"
         ) -> Response:
    """The model card, Markdown (default) or ``?format=json``."""
    model = _resolve(ctx, who, model_ref)
    try:
        folder: Path | None = bundle_folder(ctx.storage, model)
    except Conflict:  # its files are gone: the card says what the database knows
        folder = None
    with ctx.db.session() as session:
        content = build_card(model=model, job=session.get(Job, model.job_id),
                             dataset=session.get(Dataset, model.dataset_id),
                             config=read_json(folder / CONFIG_FILE) if folder else {},
                             evaluation=read_json(folder / EVALUATION_FILE) if folder else {},
                             history=epoch_rows(session, model.job_id))
    if format == "json":
        return JSONResponse(jsonable_encoder(content))
    return Response(card_markdown(content), media_type="text/markdown; charset=utf-8")


@router.get("/models/{model_ref}/confusion.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def confusion(model_ref: str, ctx: Ctx, who: Member,
              split: Annotated[Literal["val", "test"], Query()] = "val") -> Response:
    from ftune.service.plots import confusion_png

    model = _resolve(ctx, who, model_ref)
    model_id = model.id
    result = _split_evaluation(ctx, model, split)
    if "confusion_matrix" not in result:
        raise NotFound(f"model {model_id} is multi-label: it has no confusion matrix; see "
                       "pr_curves.png")
    matrix = result["confusion_matrix"]
    return Response(confusion_png(matrix["rows_true_columns_predicted"], matrix["labels"],
                                  f"model {model_id[:8]} — {split}"), media_type="image/png")


def _split_evaluation(ctx: AppContext, model: TunedModel, split: str) -> dict:
    result = read_json(bundle_folder(ctx.storage, model) / EVALUATION_FILE).get(split)
    if not result or not result.get("num_images"):
        raise NotFound(f"model {model.id} has no {split} evaluation")
    return result


@router.get("/models/{model_ref}/reliability.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def reliability(model_ref: str, ctx: Ctx, who: Member,
                split: Annotated[Literal["val", "test"], Query()] = "val") -> Response:
    """The reliability diagram: how often the model is right against how sure it is, before
    and after calibration (temperature scaling)."""
    from ftune.service.plots import reliability_png

    model = _resolve(ctx, who, model_ref)
    bins = _split_evaluation(ctx, model, split).get("reliability")
    if not bins:
        raise NotFound(f"model {model.id} has no reliability diagram (trained before "
                       "calibration)")
    return Response(reliability_png(bins["uncalibrated"], bins["calibrated"],
                                    f"model {model.id[:8]} — {split}"), media_type="image/png")


@router.get("/models/{model_ref}/pr_curves.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def pr_curves(model_ref: str, ctx: Ctx, who: Member,
              split: Annotated[Literal["val", "test"], Query()] = "val") -> Response:
    """A multi-label model's precision-recall curve of each class."""
    from ftune.service.plots import pr_curves_png

    model = _resolve(ctx, who, model_ref)
    curves = _split_evaluation(ctx, model, split).get("pr_curves")
    if curves is None:
        raise NotFound(f"model {model.id} is single-label: see confusion.png")
    return Response(pr_curves_png(curves, f"model {model.id[:8]} — {split}"),
                    media_type="image/png")


@router.get("/models/{model_ref}/worst.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def worst(model_ref: str, ctx: Ctx, who: Member,
             split: Annotated[Literal["val", "test"], Query()] = "val") -> Response:
    """The evaluation's worst files (highest loss: the most confident mistakes first), each
    with a Grad-CAM heat map of where the model looked for the class it gave (multi-label:
    its surest false positive)."""
    from ftune.service.plots import worst_png

    model = _resolve(ctx, who, model_ref)
    result = _split_evaluation(ctx, model, split)
    rows = [row for row in result.get("highest_loss") or result.get("worst") or []
            if row.get("overlay_png")]
    if not rows:
        raise NotFound(f"model {model.id} has no explained worst files on {split} (trained "
                       "before explanations)")
    return Response(worst_png(rows, f"model {model.id[:8]} — {split}: worst files"),
                    media_type="image/png")


@router.get("/models/{model_ref}/download", response_class=StreamingResponse, description=REF,
            responses={429: {"description": "building it would exceed the storage quota"},
                       404: {"description": "no such model, or deleted while this ran"},
                       409: {"description": "the model's files are missing from the store, "
                                        "or its int8 model is not offered (why)"}})
def download(model_ref: str, ctx: Ctx, who: Member,
             format: Annotated[ExportFormat, Query()] = DEFAULT_FORMAT) -> Response:
    """``safetensors`` (default): a zip of what ``ftune.models.Predictor.load`` reads, plus the
    evaluation. ``onnx`` / ``torchscript``: uint8 RGB ``[N, 3, S, S]`` in, probabilities out,
    normalisation included (see ftune/models/export.py for resizing). ``triton``: a Triton
    Inference Server model repository (config.pbtxt, 1/model.onnx, labels.txt) as a zip.
    ``onnx-int8``: the statically quantized ONNX model, only where its accuracy guard passed
    (409 naming why otherwise). Built once, then kept (they count against the tenant's
    storage until deleted)."""
    model = _resolve(ctx, who, model_ref)
    engines = ctx.predictors.engines
    stored = build_download(ctx.db, ctx.storage, ctx.settings, model=model, fmt=format,
                            slots=ctx.exports,
                            prepare_serving=None if engines is None
                            else engines.prepare_for_request)
    name = f"model-{model.id}{EXPORT_FORMATS[format].suffix}"
    if ctx.settings.presigned_downloads and (url := ctx.storage.blobs.presigned_url(
            stored.key, filename=name, ttl_s=ctx.settings.presigned_ttl_s)):
        return RedirectResponse(url, status_code=307)  # the store sends it, not the API
    chunks = ctx.storage.blobs.read_chunks(stored.key)
    # Streamed from the store as the client reads it: the API never holds it whole. The first
    # read opens the object: deleted meanwhile, it is a 404 here (errors.py), not a broken
    # stream.
    first = next(chunks, b"")
    return StreamingResponse(itertools.chain([first], chunks),
                             media_type=EXPORT_FORMATS[format].media_type,
                             headers={"Content-Length": str(stored.size),
                                      "Content-Disposition": f'attachment; filename="{name}"'})


# A predict body up to this size is parsed in memory: no file written and read back, no hop to
# an I/O thread (a 224 px PNG is about 100 kB).
PREDICT_IN_MEMORY = 1 << 20


@router.post("/models/{model_ref}/predict", response_model=PredictOut,
             response_model_exclude_none=True, openapi_extra=_PREDICT_FORM, description=REF,
             dependencies=[Depends(rate_limited("predictions"))])
async def predict(model_ref: str, request: Request, ctx: Ctx, who: Member,
                  top_k: Annotated[int | None, Query(ge=1, le=1000)] = None,
                  explain: bool = False) -> dict:
    """Classify one or more images, one entry per image in order: a single-label model's
    ``top_k`` (default 5) ``{label, score}`` best first; a multi-label model's
    ``{labels, scores}``: the labels over their thresholds and every class's score (or the
    ``top_k`` best). Scores are calibrated probabilities. ``explain``: also a Grad-CAM heat
    map of each image's top class (at most FTUNE_MAX_EXPLAIN_IMAGES images)."""
    settings = ctx.settings
    # A model loaded under its id a moment ago needs no lookup; anything else is resolved
    # (aliases move, models get deleted) and loaded once, then cached.
    batcher = ctx.predictors.peek(model_ref) if is_id(model_ref) else None
    if batcher is None or not who.can_see(batcher.tenant_id):
        batcher = await run_in_threadpool(lambda: _load(ctx, who, model_ref))
    with batcher.arriving():  # peers arriving: the batcher may wait briefly to batch with them
        per_image = int(settings.max_predict_image_mb * 2**20)
        disk = disk_allowance(ctx.storage, settings, "the prediction upload")
        form = await receive_multipart(
            request, dest=ctx.storage.uploads, file_fields={"files", "file"},
            max_bytes=min(settings.max_predict_images * per_image, disk),
            max_files=settings.max_predict_images, max_file_bytes=per_image,
            file_limit_name="FTUNE_MAX_PREDICT_IMAGE_MB", in_memory_bytes=PREDICT_IN_MEMORY)
    try:
        files = form.files  # both field names, in the order sent
        if not files:
            raise InvalidInput("files: send one or more images as the multipart field 'files'")
        if explain and len(files) > settings.max_explain_images:
            raise InvalidInput(f"explain: at most {settings.max_explain_images} images per "
                               f"request, got {len(files)} (FTUNE_MAX_EXPLAIN_IMAGES)")
        k = top_k if top_k is not None else parse_top_k(form.fields.get("top_k"))
        decode = functools.partial(decode_batch, predictor=batcher.predictor,
                                   max_pixels=settings.engine.max_image_pixels)
        # Decoding and resizing never run on the event loop: a small body's images on the
        # forward's thread, just before it; large files on a worker thread first, so that
        # they do not hold up the requests they would share a forward with.
        if all(received.path is None for received in files):
            batch, probs = await batcher.predict(files, decode)
        else:
            with batcher.arriving():  # still on its way
                arrays = await run_in_threadpool(decode, files)
            batch, probs = await batcher.predict(arrays)
    finally:
        form.cleanup()
    answer = {"predictions": batcher.predictor.predictions(probs, k)}
    if explain:
        answer["explanations"] = await asyncio.get_running_loop().run_in_executor(
            EXPLAIN_THREAD, explain_batch, batcher.predictor, batch, probs)
    return answer


@router.post("/models/{model_ref}/suggestions", status_code=202, response_model=JobOut,
             description=REF, dependencies=[Depends(rate_limited("jobs"))],
             responses={429: {"description": "over a quota or the submission rate limit"},
                        503: {"description": "the job queue (Redis) is unreachable"}})
def suggestions(model_ref: str, body: SuggestionsIn, request: Request, ctx: Ctx,
                who: Member) -> dict:
    """Which images of a dataset of unlabelled images to label next: a suggest job (poll
    ``GET /v1/jobs/{id}``) in which the model ranks them by how unsure it is of each,
    spread out in its feature space (never two near-duplicates); once it succeeds, the
    job's ``suggestions`` hold them, best first, with the model's guesses."""
    job_id = submit_suggestions(ctx.db, who, ctx.settings, model_ref=model_ref, request=body,
                                dispatch=ctx.dispatch)
    request.state.audit_object = job_id
    with ctx.db.session() as session:
        job = get_job(session, who, job_id)
        return job_view(job, [], queue_position(session, job))


def _load(ctx: AppContext, who: Principal, ref: str) -> DynamicBatcher:
    model = _resolve(ctx, who, ref)
    return ctx.predictors.get(model)
