"""Put the editable install's import finder first, so ``import ftune`` finds this checkout
wherever Python starts (`make install` runs this after ``pip install -e .``).

setuptools' editable finder is appended to sys.meta_path, after the standard PathFinder.
Started in the folder that holds the clone, when the clone's folder is named ``ftune``,
PathFinder finds that folder first (no __init__.py, so a namespace package) and
``from ftune import Client`` fails. A .pth file processed after setuptools' own (site reads
them in sorted order) moves the editable finder to the front; it only answers for ftune's own
names, so every other import is found as before. Run: .venv/bin/python tools/editable_first.py
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "ftune-editable-first.pth"
# One line, run by site at start-up: a stable sort moves the editable finder (whatever
# version its module name carries) to the front and keeps the others in their order.
PTH_LINE = ("import sys; sys.meta_path.sort(key=lambda finder: not getattr(finder, "
            "'__module__', '').startswith('__editable___ftune_'))\n")


def main() -> int:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    editable = sorted(p.name for p in site_packages.glob("__editable__.ftune-*.pth"))
    if not editable:
        print(f"no editable install of ftune in {site_packages}: run `pip install -e .` first",
              file=sys.stderr)
        return 1
    # site processes .pth files in sorted order: ours must come after setuptools' own.
    assert all(name < PTH_NAME for name in editable), (editable, PTH_NAME)
    (site_packages / PTH_NAME).write_text(PTH_LINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
