"""The Python client of the ftune API: ``from ftune import Client``.

Needs only httpx (``pip install ftune``); the engine and the service are the ``server`` extra.
"""

from __future__ import annotations

from ftune.client.client import Client
from ftune.client.errors import ApiError, FtuneError, JobFailed
from ftune.client.events import Event
from ftune.client.resources import Dataset, Job, Model

__all__ = ["ApiError", "Client", "Dataset", "Event", "FtuneError", "Job", "JobFailed", "Model"]
