"""Request and response bodies, as they appear in the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ftune.models.spec import FineTuneSpec
from ftune.service.auth.tenants import QuotaOverrides
from ftune.service.ids import is_id
from ftune.service.job_status import JobStatus


class DatasetOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    created_at: datetime
    classes: list[str]
    num_images: int
    splits: dict[str, int | None] = Field(description="images per split; val null: split at "
                                          "training time by the spec's val_fraction")
    class_counts: dict[str, dict[str, int]] = Field(
        description="split -> class -> images (multi-label: the images carrying the label)")
    warnings: list[str]
    size_bytes: int
    content_hash: str | None = Field(description="same images with the same labels, same hash")
    kind: str = Field("labeled", description="labeled, or unlabeled: images without labels "
                      "only (splits.unlabeled counts them; a labelled dataset's unlabeled/ "
                      "folder is counted there too)")
    task: Literal["single_label", "multi_label"] | None = Field(
        None, description="a labelled dataset's task, detected at upload: single_label (one "
        "class per image) or multi_label (labels.csv with a set of labels per image)")
    parent_id: str | None = Field(None, description="the dataset this version was made from "
                                  "(null: an upload)")
    version: int = Field(1, description="1 for an upload, one more than its parent's for a "
                         "version")
    added: dict[str, Any] | None = Field(
        None, description="a version's additions: from (unlabeled_dataset or archive), "
        "images, by_class, copies_left_out (already in the parent, by content)")


class VersionIn(BaseModel):
    """A new version from labels for images of a dataset of unlabelled images."""

    model_config = ConfigDict(extra="forbid")

    unlabeled_dataset_id: str = Field(description="a dataset uploaded with kind=unlabeled")
    labels: dict[str, str | list[str]] = Field(
        min_length=1, max_length=100_000,
        description="image path in that dataset -> its class (a multi-label dataset: its "
        "list of labels, possibly empty)")
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="the version's name (default: the parent's)")


class DatasetUploadOut(DatasetOut):
    report: dict[str, Any] | None = Field(description="the lint report (also at .../report)")
    deduplicated: bool = Field(description="true: this content was already uploaded, and the "
                               "existing dataset is returned (200)")


def _dataset_id(value: str) -> str:
    if not is_id(value):
        raise ValueError(f"{value!r} is not a dataset id (32 hex characters, from POST "
                         "/v1/datasets)" if value else "required: the id POST /v1/datasets "
                         "returned")
    return value


DatasetId = Annotated[str, AfterValidator(_dataset_id)]


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: DatasetId = Field(description="the id POST /v1/datasets returned")
    spec: FineTuneSpec = Field(default_factory=FineTuneSpec,
                               description="the engine's fine-tuning spec; every field is "
                               "optional (see README, \"The spec\")")
    priority: int = Field(5, ge=0, le=9, description="9 runs first; equal priorities run in "
                          "the order submitted")
    unlabeled_dataset_id: DatasetId | None = Field(
        None, description="a dataset uploaded with kind=unlabeled whose images the spec's "
        "pretrain and pseudo_labels use, with the dataset's own unlabeled/ images")
    max_runtime_s: int | None = Field(None, ge=1, le=10**8,
                                      description="fail the job if it runs longer "
                                      "(the service's FTUNE_MAX_RUNTIME_S also applies)")
    model_name: str | None = Field(None, min_length=1, max_length=200,
                                   pattern=r"^[^:/\x00-\x1f]+$",
                                   description="name of the tuned model (default: the "
                                   "dataset's); versions count up per name, and the "
                                   "name (its latest version), name:version or "
                                   "name:alias then refers to it")



MAX_SUGGESTIONS = 1000


class SuggestionsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unlabeled_dataset_id: DatasetId = Field(description="a dataset uploaded with "
                                            "kind=unlabeled, of the model's tenant")
    count: int = Field(100, ge=1, le=MAX_SUGGESTIONS, description="how many images to "
                       "suggest (fewer when the rest are near-duplicates of those picked)")
    measure: Literal["margin", "entropy"] = Field(
        "margin", description="the uncertainty of the calibrated scores: margin (1 - the "
        "gap between the top two) or entropy; multi-label models use each class's distance "
        "to its threshold")
    priority: int = Field(5, ge=0, le=9, description="as a job's")


class Progress(BaseModel):
    stage: str | None = Field(None, description="features (decoding, feature extraction, the "
                              "learning-rate test), head, finetune, train (an explicit "
                              "freeze strategy) or evaluate; null before the run starts")
    epoch: int = Field(description="the epoch being trained (1-based, as in the job's "
                       "events); between epochs and once the job ended, the last one finished")
    epochs: int = Field(description="epochs in all: those finished plus those the stage being "
                        "run and the later ones may run (it shrinks when a stage stops early; "
                        "once the job ends, the epochs run)")
    epochs_done: int = Field(description="epochs finished (one metrics row each)")
    step: int = Field(description="batch within the epoch being trained; 0 between epochs")
    steps: int
    stage_epoch: int | None = Field(None, description="while a training stage (head, "
                                    "finetune, train) runs: its own epoch, counted like "
                                    "epoch; null between stages")
    stage_epochs: int | None = Field(None, description="the epochs that stage may run")


class JobSummary(BaseModel):
    """A job as lists show it: everything but the per-epoch metrics."""

    id: str
    tenant_id: str
    dataset_id: str
    unlabeled_dataset_id: str | None = Field(None, description="the dataset of unlabelled "
                                             "images the job also uses, if it names one")
    kind: Literal["finetune", "suggest"] = Field(
        "finetune", description="finetune: trains a model; suggest: ranks a dataset of "
        "unlabelled images for labelling with spec.model_id (POST "
        "/v1/models/{ref}/suggestions)")
    status: JobStatus
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    best: dict[str, Any] | None
    stopped_early: bool | None
    error: str | None
    model_id: str | None
    cancel_requested: bool
    attempts: int
    priority: int
    max_runtime_s: int | None
    queue_position: int | None = Field(description="place among the tenant's waiting jobs "
                                       "(1: next); null unless waiting")
    hold_reason: str | None = Field(None, description="why a waiting job is held back (a "
                                    "run-time quota, or no live worker with the devices it "
                                    "asks for); null when it only waits for a free worker")
    retry_at: datetime | None = Field(None, description="a job back from a transient "
                                      "error waits until then")
    resolved: dict[str, Any] = Field(default_factory=dict, description="each auto field's "
                                     "value and why it was chosen: {field: {value, why}}; "
                                     "what the dataset decides is there at submit, learning "
                                     "rates and epochs once the worker has measured them")
    diagnosis: list[dict[str, Any]] | None = Field(None, description="once finished: findings "
                                                   "about the run, each {code, message, "
                                                   "evidence, action}; [] for a healthy run")
    sweep_id: str | None = Field(None, description="the sweep this job is a trial of")


class Suggestion(BaseModel):
    path: str = Field(description="the image's path in the unlabelled dataset")
    sha256: str | None = Field(description="of the image's bytes")
    uncertainty: float = Field(description="0 (sure) to 1 (least sure)")
    distance: float = Field(description="cosine distance, in the model's feature space, to "
                            "the nearest image suggested before it (the first: 1)")
    score: float = Field(description="uncertainty × distance: what ranked it")
    guess: list[Prediction] | MultiLabelPrediction = Field(
        description="the model's answer for it, as /predict gives it")


class JobOut(JobSummary):
    metrics: list[dict[str, Any]] = Field(description="one row per finished epoch")
    suggestions: list[Suggestion] | None = Field(
        None, description="a suggest job's ranked images, best first, once it succeeded")


class ServingOut(BaseModel):
    policy: Literal["auto", "torch", "onnxruntime", "int8"] = Field(
        description="FTUNE_SERVE_ENGINE of this API process")
    engine: Literal["torch", "onnxruntime", "onnxruntime-int8"] | None = Field(
        description="what runs the model's predictions here (null: refused, see why)")
    why: str
    onnx: dict[str, Any] | None = Field(
        None, description="the ONNX export's parity check against torch: passed, why, "
        "images, agreement, max_prob_diff (null until the first prediction prepares it)")
    int8: dict[str, Any] | None = Field(
        None, description="the int8 model's guard: offered, why, images, agreement, metric, "
        "quality and fp32_quality")


class ModelOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    version: int
    aliases: list[str]
    job_id: str
    dataset_id: str
    dataset_hash: str | None = Field(description="content hash of the dataset trained on")
    backbone: str
    classes: list[str]
    task: Literal["single_label", "multi_label"] = Field(
        "single_label", description="multi_label: predictions give each image's labels over "
        "their thresholds and every class's score")
    metrics: dict[str, Any]
    spec: dict[str, Any]
    created_at: datetime
    size_bytes: int = Field(description="the bundle on disk")
    exports_bytes: int = Field(description="downloads built so far (zip, ONNX, TorchScript), "
                               "and ONNX Runtime's files once prepared")
    serving: ServingOut


class Prediction(BaseModel):
    label: str
    score: float


class MultiLabelPrediction(BaseModel):
    labels: list[str] = Field(description="the classes whose score is over their threshold")
    scores: list[Prediction] = Field(description="every class's score (or the top_k), best "
                                     "first")


class Explanation(BaseModel):
    label: str = Field(description="the class explained: the image's top class")
    heatmap: list[list[float]] = Field(
        description="Grad-CAM evidence for that class over the image, rows top to bottom, "
        "each value in [0, 1] (the last feature map's resolution)")
    overlay_png: str = Field(description="the heat map over the image the model saw, a "
                             "base64 PNG")


class PredictOut(BaseModel):
    predictions: list[list[Prediction]] | list[MultiLabelPrediction] = Field(
        description="one entry per image, in order: a single-label model's list of "
        "{label, score} best first; a multi-label model's {labels, scores}")
    explanations: list[Explanation] | None = Field(
        None, description="with explain=true: one per image, in order")


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model id, name (its latest version), name:version or "
                       "name:alias")


class AliasOut(BaseModel):
    name: str
    alias: str
    model_id: str


def _utc_if_naive(moment: datetime | None) -> datetime | None:
    """Times are compared with the database's aware UTC ones: a naive one is read as UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="what the key is for")
    role: Literal["member", "admin", "operator"] = Field(
        "member", description="member: upload, train, predict, download; admin: also keys, "
        "aliases, deletions and the audit log; operator (operators only): everything")
    tenant: str | None = Field(None, max_length=100, description="operators only: the "
                               "tenant (id or name) the key belongs to")
    expires_at: Annotated[datetime | None, AfterValidator(_utc_if_naive)] = Field(
        None, description="after this the key stops working; a time without a zone is UTC")


