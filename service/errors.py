"""Service errors and their HTTP mapping, in one place. Every error body is ``{"detail": ...}``."""

from __future__ import annotations

import errno
import logging
import math
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from ftune.models.errors import FineTuneError
from ftune.models.spec import FineTuneSpec, SpecError
from ftune.service.blobs.base import BlobMissing, is_store_outage
from ftune.service.blobs.keys import describe
from ftune.service.db.migrate import SchemaError

log = logging.getLogger(__name__)

_FIELD_PREFIX = re.compile(r"([A-Za-z_][\w]*(?:\.[\w]+)*): ")

DB_RETRY_AFTER_S = 2


class ServiceError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Unauthorized(ServiceError):
    """No key, or one that is unknown, revoked or expired."""

    status_code = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    """A valid key whose role may not do this."""

    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Vanished(NotFound):
    """What a request was reading was deleted under it (its row looked up, then its object
    removed by a concurrent delete): a 404 naming it, never a 500."""

    @classmethod
    def of_blob(cls, exc: BlobMissing) -> Vanished:
        return cls(f"{describe(exc.key)} is no longer in the store: it was deleted while "
                   "this request ran")


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


class InvalidInput(ServiceError):
    """422. ``errors`` (for programs): where and what; the field is read from a leading
    ``field.path: `` in the message unless ``loc`` is given."""

    status_code = 422

    def __init__(self, detail: str, *, loc: Sequence[str | int] | None = None,
                 kind: str = "invalid") -> None:
        super().__init__(detail)
        if loc is None:
            named = _FIELD_PREFIX.match(detail)
            loc = named.group(1).split(".") if named else []
        self.errors = [{"loc": list(loc), "msg": detail, "type": kind}]


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class _Retryable(ServiceError):
    """An error that waiting may cure; ``retry_after_s`` says how long when we know."""

    def __init__(self, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        if retry_after_s is not None:
            self.headers = retry_after(retry_after_s)


class Unavailable(_Retryable):
    status_code = 503


class TooManyRequests(_Retryable):
    """A quota or a rate limit."""

    status_code = 429


class InsufficientStorage(_Retryable):
    """The data directory's disk is (nearly) full: refused before it fills up."""

    status_code = 507


class DatasetRejected(InvalidInput):
    """A dataset with blocking problems; the response carries the whole lint report."""

    def __init__(self, detail: str, report: dict) -> None:
        super().__init__(detail)
        self.report = report
        self.errors = [{"loc": ["file"], "msg": f"{e['message']}. {e['action']}",
                        "type": e["code"]} for e in report.get("errors", [])] or self.errors


def _service_error(exc: ServiceError) -> JSONResponse:
    body: dict = {"detail": exc.detail}
    if isinstance(exc, InvalidInput):
        body["errors"] = exc.errors
    if isinstance(exc, DatasetRejected):
        body["report"] = exc.report
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _invalid(exc: InvalidInput) -> JSONResponse:
    return JSONResponse({"detail": exc.detail, "errors": exc.errors}, status_code=422)


def validation_error(err: dict, body: object, spec_goes_in: str | None = None) -> dict:
    """One of FastAPI's validation errors for people and programs: the field's path (without
    where it was: body, query, path), a plain message, the type; never the input echoed.
    ``spec_goes_in``: the body field that holds the spec on this route, for the hint when a
    spec field is sent beside it."""
    loc = list(err.get("loc", ()))
    if loc and loc[0] in _PLACES:
        loc = loc[1:]
    if err.get("type") == "json_invalid" and isinstance(body, (str, bytes)):
        return {"loc": [], "msg": _json_problem(err, body), "type": "json_invalid"}
    msg = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    kind = str(err.get("type", "invalid"))
    if kind == "extra_forbidden" and spec_goes_in and _is_spec_field(loc):
        msg = (f"a spec field, which goes inside `{spec_goes_in}`: "
               f'{{"{spec_goes_in}": {{"{loc[0]}": ...}}}}')
    return {"loc": loc, "msg": msg, "type": kind}


_PLACES = frozenset({"body", "query", "path", "header", "cookie"})
# Bodies that carry a spec, by route: a spec field at their top level (`preset`, `epochs`) is
# the usual slip, and the answer names where it goes.
SPEC_HOLDERS = {"/v1/jobs": "spec", "/v1/sweeps": "base"}


def _is_spec_field(loc: list) -> bool:
    return len(loc) == 1 and loc[0] in FineTuneSpec.model_fields


def _json_problem(err: dict, body: str | bytes) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    position = next((p for p in err.get("loc", ()) if isinstance(p, int)), 0)
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    reason = (err.get("ctx") or {}).get("error", "JSON decode error")
    return f"the body is not valid JSON: {reason} at line {line}, column {column}"


def _json(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _is_outage(exc: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


def install_error_handlers(app: FastAPI) -> None:
    _install_request_errors(app)
    _install_server_errors(app)


def _install_request_errors(app: FastAPI) -> None:
    """What the client got wrong (4xx)."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return _service_error(exc)

    @app.exception_handler(BlobMissing)
    async def _vanished(_: Request, exc: BlobMissing) -> JSONResponse:
        # The one place a read of a deleted object becomes an answer: routes look rows up,
        # then read their objects, and a delete may come in between.
        return _service_error(Vanished.of_blob(exc))

    @app.exception_handler(SpecError)
    async def _spec(_: Request, exc: SpecError) -> JSONResponse:
        return _invalid(InvalidInput(str(exc), kind="invalid_spec"))

    @app.exception_handler(FineTuneError)
    async def _engine(_: Request, exc: FineTuneError) -> JSONResponse:
        return _invalid(InvalidInput(str(exc), loc=[], kind=type(exc).__name__))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        holder = SPEC_HOLDERS.get(request.url.path.rstrip("/")) if request.method == "POST" \
            else None
        errors = [validation_error(err, exc.body, holder) for err in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                           if e["type"] != "json_invalid" else e["msg"] for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, exc.detail, getattr(exc, "headers", None))


def _install_server_errors(app: FastAPI) -> None:
    """What went wrong on our side: outages and overload are 503/507, the rest 500."""

    @app.exception_handler(SchemaError)
    async def _schema(_: Request, exc: SchemaError) -> JSONResponse:
        log.error("database schema: %s", exc)
        return _json(503, f"the database schema does not match this server: {exc}")

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or _is_outage(exc):
            log.warning("database unavailable on %s: %s", request.url.path, exc.orig)
            return _json(503, "the database is unavailable; try again shortly",
                         retry_after(DB_RETRY_AFTER_S))
        log.exception("database error on %s %s", request.method, request.url.path)
        return _json(500, "internal database error; see the API log")

    @app.exception_handler(PoolTimeout)
    async def _pool(request: Request, exc: PoolTimeout) -> JSONResponse:
        # Every database connection is busy: the API is overloaded, not broken.
        log.warning("database pool exhausted on %s %s", request.method, request.url.path)
        return _json(503, "the server is busy (no database connection free); try again "
                     "shortly", retry_after(DB_RETRY_AFTER_S))

    @app.exception_handler(OSError)
    async def _os(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the reserve was not enough
            log.error("disk full on %s %s: %s", request.method, request.url.path, exc)
            return _json(507, "the server's data disk is full; ask an operator to free space",
                         retry_after(300))
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, f"internal error ({type(exc).__name__}); see the API log")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_store_outage(exc):  # a backend's own error type: no handler can name it
            log.warning("blob store unavailable on %s: %s", request.url.path, exc)
            return _json(503, "the blob store is unavailable; try again shortly",
                         retry_after(DB_RETRY_AFTER_S))
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, f"internal error ({type(exc).__name__}); see the API log")
