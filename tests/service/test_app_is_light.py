"""The API process loads torch only when it first needs a model, never to start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.processes


def test_creating_the_app_imports_neither_torch_nor_the_workers(tmp_path):
    code = ("import json, sys\n"
            "from ftune.service.app import create_app\n"
            "from ftune.service.settings import Settings\n"
            f"create_app(Settings(home={str(tmp_path)!r}, redis_url='redis://127.0.0.1:1/0'))\n"
            "print(json.dumps(sorted(m for m in sys.modules if m in ('torch', 'timm',"
            " 'torchvision') or m.startswith('ftune.workers'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
