"""ftune: fine-tune ImageNet-pretrained image classifiers, as a library, a command and a service.

The engine is ``ftune.models`` (pure ML: ``from ftune.models import fit, Predictor``), the HTTP
API ``ftune.service``, the training workers ``ftune.workers`` and the API's Python client
``ftune.client`` (``from ftune import Client``). Nothing is imported eagerly here, so
``import ftune.models`` loads neither the service nor torch, and the client needs only httpx.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Client":
        from ftune.client import Client

        return Client
    raise AttributeError(f"module 'ftune' has no attribute {name!r}")
