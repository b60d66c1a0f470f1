"""Where ``ftune remote login`` keeps the API address and key: a file only its owner reads."""

from __future__ import annotations

import json
import os
from pathlib import Path


def login_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(os.environ.get("FTUNE_REMOTE_CONFIG") or Path(base) / "ftune" / "remote.json")


def load_login() -> dict[str, str]:
    path = login_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) \
        else {}


def save_login(url: str, api_key: str) -> Path:
    path = login_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": url.rstrip("/"), "api_key": api_key}, out)
    os.replace(tmp, path)
    return path
