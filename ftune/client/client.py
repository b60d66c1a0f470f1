"""``Client(url, api_key)``: datasets, jobs, models and sweeps of one ftune API."""

from __future__ import annotations

import os

from ftune import __version__
from ftune.client.config import load_login
from ftune.client.errors import FtuneError
from ftune.client.resources import Datasets, Jobs, Models, Sweeps
from ftune.client.transport import Transport


class Client:
    """The API at ``url`` with ``api_key``. Either may come from ``FTUNE_URL`` and
    ``FTUNE_API_KEY``, or from the file ``ftune remote login`` writes.

    ``retries``: how often a 429/503 or a lost connection is retried (``Retry-After`` is
    honoured, up to ``max_wait_s`` a time); a refused connection before the server has ever
    answered is not (nothing listens there: it fails at once, naming the address).
    ``progress``: upload progress bars on stderr."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 5, max_wait_s: float = 60.0,
                 progress: bool = False) -> None:
        saved = load_login()
        url = url or os.environ.get("FTUNE_URL") or saved.get("url")
        api_key = api_key or os.environ.get("FTUNE_API_KEY") or saved.get("api_key")
        if not url or not api_key:
            raise FtuneError("no API address or key: pass Client(url, api_key), set FTUNE_URL "
                             "and FTUNE_API_KEY, or run `ftune remote login`")
        self.url = url.rstrip("/")
        self._transport = Transport(self.url, api_key, timeout=timeout, retries=retries,
                                    max_wait_s=max_wait_s,
                                    user_agent=f"ftune-client/{__version__}")
        self.datasets = Datasets(self._transport, progress)
        self.jobs = Jobs(self._transport)
        self.models = Models(self._transport)
        self.sweeps = Sweeps(self._transport)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"
