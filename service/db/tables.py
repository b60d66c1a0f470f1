"""Tables. Ids are server-made hex strings; storage paths derive from them, never from input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ftune.service.ids import new_id
from ftune.service.job_status import JobStatus, SweepStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stored as naive UTC (SQLite has no time zones), always returned time-zone aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict] = {
        datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# Objects made before tenancy belong to this tenant (migration 0002), as do those of a
# single-user `ftune up` with FTUNE_AUTH=off.
DEFAULT_TENANT_ID = "0" * 32
DEFAULT_TENANT_NAME = "default"


def tenant_column() -> Mapped[str]:
    return mapped_column(String(32), index=True)


class Tenant(Base):
    """A team sharing the service: every dataset, job and model belongs to one."""

    __tablename__ = "tenants"
    __table_args__ = (UniqueConstraint("name", name="uq_tenants_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    quotas: Mapped[dict[str, Any]] = mapped_column(default=dict)  # overrides of the defaults


class ApiKey(Base):
    """A bearer key, stored only as its SHA-256; operators' keys have no tenant."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))  # operator | admin | member
    key_hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))  # its first characters, to tell keys apart
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditEntry(Base):
    """Who did what: one row per state-changing request. ``seq`` numbers a tenant's rows 1, 2,
    3 ... (operators' rows, with no tenant, are one more sequence): the id the API shows, so
    that it reveals nothing of other tenants (``db/numbering.py``)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        UniqueConstraint("tenant_id", "seq", name="uq_audit_log_tenant_id_seq"),
        # A unique constraint treats every null as different: this one covers operators' rows.
        Index("uq_audit_log_seq_no_tenant", "seq", unique=True,
              postgresql_where=text("tenant_id IS NULL"), sqlite_where=text("tenant_id IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    seq: Mapped[int]
    key_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(120))  # "POST /v1/jobs"
    object_id: Mapped[str | None] = mapped_column(String(200))
    status_code: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    classes: Mapped[list[Any]]
    class_counts: Mapped[dict[str, Any]]  # {"train": {class: n}, "val": {...}}
    num_images: Mapped[int]
    splits: Mapped[dict[str, Any]]  # {"train": n, "val": n | None}
    warnings: Mapped[list[Any]]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Same images with the same labels give the same hash, whatever the archive's order.
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    report: Mapped[dict[str, Any] | None]  # the lint report
    # "labeled", or "unlabeled": images without labels only, for pretraining and pseudo-labels.
    kind: Mapped[str] = mapped_column(String(16), default="labeled", server_default="labeled")
    # A labelled dataset's task, detected at upload: "single_label" or "multi_label".
    task: Mapped[str | None] = mapped_column(String(16))
    # SHA-256 of its images' tar in the blob store (blobs.keys.dataset_key); a worker checks
    # what it fetches against it. A version's tar holds only what it added to its parent.
    blob_sha256: Mapped[str | None] = mapped_column(String(64))
    # A version's parent (null: an upload); not a foreign key, as elsewhere: a parent with
    # versions cannot be deleted (datasets.delete_dataset), which keeps the chain whole.
    parent_id: Mapped[str | None] = mapped_column(String(32), index=True)
    version: Mapped[int] = mapped_column(default=1, server_default="1")
    added: Mapped[dict[str, Any] | None]  # a version's: from where, per class, copies left out


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    # Not a foreign key: a job's record outlives its dataset, which may be deleted later.
    dataset_id: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    epoch: Mapped[int] = mapped_column(default=0)  # epochs finished
    epochs: Mapped[int]
    step: Mapped[int] = mapped_column(default=0)  # batch within the running epoch
    steps: Mapped[int] = mapped_column(default=0)
    best: Mapped[dict[str, Any] | None]
    stopped_early: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(32))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    priority: Mapped[int] = mapped_column(default=5)  # 0 (lowest) to 9 (highest)
    max_runtime_s: Mapped[int | None]
    model_name: Mapped[str | None] = mapped_column(String(200))  # default: the dataset's name
    admitted_at: Mapped[datetime | None]  # handed to the broker by the dispatcher
    retry_at: Mapped[datetime | None]  # a transient failure: not admitted again before this
    hold_reason: Mapped[str | None] = mapped_column(Text)  # why a queued job is held back
    stage: Mapped[str | None] = mapped_column(String(16))  # features | head | finetune | ...
    # While a stage that trains runs: the epochs finished when it began, and its own epochs.
    stage_start_epoch: Mapped[int | None]
    stage_epochs: Mapped[int | None]
    resolved: Mapped[dict[str, Any] | None]  # auto field -> {"value", "why"}
    diagnosis: Mapped[list[Any] | None]  # findings, once the job has finished
    sweep_id: Mapped[str | None] = mapped_column(String(32), index=True)  # a sweep's trial
    # A dataset of kind unlabeled whose images the job's pretraining or pseudo-labels use.
    unlabeled_dataset_id: Mapped[str | None] = mapped_column(String(32), index=True)
    # A JobKind: "finetune" makes a model; "suggest" ranks dataset_id's unlabelled images
    # for labelling with spec["model_id"], and keeps them in result.
    kind: Mapped[str] = mapped_column(String(16), default="finetune", server_default="finetune")
    result: Mapped[dict[str, Any] | None]


class JobRun(Base):
    """One stretch of a job running on a worker: compute-seconds quotas count these."""

    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant_id: Mapped[str] = tenant_column()
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(index=True)


class JobEvent(Base):
    """What happened to a job or a sweep (``job_id`` is either's id), in order: the source
    of the live event streams (SSE). ``kind`` is an ``EventKind`` (``service/events.py``,
    which also says what each kind means on each stream). ``seq`` numbers one subject's
    events 1, 2, 3 ...: the stream's ``id:``, which reveals nothing of other jobs; ``id`` is
    internal (the stream poller's high-water mark)."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_id_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))  # an EventKind
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlobDeletion(Base):
    """A prefix of the blob store whose objects must go. Written in the transaction that
    deletes their rows, removed once the objects are gone: a delete that fails halfway (the
    store down, the process killed) is retried by the API's upkeep (blobs/deletions.py).
    With ``not_before``, a writer's hold on objects whose row is not committed yet: due then,
    unless the row's transaction takes it back first."""

    __tablename__ = "blob_deletions"

    prefix: Mapped[str] = mapped_column(String(300), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    not_before: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class IdempotencyKey(Base):
    """``Idempotency-Key`` of a submission (a job, or a sweep under the key's ``sweep:``
    prefix): the same key and body give the same object (see service/idempotency.py)."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(32))  # the job's or the sweep's id
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EpochMetrics(Base):
    """One row per finished epoch, written by the worker as the epoch ends."""

    __tablename__ = "epoch_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    row: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TunedModel(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version",
                                       name="uq_models_tenant_name_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(200), default="model", index=True)
    version: Mapped[int] = mapped_column(default=1)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    dataset_id: Mapped[str] = mapped_column(String(32), index=True)
    dataset_hash: Mapped[str | None] = mapped_column(String(64))
    backbone: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[Any]]
    metrics: Mapped[dict[str, Any]]  # best epoch, its metrics, stopped_early, epochs run
    spec: Mapped[dict[str, Any]]
    # "single_label" or "multi_label": how its predictions read (models.tasks).
    task: Mapped[str] = mapped_column(String(16), default="single_label",
                                      server_default="single_label")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # the bundle on disk
    exports_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # zip, ONNX, TorchScript
    # SHA-256 of its bundle's tar in the blob store (blobs.keys.model_key).
    blob_sha256: Mapped[str | None] = mapped_column(String(64))
    # Its ONNX Runtime files once prepared (service/serving.py): {"report": the parity and
    # int8 figures (models.serving.prepare), "sha256": of blobs.keys.serving_key's tar}.
    serving: Mapped[dict[str, Any] | None]


class ModelAlias(Base):
    """``name:alias`` (e.g. ``flowers:production``) points at one version of that model,
    within one tenant."""

    __tablename__ = "model_aliases"

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Sweep(Base):
    """A hyperparameter search: its trials are ordinary jobs (``SweepTrial`` links them).
    The study is rebuilt from these rows whenever the sampler or pruner is asked, so nothing
    about it lives in a process."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    dataset_id: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default=SweepStatus.RUNNING, index=True)
    base: Mapped[dict[str, Any]]  # the spec every trial starts from
    space: Mapped[dict[str, Any]]  # spec path -> distribution
    objective: Mapped[str] = mapped_column(String(32))  # val_accuracy | val_loss | val_map
    n_trials: Mapped[int]
    parallelism: Mapped[int]
    pruner: Mapped[str] = mapped_column(String(16))
    sampler: Mapped[str] = mapped_column(String(16))
    max_total_s: Mapped[float | None]
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    priority: Mapped[int] = mapped_column(default=5)
    model_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str | None] = mapped_column(Text)  # why it ended, or why it waits


class SweepTrial(Base):
    """One trial of a sweep: the parameters the sampler chose and the job that trains them.
    Its state and metrics are the job's; ``system_attrs`` keeps what the pruner records
    about it (successive halving's rungs)."""

    __tablename__ = "sweep_trials"
    __table_args__ = (UniqueConstraint("job_id", name="uq_sweep_trials_job_id"),)

    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"),
                                          primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]]
    system_attrs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Every row that belongs to one job, by the column holding the job's id: deleting a job
# (service/jobs.py) and removing a tenant (service/removal.py) delete these with it. A new
# table of per-job rows goes here. (A sweep's trial rows belong to the sweep, not the job.)
JOB_CHILDREN = (EpochMetrics.job_id, JobEvent.job_id, JobRun.job_id, IdempotencyKey.object_id)
