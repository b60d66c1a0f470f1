"""One settings object for the API, the workers and ``ftune up``, read from the environment.

It composes the engine's own settings (``ftune.models.settings``: device, weights, decoding and
dataset limits); processes read it once at start-up with ``load`` (a bad value names its
variable) and hand the engine part to the engine with ``ftune.models.settings.configure``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ftune.models.serving.engines import ServePolicy
from ftune.models.settings import EngineSettings, engine_settings, load_settings
from ftune.service.blobs.open import check_storage_url

WEEK_S = 7 * 24 * 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FTUNE_", extra="ignore")

    engine: EngineSettings = Field(default_factory=engine_settings,
                                   description="The engine's settings (FTUNE_DEVICE, ...).")

    home: Path = Field(Path("var"), description="Data directory: database, datasets, models.")
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "FTUNE_DATABASE_URL"),
        description="SQLAlchemy URL; default SQLite at HOME/ftune.db.")
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "FTUNE_REDIS_URL"),
        description="Celery broker; `ftune up` starts a private Redis when unset.")
    storage: str | None = Field(
        None, description="Where blobs are kept: empty for HOME/blobs, file:///PATH, or "
        "s3://BUCKET[/PREFIX] for an S3-compatible store (endpoint, region and credentials "
        "from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).")
    api_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line (ts, level, logger, message, "
        "job_id, tenant), for log collectors.")
    api_port: int = Field(8000, ge=0, le=65535)
    max_upload_mb: float = Field(2048, gt=0, description="Largest dataset upload accepted.")
    max_predict_images: int = Field(64, ge=1, description="Most images in one predict request.")
    max_predict_image_mb: float = Field(20, gt=0, description="Largest image accepted by predict.")
    max_explain_images: int = Field(8, ge=1, description="Most images in one predict request "
                                    "with explain=true (each costs a backward pass).")
    predictor_cache_mb: float = Field(2048, gt=0, description="Memory for tuned models kept "
                                      "loaded by each API process (least recently used "
                                      "evicted).")
    predict_max_batch: int = Field(32, ge=1, description="Most images in one batched forward.")
    serve_engine: ServePolicy = Field(
        "auto", description="What runs /predict's forward passes: auto (ONNX Runtime once a "
        "model's export passes its parity check against torch, torch until then and where it "
        "fails), torch, onnxruntime (always; a model failing parity is refused), or int8 (as "
        "auto, with the int8 model where its guard passed). See README, Serving engines.")
    serve_lanes: int = Field(
        0, ge=0, description="Forwards /predict runs at once on a CPU, each on its share of "
        "the cores (0: one per core, at most 4; 1: one forward at a time on every core). A "
        "request that finds them idle and nobody waiting runs on every core.")
    predict_max_wait_ms: float = Field(5.0, ge=0, description="Longest a predict request "
                                       "waits for others to batch with.")
    visibility_timeout_s: int = Field(
        WEEK_S, ge=60,
        description="Redis redelivers an unacknowledged job after this long; longer than any job.")
    max_runtime_s: float = Field(WEEK_S, gt=0, description="Longest a job may run; "
                                 "a job's own max_runtime_s may be lower.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job (worker deaths and "
                              "transient errors) before it fails.")
    retry_backoff_s: float = Field(5.0, ge=0, description="First wait before a transient "
                                   "error is retried; doubles each time.")
    reconcile_interval_s: float = Field(10.0, gt=0, description="How often the reconciler "
                                        "looks for lost and abandoned jobs.")
    cancel_poll_s: float = Field(0.5, gt=0, description="How often a running job looks for "
                                 "a cancel request, also between progress writes.")
    progress_interval_s: float = Field(0.5, gt=0, description="How often a running job "
                                       "writes its batch progress (and heartbeat) to the "
                                       "database; each write also looks for a cancel.")
    worker_heartbeat_s: float = Field(5.0, gt=0, description="Worker and running-job heartbeat.")
    job_stale_s: float = Field(
        120.0, gt=0, description="A running job without a heartbeat for this long is "
        "abandoned; a redelivery may then take it over (resuming from its checkpoint).")
    dispatch_interval_s: float = Field(1.0, gt=0, description="How often each API process "
                                       "admits waiting jobs to free workers (also done when a "
                                       "job is submitted and when a worker finishes one).")

    # Sharing: keys, hosts, limits.
    auth: Literal["on", "off"] = Field(
        "on", description="off: no keys, every request acts as an operator in the default "
        "tenant; allowed only when the API listens on a loopback address.")
    allowed_hosts: str = Field(
        "localhost,127.0.0.1,::1", description="Host headers the API answers (comma-separated; "
        "`*` for any): defeats DNS rebinding. Add the name clients use behind a proxy.")
    key_cache_s: float = Field(1.0, gt=0, le=1.0, description="How long an API process trusts "
                               "a key it looked up; a revoked key stops working within this.")
    rate_uploads: str = Field("30/minute", description="Dataset uploads per key.")
    rate_jobs: str = Field("120/minute", description="Job submissions per key.")
    rate_predictions: str = Field("1200/minute", description="Predict requests per key.")

    # What a job may ask for (checked at submit, without torch).
    backbone_max_params_m: float = Field(30, gt=0, description="Largest measured timm "
                                         "architecture (million parameters) a job may train "
                                         "from scratch.")
    backbones_with_weights: str = Field("", description="Backbones whose weights are in the "
                                        "workers' FTUNE_WEIGHTS_DIR (comma-separated): jobs "
                                        "may use them with pretrained: true.")
    worker_memory_gb: float | None = Field(None, gt=0, description="Memory of the smallest "
                                           "worker device; set it to refuse specs that cannot "
                                           "fit at submit (workers always check).")
    max_job_devices: int | None = Field(
        None, ge=1, description="Most devices (spec.devices) one job may ask for; more is "
        "refused at submit (422). Unset: no cap, and a job that asks for more devices than "
        "any live worker has waits, its hold_reason saying so, until such a worker starts "
        "(workers come and go, so the live ones are no reason to refuse).")

    # This worker process (`ftune worker`).
    worker_devices: str | None = Field(
        None, pattern=r"^\s*(all|\d+(\s*,\s*\d+)*)\s*$",
        description="Devices of each worker (`ftune worker --devices` wins): N (the first N "
        "GPUs, or N CPU ranks with FTUNE_DEVICE=cpu), all (every visible GPU), or GPU "
        "numbers 0,1. Unset: one device.")

    # What one client may hold of the API process (connections, threads, disk).
    limit_concurrency: int = Field(1000, ge=1, description="Connections and requests the API "
                                   "serves at once; more get 503 at once.")
    keep_alive_s: float = Field(5, gt=0, description="Idle keep-alive connections close after "
                                "this long.")
    header_timeout_s: float = Field(10, gt=0, description="A connection whose request headers "
                                    "are not complete this long after it opened (or after "
                                    "its last response) is closed.")
    upload_idle_timeout_s: float = Field(30, gt=0, description="An upload that sends nothing "
                                         "for this long is dropped and its partial file "
                                         "removed.")
    max_streams: int = Field(500, ge=1, description="Event streams open at once on one API "
                             "process.")
    max_streams_per_key: int = Field(20, ge=1, description="Event streams one key may hold "
                                     "open on one API process.")
    max_streams_per_tenant: int = Field(50, ge=1, description="Event streams the keys of one "
                                        "tenant may hold open on one API process together.")
    max_keys_per_tenant: int = Field(20, ge=1, description="API keys a tenant may hold (revoked "
                                     "and expired ones do not count); its `keys` quota may "
                                     "differ.")
    max_uploads_per_tenant: int = Field(2, ge=1, description="Dataset uploads one tenant may "
                                        "stream and unpack at once, over every API process "
                                        "(counted in Redis); its `uploads_at_once` quota may "
                                        "differ. More get 429 with Retry-After.")
    max_unpacks: int = Field(4, ge=1, description="Dataset uploads one API process streams and "
                             "unpacks at once (each unpacks in a child process with "
                             "FTUNE_UNPACK_MEMORY_MB and FTUNE_UNPACK_CPU_S); more get 503 "
                             "with Retry-After.")
    min_free_disk_mb: float = Field(2048, ge=0, description="Uploads are refused (507) when "
                                    "the data directory's disk has less free than this.")
    db_pool_timeout_s: float = Field(10, gt=0, description="How long a request waits for a "
                                     "free database connection; then 503 with Retry-After.")
    presigned_downloads: bool = Field(
        False, description="Model downloads answer 307 to a presigned URL of the S3 store "
        "(clients must reach AWS_ENDPOINT_URL) instead of passing through the API.")
    presigned_ttl_s: int = Field(300, ge=10, le=7 * 24 * 3600, description="How long a "
                                 "presigned download URL works.")
    export_timeout_s: float = Field(900, gt=0, description="Longest an ONNX or TorchScript "
                                    "export may take (it runs in a child process).")
    exports_at_once: int = Field(1, ge=1, description="ONNX or TorchScript exports built at "
                                 "once by one API process; more get 503 with Retry-After.")

    # Default quotas of every tenant; operators override them per tenant.
    quota_stored_gb: float = Field(200, gt=0, description="Datasets, models and exports.")
    quota_datasets: int = Field(200, ge=0, description="Datasets a tenant may hold.")
    quota_active_jobs: int = Field(100, ge=0, description="Queued plus running jobs.")
    quota_running_jobs: int = Field(8, ge=0, description="Jobs running at once.")
    quota_epoch_images: int = Field(50_000_000, ge=1, description="Epochs × images of one job.")
    quota_compute_hours: float = Field(192, ge=0, description="Worker hours per rolling 24 h.")
    max_running_sweeps: int = Field(10, ge=0, description="Sweeps a tenant may run at once "
                                    "(their trials also count as jobs against the quotas).")

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        return check_storage_url(value)

    @field_validator("rate_uploads", "rate_jobs", "rate_predictions")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"not a rate like '30/minute': {exc}") from exc
        return value

    @property
    def extra_weighted_backbones(self) -> list[str]:
        return [b.strip() for b in self.backbones_with_weights.split(",") if b.strip()]

    @property
    def host_patterns(self) -> list[str]:
        hosts = [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        # A Host header writes an IPv6 address in brackets ([::1]:8000), and is compared so.
        return hosts + [f"[{h}]" for h in hosts if ":" in h and not h.startswith("[")]

    @cached_property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_home / 'ftune.db'}"

    @property
    def broker_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("REDIS_URL is not set (`ftune up` starts a private Redis for you)")
        return self.redis_url


def load(**values: object) -> Settings:
    """Settings from the environment and ``values``; a bad value raises ``SettingsError``
    naming its variable."""
    return load_settings(Settings, **values)
