"""The engine's settings are read and validated once; a bad value names its variable. Offline
is the default, set before anything imports huggingface_hub."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftune.models.settings import EngineSettings, SettingsError, load_settings
from ftune.processes import ftune_command

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FTUNE_ALLOW_DOWNLOADS")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OFFLINE_VARIABLES}
    return {**env, **extra}


@pytest.mark.parametrize(("variable", "value"), [
    ("FTUNE_DECODE_CACHE_MB", "4g"), ("FTUNE_DEVICE", "gpu"), ("FTUNE_MAX_IMAGE_PIXELS", "0"),
    ("FTUNE_MIN_IMAGES_PER_CLASS", "many")])
def test_a_bad_value_names_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(EngineSettings)


def test_good_values_are_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("FTUNE_DECODE_CACHE_MB", "512")
    monkeypatch.setenv("FTUNE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("FTUNE_DEVICE", "cuda:1")
    settings = load_settings(EngineSettings)
    assert settings.decode_cache_bytes == 512 * 2**20
    assert settings.weights_dir == tmp_path and settings.device == "cuda:1"


@pytest.mark.processes
def test_a_command_fails_at_start_naming_the_variable():
    # Before: FTUNE_DECODE_CACHE_MB=4g crashed deep inside a run.
    result = subprocess.run(ftune_command("backbones"), capture_output=True, text=True,
                            env=_clean_env(FTUNE_DECODE_CACHE_MB="4g"), timeout=120)
    assert result.returncode == 2
    assert "FTUNE_DECODE_CACHE_MB" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.processes
def test_service_settings_name_their_variables_too():
    result = subprocess.run(ftune_command("api", "--port", "1"), capture_output=True,
                            text=True, env=_clean_env(FTUNE_MAX_ATTEMPTS="three",
                                                      REDIS_URL="redis://127.0.0.1:1/0"),
                            timeout=120)
    assert result.returncode == 2
    assert "FTUNE_MAX_ATTEMPTS" in result.stderr and "Traceback" not in result.stderr


def _hub_offline(code_before: str = "", **env: str) -> str:
    code = (f"{code_before}import ftune.models.backbones.registry\n"
            "import huggingface_hub.constants as c\n"
            "print(c.is_offline_mode())")
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env=_clean_env(**env), timeout=120).stdout.strip()


@pytest.mark.processes
def test_the_hub_is_offline_by_default_in_a_fresh_process():
    assert _hub_offline() == "True"


@pytest.mark.processes
def test_offline_even_when_the_hub_was_imported_first():
    assert _hub_offline("import huggingface_hub, timm\n") == "True"


@pytest.mark.processes
def test_downloads_are_an_explicit_opt_in():
    assert _hub_offline(FTUNE_ALLOW_DOWNLOADS="1") == "False"


def _run(code: str, **env: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env=_clean_env(**env), timeout=120).stdout.strip()


def test_importing_the_engine_leaves_warnings_and_pil_alone():
    # A library user's process is theirs: only the explicit configure step changes them.
    code = ("import warnings\nfrom PIL import Image\n"
            "Image.MAX_IMAGE_PIXELS = None\nbefore = list(warnings.filters)\n"
            "import ftune.models, ftune.models.settings, ftune.models.data.images\n"
            "print(warnings.filters == before, Image.MAX_IMAGE_PIXELS)\n"
            "from ftune.models.settings import EngineSettings, configure\n"
            "configure(EngineSettings(max_image_pixels=10**9))\n"
            "print(any(f[2] is Image.DecompressionBombWarning and f[0] == 'error'"
            " for f in warnings.filters), Image.MAX_IMAGE_PIXELS)")
    assert _run(code).splitlines() == ["True None", f"True {10**9}"]


def test_the_settings_in_use_decide_downloads_and_the_hub_follows():
    code = ("import os\nimport huggingface_hub.constants as c\n"
            "from ftune.models.backbones.weights import downloads_allowed\n"
            "from ftune.models.settings import EngineSettings, configure\n"
            "def show(): print(downloads_allowed(), c.is_offline_mode(),"
            " os.environ.get('HF_HUB_OFFLINE'))\n"
            "show()\n"
            "configure(EngineSettings(allow_downloads=True)); show()\n"
            "configure(EngineSettings(allow_downloads=False)); show()")
    assert _run(code).splitlines() == ["False True 1", "True False None", "False True 1"]
    # The environment's opt-in, and a user's own HF_HUB_OFFLINE, are kept.
    assert _run(code, FTUNE_ALLOW_DOWNLOADS="1").splitlines()[0] == "True False None"
    assert _run(code, FTUNE_ALLOW_DOWNLOADS="yes", HF_HUB_OFFLINE="1").splitlines() == [
        "True True 1", "True True 1", "False True 1"]
