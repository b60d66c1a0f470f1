"""How many dataset uploads run at once: per tenant over every API process, and per process.

An upload holds both slots from before its body is read until it is answered, so a slow
body holds them too (``body_limits`` drops one that stalls), and each upload ends in at most
one unpacking child with its own memory and CPU limits (``models.data.sandbox``): the
process's count bounds those children.

- **Per tenant** (FTUNE_MAX_UPLOADS_PER_TENANT, or the tenant's ``uploads_at_once`` quota):
  leases in one Redis sorted set per tenant, a random token each, scored with the time
  (Redis's clock, so hosts' clocks do not matter) the lease lapses. A holder renews its lease
  every ``RENEW_S``; the lease of an API process that died lapses after ``LEASE_S``, so a
  crash keeps no slot for long. Over the limit: 429 with Retry-After. When Redis cannot be
  reached the tenant's uploads are not counted (logged) and the upload goes on, as with the
  rate limits: the per-process cap still bounds what it may cost.
- **Per process** (FTUNE_MAX_UNPACKS): a counter in memory. Over it: 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import redis
from starlette.concurrency import run_in_threadpool

from ftune.service.errors import TooManyRequests, Unavailable

log = logging.getLogger(__name__)

LEASE_S = 60.0
RENEW_S = 15.0
RETRY_AFTER_S = 10
PREFIX = "ftune:uploads:"

# KEYS[1] the tenant's set; ARGV: limit, lease in ms, token. 1: taken, 0: the tenant is full.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
# KEYS[1] the tenant's set; ARGV: lease in ms, token. Extends a lease still held.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


@dataclass(frozen=True)
class Lease:
    key: str
    token: str


class TenantLeases:
    """At most ``limit`` leases per tenant, kept in Redis (see the module's text)."""

    def __init__(self, client: redis.Redis, lease_s: float = LEASE_S) -> None:
        self.client, self.lease_ms = client, int(lease_s * 1000)
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)

    def take(self, tenant_id: str, limit: int) -> Lease | None:
        """A lease, or None when Redis cannot be reached (not counted); 429 when full."""
        lease = Lease(PREFIX + tenant_id, secrets.token_hex(16))
        try:
            taken = self._take(keys=[lease.key], args=[limit, self.lease_ms, lease.token])
        except (redis.RedisError, OSError) as exc:
            log.warning("uploads of tenant %s not counted (Redis unreachable): %s", tenant_id,
                        exc)
            return None
        if not taken:
            raise TooManyRequests(
                f"this tenant already has {limit} uploads in progress "
                "(FTUNE_MAX_UPLOADS_PER_TENANT, or the tenant's uploads_at_once quota); wait "
                "for one to finish", retry_after_s=RETRY_AFTER_S)
        return lease

    def renew(self, lease: Lease) -> None:
        try:
            self._renew(keys=[lease.key], args=[self.lease_ms, lease.token])
        except (redis.RedisError, OSError) as exc:
            log.warning("upload lease not renewed (Redis unreachable): %s", exc)

    def release(self, lease: Lease) -> None:
        try:
            self.client.zrem(lease.key, lease.token)
        except (redis.RedisError, OSError) as exc:  # it lapses by itself
            log.warning("upload lease not released (Redis unreachable): %s", exc)


class ProcessSlots:
    """At most ``limit`` uploads in this process; 503 past it."""

    def __init__(self, limit: int) -> None:
        self.limit, self.taken = limit, 0
        self._lock = threading.Lock()

    def take(self) -> Callable[[], None]:
        """Take a slot; returns the function that gives it back (once, however often
        called)."""
        with self._lock:
            if self.taken >= self.limit:
                raise Unavailable(f"this server is streaming and unpacking as many uploads as "
                                  f"it allows ({self.limit}, FTUNE_MAX_UNPACKS); try again "
                                  "shortly", retry_after_s=RETRY_AFTER_S)
            self.taken += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self.taken -= 1

        return release


class UploadGate:
    """Both counts, taken together for one upload."""

    def __init__(self, tenants: TenantLeases, max_unpacks: int) -> None:
        self.tenants, self.process = tenants, ProcessSlots(max_unpacks)

    @contextlib.asynccontextmanager
    async def slots(self, tenant_id: str, per_tenant: int) -> AsyncIterator[None]:
        """Hold a slot of the tenant's (429 when it has none free) and one of this
        process's (503) while the block runs."""
        lease = await run_in_threadpool(self.tenants.take, tenant_id, per_tenant)
        try:
            release = self.process.take()
            renewing = asyncio.create_task(self._renew_forever(lease)) if lease else None
            try:
                yield
            finally:
                release()
                if renewing is not None:
                    renewing.cancel()
        finally:
            if lease is not None:
                # Shielded: a cancelled request still gives its lease back.
                done = asyncio.get_running_loop().run_in_executor(None, self.tenants.release,
                                                                  lease)
                await asyncio.shield(done)

    async def _renew_forever(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            await run_in_threadpool(self.tenants.renew, lease)
