"""Installed, everything lives under one namespace: ``ftune.models``, ``ftune.service``,
``ftune.workers``; nothing named ``models``, ``service`` or ``workers`` lands in site-packages,
where it would clash with a user's own modules."""

from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from ftune.testing.wheel import SOURCES, install_fresh

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory) -> tuple[Path, Path]:
    """The project built as a wheel and installed into a new venv outside the repository.

    Its dependencies come from the test environment's site-packages through a .pth file, so
    nothing is downloaded; the editable install there is not activated (.pth files in a path
    added by a .pth file are not processed)."""
    python, target, _ = install_fresh(tmp_path_factory.mktemp("fresh-install"))
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}
            if Path(p).is_dir()]
    (target / "zz_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return python, target


def _run(python: Path, code: str, cwd: Path) -> dict:
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True,
                         cwd=cwd).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.processes
def test_the_wheel_installs_only_the_ftune_namespace(fresh_install):
    _, site_packages = fresh_install
    top_level = {p.name for p in site_packages.iterdir()
                 if not p.name.endswith((".dist-info", ".pth", "__pycache__"))
                 and p.name != "bin"}  # the `ftune` console script
    assert top_level == {"ftune"}, top_level
    assert (site_packages / "ftune" / "models" / "spec.py").is_file()
    assert (site_packages / "ftune" / "service" / "app.py").is_file()
    assert (site_packages / "ftune" / "workers" / "tasks.py").is_file()
    migrations = site_packages / "ftune" / "service" / "db" / "migrations"
    assert (migrations / "env.py").is_file() and (migrations / "script.py.mako").is_file()
    assert (migrations / "versions" / "0001_baseline.py").is_file()


@pytest.mark.processes
def test_the_installed_namespace_imports_outside_the_repository(fresh_install, tmp_path):
    python, site_packages = fresh_install
    result = _run(python, (
        "import importlib.util, json, sys\n"
        "import ftune.models.spec\n"
        "spec_loaded = sorted(m for m in sys.modules if m.startswith('ftune.'))\n"
        "import ftune.models, ftune.service.settings\n"
        "print(json.dumps({'file': ftune.models.__file__, 'spec_loaded': spec_loaded,\n"
        "  'bare': [n for n in ('models', 'service', 'workers') if importlib.util.find_spec(n)],\n"
        "  'heavy': [m for m in ('torch', 'timm', 'fastapi') if m in sys.modules]}))\n"),
        cwd=tmp_path)
    assert result["file"].startswith(str(site_packages))
    assert result["bare"] == []  # no top-level `models` etc. was installed
    # The spec alone pulls in neither the service nor the workers nor torch.
    assert not [m for m in result["spec_loaded"] if m.startswith(("ftune.service",
                                                                   "ftune.workers"))]
    assert result["heavy"] == []


@pytest.mark.processes
def test_the_wheel_carries_every_data_file_and_builds_without_warnings(tmp_path):
    """include-package-data is off (it made setuptools warn that dashboard/static is an
    undeclared package), so only the package-data globs put non-Python files in the wheel:
    each one in the source folders must be there."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    data = set()
    for folder, installed in zip(SOURCES, ("ftune", "ftune/models", "ftune/service",
                                           "ftune/workers"), strict=True):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
        data |= {f"{installed}/{p.relative_to(ROOT / folder).as_posix()}"
                 for p in (ROOT / folder).rglob("*")
                 if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "Warning" not in build.stdout + build.stderr, build.stdout + build.stderr
    with zipfile.ZipFile(next((tmp_path / "dist").glob("ftune-*.whl"))) as wheel:
        names = set(wheel.namelist())
    assert {"ftune/service/db/migrations/script.py.mako",
            "ftune/service/dashboard/static/index.html"} <= data
    assert data - names == set(), "declare these in pyproject's package-data"


@pytest.mark.processes
def test_the_checkout_wins_over_a_folder_named_ftune_where_python_starts(tmp_path):
    """Started in the folder holding a clone named ftune, Python sees that folder as a
    namespace package `ftune` before setuptools' editable finder, unless
    tools/editable_first.py (make install) moved that finder to the front."""
    (tmp_path / "ftune").mkdir()  # the clone's folder, as seen from its parent
    started = subprocess.run([sys.executable, "-c", "import ftune; from ftune import Client; "
                              "print(ftune.__file__)"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert started.returncode == 0, started.stderr  # cannot import name 'Client' from 'ftune'
    assert started.stdout.strip() == str(ROOT / "ftune" / "__init__.py")


def _pins(lock: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", lock.read_text(), re.M))


def test_the_environment_is_installed_from_the_locks():
    pins = {**_pins(ROOT / "requirements-dev.lock"), **_pins(ROOT / "requirements-nodeps.lock")}
    assert {"torch", "fastapi", "alembic", "pytest"} <= set(pins)
    wrong = {name: (version, metadata.version(name)) for name, version in pins.items()
             if metadata.version(name) != version}
    assert not wrong, f"installed versions differ from the lock (run `make install`): {wrong}"


def test_the_runtime_lock_agrees_with_the_dev_lock_and_every_pin_is_hashed():
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert all(dev.get(name) == version for name, version in runtime.items())
    for lock in ("requirements.lock", "requirements-dev.lock", "requirements-nodeps.lock"):
        text = (ROOT / lock).read_text()
        assert "Linux x86_64" in text  # says which platform it is for
        blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", text, flags=re.M)[1:]
        assert blocks and all("--hash=sha256:" in block for block in blocks), lock


@pytest.mark.parametrize(("package", "floor"), [
    ("starlette", "0.49.1"), ("python-multipart", "0.0.27"), ("h11", "0.16"),
    ("pillow", "12.3.0")])
def test_dependencies_with_known_security_fixes_have_floors(package, floor):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["server"]
    requirement = next(Requirement(d) for d in declared if Requirement(d).name == package)
    lowest = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert lowest and min(lowest) >= Version(floor), requirement
    assert requirement.specifier.contains(_pins(ROOT / "requirements.lock")[package])