class KeyOut(BaseModel):
    id: str
    name: str
    role: str
    tenant_id: str | None
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    last_used_at: datetime | None = Field(description="updated about once a minute")
    expires_at: datetime | None
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="a-z, 0-9, '-', '_', '.'")
    quotas: QuotaOverrides | None = None


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    quotas: dict[str, Any] = Field(description="the tenant's own limits; others are defaults")


class UsageOut(BaseModel):
    tenant_id: str
    usage: dict[str, float]
    limits: dict[str, float]


class AuditOut(BaseModel):
    id: int
    tenant_id: str | None
    key_id: str | None
    action: str
    object_id: str | None
    status_code: int
    created_at: datetime


class SweepIn(BaseModel):
    """A hyperparameter sweep: trials are jobs whose specs are ``base`` with parameters
    sampled from ``space`` (spec path -> distribution)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: DatasetId = Field(description="the id POST /v1/datasets returned")
    base: dict[str, Any] = Field(default_factory=dict, description="the spec every trial "
                                 "starts from; auto fields allowed")
    space: dict[str, Any] = Field(description="spec path -> one of {\"log_uniform\": [low, "
                                  "high]}, {\"uniform\": [low, high]}, {\"int\": [low, high]}, "
                                  "{\"choice\": [values]}", examples=[{
                                      "optimizer.lr": {"log_uniform": [1e-4, 1e-2]},
                                      "freeze.strategy": {"choice": ["head_only",
                                                                     "last_n_blocks"]},
                                      "head.dropout": {"uniform": [0, 0.5]}}])
    objective: Literal["val_accuracy", "val_loss", "val_map"] = Field(
        "val_accuracy", description="val_accuracy and val_map (mean average precision, "
        "multi-label jobs) are maximised, val_loss minimised")
    n_trials: int = Field(10, ge=1, le=200)
    parallelism: int = Field(2, ge=1, le=32, description="trials running at once at most")
    pruner: Literal["median", "asha", "none"] = Field(
        "median", description="median: stop a trial whose best objective so far is worse than "
        "the median of finished trials at the same epoch; asha: successive halving (a third "
        "of the trials go on at epochs 1, 3, 9...); none")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="grid: every combination, in a seeded order (choice and int "
        "parameters only; n_trials is capped at the grid's size)")
    max_total_s: float | None = Field(None, gt=0, le=30 * 86400, description="after this "
                                      "many seconds, running trials are cancelled and no more "
                                      "start")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the sampler's seed")
    priority: int = Field(5, ge=0, le=9, description="of every trial's job")
    model_name: str | None = Field(None, min_length=1, max_length=200,
                                   pattern=r"^[^:/\x00-\x1f]+$",
                                   description="name of the trials' models (default: "
                                   "sweep-<first 8 characters of the sweep id>)")


class SweepTrialOut(BaseModel):
    number: int
    job_id: str
    params: dict[str, Any]
    status: JobStatus
    value: float | None = Field(description="the objective at the trial's best epoch")
    epoch: int = Field(description="epochs finished")
    epochs: int = Field(description="epochs the trial may run")
    pruned: bool
    model_id: str | None


class SweepOut(BaseModel):
    id: str
    tenant_id: str
    dataset_id: str
    status: Literal["running", "succeeded", "failed", "cancelled"]
    reason: str | None = Field(description="why it ended, or what it waits for")
    base: dict[str, Any]
    space: dict[str, Any]
    objective: str
    direction: Literal["maximize", "minimize"]
    n_trials: int
    parallelism: int
    pruner: str
    sampler: str
    max_total_s: float | None
    seed: int
    created_at: datetime
    finished_at: datetime | None
    trials: list[SweepTrialOut]
    best_trial: SweepTrialOut | None = Field(description="the best finished trial so far")
    epochs_run: int = Field(description="epochs the trials have run")
    epochs_asked: int = Field(description="epochs the trials would have run unpruned")
