"""The engine's configuration: one object, read from ``FTUNE_*`` variables and validated once.

A bad value fails when the settings are first read (at the start of a command or a process),
with a message naming the variable, never deep inside a run. Library users may pass their own
object to ``configure``. The service's settings compose this object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ftune.models import offline
from ftune.models.data.pil_limits import refuse_images_over
from ftune.models.errors import FineTuneError

# PIL's own default: about 9459 × 9459. Larger images are refused from their header.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
ENV_PREFIX = "FTUNE_"


class SettingsError(FineTuneError):
    """A configuration variable with a bad value; the message names it."""


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    device: str | None = Field(
        None, pattern=r"^(cpu|cuda(:\d+)?|mps)$",
        description="cpu, cuda or cuda:N; unset: CUDA when present, else the CPU.")
    weights_dir: Path | None = Field(
        None, description="A folder of <backbone>.safetensors/.pth files, looked at after an "
        "explicit weights_path and before weights shipped in packages.")
    allow_downloads: bool = Field(
        False, description="Let timm download weights from the hub (offline by default).")
    decode_cache_mb: float = Field(
        4096, ge=0, description="Splits whose decoded images fit are decoded once into memory; "
        "larger ones stream from disk every epoch.")
    cache_dir: Path | None = Field(
        None, description="Where decoded images (and later other things derived from a "
        "dataset) are kept for later runs on the same data. The service uses "
        "FTUNE_HOME/cache when unset; `ftune train` keeps nothing then.")
    cache_mb: float = Field(
        20480, ge=0, description="Size cap of the cache; the least recently used entries go "
        "beyond it.")
    share_derived_across_tenants: bool = Field(
        False, description="Let every tenant's jobs reuse the cache entries (decoded images, "
        "frozen features, adapted backbones, fetched datasets) another tenant's jobs made. "
        "This discloses: a job then shows (feature_cache \"reused\", its log, its speed) that "
        "another tenant trained on the same images. Off: each tenant's entries are its own.")
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1,
        description="Larger images are refused from their header, before decoding.")
    max_extracted_mb: float = Field(20480, gt=0, description="Largest unpacked archive.")
    max_archive_files: int = Field(500_000, ge=1, description="Most entries in one archive.")
    min_images_per_class: int = Field(
        2, ge=1, description="Fewest training images a class may have; fewer is an error.")
    max_classes: int = Field(10_000, ge=2, description="Most classes a dataset may have.")
    # Untrusted archives are unpacked and checked in a child process with these limits, so a
    # hostile one costs that child, never the API.
    unpack_memory_mb: int = Field(2048, ge=256, description="Memory of the unpacking child.")
    unpack_cpu_s: int = Field(900, ge=10, description="CPU seconds of the unpacking child.")
    unpack_timeout_s: float = Field(1800, gt=0, description="Wall-clock limit of unpacking "
                                    "and checking one upload.")

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 2**20)

    @property
    def decode_cache_bytes(self) -> int:
        return int(self.decode_cache_mb * 2**20)


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **values: Any) -> S:
    """``cls(**values)`` with validation errors naming the environment variables."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(cls, exc)) from None


def describe_settings_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        field = cls.model_fields.get(name)
        alias = getattr(field, "validation_alias", None) if field else None
        choices = getattr(alias, "choices", None)
        variable = (" or ".join(str(c) for c in choices) if choices
                    else f"{prefix}{name}".upper())
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
        parts.append(f"{variable}: {error['msg']}{shown}")
    return "invalid configuration: " + "; ".join(parts)


_current: EngineSettings | None = None


def engine_settings() -> EngineSettings:
    """The engine's settings, read from the environment on first use."""
    if _current is None:
        return _make_current(load_settings(EngineSettings))
    return _current


def configure(settings: EngineSettings) -> None:
    """Use ``settings`` from now on instead of what the environment says, and set the
    process-wide state they decide: PIL refuses images over ``max_image_pixels``, and the
    model hub is online only if ``allow_downloads``.

    The explicit start-up step: ftune's commands, API, workers and sandbox child call it; a
    library user may, to get the same guards. Importing ``ftune.models`` changes no warnings
    filter or PIL limit.
    """
    _make_current(settings)
    # PIL's own check never refuses below its default, nor below ours (open_checked refuses
    # from our limit itself, naming it).
    refuse_images_over(max(settings.max_image_pixels, DEFAULT_MAX_IMAGE_PIXELS))


def _make_current(settings: EngineSettings) -> EngineSettings:
    global _current
    _current = settings
    # The hub follows the settings in use, whoever made them: one source for downloads.
    offline.use_downloads(settings.allow_downloads)
    return settings


__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "EngineSettings",
           "SettingsError", "configure", "engine_settings", "load_settings"]
