"""HTTP to the API: authentication, retries that honour ``Retry-After``, an
``Idempotency-Key`` on every POST, and errors as exceptions carrying the API's ``detail``."""

from __future__ import annotations

import email.utils
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from ftune.client.errors import ApiError, FtuneError

RETRY_STATUSES = frozenset({429, 503})
# Failures where the request may not have reached the server, or its answer was lost: safe to
# repeat, since every POST carries an idempotency key. A refused connection is one of them only
# once this client has reached the server (see Transport.request).
RETRY_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError,
                httpx.RemoteProtocolError, httpx.ConnectTimeout, httpx.PoolTimeout)


def connection_refused(exc: BaseException) -> bool:
    """Whether nothing listens at the address: httpx wraps the socket's error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Transport:
    def __init__(self, url: str, api_key: str, *, timeout: float = 60.0, retries: int = 5,
                 max_wait_s: float = 60.0, user_agent: str = "ftune-client") -> None:
        self.url = url.rstrip("/")
        self.retries, self.max_wait_s = retries, max_wait_s
        self.reached = False  # whether any request got an answer from the server
        self.http = httpx.Client(base_url=self.url + "/v1", timeout=timeout, headers={
            "Authorization": f"Bearer {api_key}", "User-Agent": user_agent})

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict | None = None, files: Callable[[], dict | list] | None = None,
                headers: dict | None = None) -> httpx.Response:
        """Send, retrying 429/503 and lost connections; raise ApiError on any other error.
        ``files`` makes the multipart files afresh for each attempt (a stream is read once).

        A refused connection before the server ever answered fails at once: nothing listens
        there (not started, or the wrong address), and retrying would only hide that for
        the whole backoff. Once the server has answered, a refusal is most likely a restart,
        and is retried like any lost connection (a long ``job.wait()`` rides it out)."""
        headers = dict(headers or {})
        if method == "POST":
            headers.setdefault("Idempotency-Key", uuid.uuid4().hex)  # the same on every retry
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.http.request(method, path, json=json, params=params,
                                             files=files() if files else None, headers=headers)
            except RETRY_ERRORS as exc:
                if not self.reached and connection_refused(exc):
                    raise FtuneError(self.not_running()) from exc
                if last:
                    raise FtuneError(f"{method} {self.url}/v1{path}: {exc}") from exc
                time.sleep(self._backoff(attempt))
                continue
            self.reached = True
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(self.wait_for(response, attempt))
                continue
            raise_for_error(response, method, path)
            return response
        raise AssertionError("unreachable")

    def stream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An open streaming response (the caller closes it); errors raised as ApiError."""
        request = self.http.build_request(method, path, **kwargs)
        try:
            response = self.http.send(request, stream=True)
        except httpx.ConnectError as exc:
            if not self.reached and connection_refused(exc):
                raise FtuneError(self.not_running()) from exc
            raise
        self.reached = True
        if response.is_error:
            response.read()
            response.close()
            raise_for_error(response, method, path)
        return response

    def not_running(self) -> str:
        return (f"cannot connect to {self.url}: connection refused. Is the server running? "
                "(make up, or ftune up; else check the address: --url or FTUNE_URL)")

    def _backoff(self, attempt: int) -> float:
        return min(self.max_wait_s, 0.5 * 2 ** attempt)

    def wait_for(self, response: httpx.Response, attempt: int) -> float:
        """Seconds to wait before retrying: the server's ``Retry-After`` (seconds or a date),
        else exponential backoff; never more than ``max_wait_s``."""
        value = response.headers.get("Retry-After", "").strip()
        wait = None
        if value.isdigit():
            wait = float(value)
        elif value:
            try:
                wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                wait = None
        return min(self.max_wait_s, max(0.0, wait if wait is not None
                                        else self._backoff(attempt)))


def raise_for_error(response: httpx.Response, method: str, path: str) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        detail = response.text[:500] or response.reason_phrase
    errors = body.get("errors") if isinstance(body, dict) else None
    raise ApiError(response.status_code, detail, errors if isinstance(errors, list) else None,
                   method=method, path=path)
