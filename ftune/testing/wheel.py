"""The project built as a wheel and installed, alone, into a new venv outside the repository:
what a user's ``pip install`` would give, for the packaging tests. Nothing is downloaded;
the caller adds whatever dependencies the test needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("ftune", "models", "service", "workers")


def install_fresh(work: Path) -> tuple[Path, Path, Path]:
    """Build the wheel from a copy of the sources (building writes nothing into the
    repository) and install it with no dependencies into a new venv under ``work``.
    Returns the venv's python, its site-packages and the wheel."""
    source = work / "src"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(work / "dist"), str(source)], check=True, cwd=work)
    wheel = next((work / "dist").glob("ftune-*.whl"))
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(wheel)], check=True, cwd=work)
    return python, site, wheel
