"""One real ``ftune up`` (private Redis, one worker, SQLite) for the people's tools: the Python
client, ``ftune remote`` and the light install, which all talk to it over HTTP."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftune.processes import start_ftune_up
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key


@dataclass(frozen=True)
class Up:
    url: str
    home: Path
    admin_key: str  # an admin of tenant "tools"
    member_key: str
    log: Path  # what ftune up and its processes printed (JSON log lines: FTUNE_LOG_FORMAT)


@pytest.fixture(scope="session")
def up(tmp_path_factory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("up") / "home"
    env = {"FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_LOG_FORMAT": "json"}
    with start_ftune_up(home, env=env) as running:
        database = f"sqlite:///{home / 'ftune.db'}"
        admin = make_key(database, role=Role.ADMIN, tenant="tools")
        member = make_key(database, role=Role.MEMBER, tenant="tools")
        yield Up(running.url, home, admin.key, member.key, running.log)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, driven by Playwright (the browser tests)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, ("Debian's chromium is needed: make test installs it "
                        "(apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()
