"""What the client raises: the API's own words, never a bare status code."""

from __future__ import annotations

from typing import Any


class FtuneError(Exception):
    """Anything the client could not do."""


class ApiError(FtuneError):
    """The API answered with an error; ``detail`` is its explanation, ``errors`` the
    structured list a 422 carries (``[{"loc": ["spec", "epochs"], "msg": ..., "type": ...}]``)."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None,
                 *, method: str = "", path: str = "") -> None:
        self.status, self.detail, self.errors = status, detail, errors or []
        self.method, self.path = method, path
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status} {detail}")


class JobFailed(FtuneError):
    """``job.wait()`` saw the job end in a state other than succeeded."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        super().__init__(f"job {job['id']} ended {job['status']}"
                         + (f": {job['error']}" if job.get("error") else ""))
