"""The settings of an ``ftune`` process: read and validated once, the engine's part handed to
the engine."""

from __future__ import annotations

from ftune.models.settings import EngineSettings, configure, load_settings
from ftune.service import settings as service_settings
from ftune.service.settings import Settings
from ftune.service.storage import keep_private


def process_settings(*, home: str | None = None, api_host: str | None = None,
                     device: str | None = None) -> Settings:
    """Settings from the environment and the command's options (``--home``, ``--host``,
    ``--device``); a bad value raises SettingsError naming its variable."""
    engine = load_settings(EngineSettings, **({"device": device} if device else {}))
    values: dict[str, object] = {"engine": engine}
    if home:
        values["home"] = home
    if api_host:
        values["api_host"] = api_host
    settings = service_settings.load(**values)
    configure(settings.engine)
    keep_private(settings.resolved_home)  # before any file of the data directory is made
    return settings
