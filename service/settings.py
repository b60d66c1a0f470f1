"""One settings object for the API, the workers and ``ftune up``, read from the environment.

It composes the engine's own settings (``ftune.models.settings``: device, weights, decoding and
dataset limits); processes read it once at start-up with ``load`` (a bad value names its
variable) and hand the engine part to the engine with ``ftune.models.settings.configure``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ftune.models.settings import EngineSettings, engine_settings, load_settings

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
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    max_upload_mb: float = Field(2048, gt=0, description="Largest dataset upload accepted.")
    max_predict_images: int = Field(64, ge=1, description="Most images in one predict request.")
    max_predict_image_mb: float = Field(20, gt=0, description="Largest image accepted by predict.")
    predictor_cache_mb: float = Field(2048, gt=0, description="Memory for tuned models kept "
                                      "loaded by each API process (least recently used "
                                      "evicted).")
    predict_max_batch: int = Field(32, ge=1, description="Most images in one batched forward.")
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
    cancel_poll_s: float = Field(0.5, gt=0, description="How often a running job checks cancel.")
    worker_heartbeat_s: float = Field(5.0, gt=0, description="Worker and running-job heartbeat.")
    job_stale_s: float = Field(
        120.0, gt=0, description="A running job without a heartbeat for this long is "
        "abandoned; a redelivery may then take it over (resuming from its checkpoint).")

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
