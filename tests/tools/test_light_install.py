"""``pip install ftune`` is the client and ``ftune remote`` with httpx alone: the wheel declares
only httpx, and installed in a new venv with nothing but httpx's own dependencies (copied from
this environment: no download) it talks to a real ``ftune up``, and says what to install for
the engine instead of failing on an import."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ftune.testing.wheel import install_fresh

pytestmark = pytest.mark.processes
ROOT = Path(__file__).resolve().parents[2]


def _closure(name: str) -> set[str]:
    """``name`` and every distribution it needs (no extras), as installed here."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        dist = metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _copy_distribution(name: str, target: Path) -> None:
    dist = metadata.distribution(name)
    for file in dist.files or []:
        source = Path(dist.locate_file(file))
        if source.is_file() and ".." not in file.parts:
            (target / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / file)


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> tuple[Path, Path, Path]:
    python, site, wheel = install_fresh(tmp_path_factory.mktemp("light"))
    for name in _closure("httpx"):
        _copy_distribution(name, site)
    return python, site, wheel


def test_the_wheel_requires_only_httpx_and_the_rest_is_the_server_extra(light):
    _, _, wheel = light
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [Requirement(line.split(":", 1)[1].strip())
                    for line in archive.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    plain = {r.name for r in requires if r.marker is None}
    server = {r.name for r in requires if r.marker and r.marker.evaluate({"extra": "server"})
              and not r.marker.evaluate({"extra": ""})}
    assert plain == {"httpx"}
    assert {"torch", "fastapi", "celery", "timm"} <= server


def test_the_client_and_remote_cli_work_with_httpx_alone(light, up, tmp_path):
    python, site, _ = light
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert "torch" not in installed and "fastapi" not in installed and "ftune" in installed
    code = ("import json, sys\n"
            "from ftune import Client\n"
            f"client = Client({up.url!r}, {up.admin_key!r})\n"
            "datasets = [d.id for d in client.datasets.list()]\n"
            "heavy = [m for m in ('torch', 'pydantic', 'fastapi', 'numpy') if m in sys.modules]\n"
            "print(json.dumps({'datasets': datasets, 'heavy': heavy}))\n")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert isinstance(result["datasets"], list) and result["heavy"] == []
    ftune = [python, "-m", "ftune"]
    env = {"FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key, "PATH": "/usr/bin:/bin",
           "FTUNE_REMOTE_CONFIG": str(tmp_path / "remote.json")}
    listed = subprocess.run([*ftune, "remote", "jobs", "list"], capture_output=True,
                            text=True, cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("ID")
    engine = subprocess.run([*ftune, "train", "data", "--out", "m"], capture_output=True,
                            text=True, cwd=tmp_path, env=env)
    assert engine.returncode == 2
    assert "pip install 'ftune[server]'" in engine.stderr and "ftune remote" in engine.stderr
