"""What the operator and the tenants' admins do meanwhile: make member keys and revoke them (a
revoked key must stop working within FTUNE_KEY_CACHE_S), and the operator changes the tenants'
quotas."""

from __future__ import annotations

import random
import threading
import time

from ftune.testing.soak.api import RecordingClient
from ftune.testing.soak.journal import Journal
from ftune.testing.soak.tenants import Tenants, TenantState

KEY_CACHE_S = 1.0  # FTUNE_KEY_CACHE_S's default
# Quotas drawn for a tenant: loose most of the time, sometimes tight enough to bite (429s).
QUOTA_CHOICES = {"datasets": (2, 50), "active_jobs": (1, 50), "stored_gb": (0.0005, 10.0)}
LOOSE = {name: values[-1] for name, values in QUOTA_CHOICES.items()}


class OperatorActor(threading.Thread):
    def __init__(self, tenants: Tenants, api_url: str, operator_key: str, journal: Journal,
                 seed: int, halt: threading.Event) -> None:
        super().__init__(name="soak-operator", daemon=True)
        self.tenants, self.api_url, self.journal, self.halt = tenants, api_url, journal, halt
        self.rng = random.Random(f"{seed}-operator")
        self.api = RecordingClient(api_url, operator_key, "operator", journal)
        self.admins = {state.name: RecordingClient(api_url, state.key, f"{state.name}-admin",
                                                   journal) for state in tenants.states}
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(1.0, 3.0)):
            tenant = self.rng.choice(self.tenants.states)
            try:
                if self.rng.random() < 0.5:
                    self.revoke_a_new_key(tenant)
                else:
                    self.change_quotas(tenant)
            except Exception as exc:  # the harness's own mistake: reported, never hidden
                self.errors.append(f"operator: {exc!r}")
        for tenant in self.tenants.states:  # the end: every tenant as it started
            self.api.request("PUT", f"/v1/tenants/{tenant.name}/quotas",
                             "/v1/tenants/{id}/quotas", json=LOOSE)
        for client in [self.api, *self.admins.values()]:
            client.close()

    def revoke_a_new_key(self, tenant: TenantState) -> None:
        """Made and revoked by the operator or by the tenant's own admin, in turn."""
        by_admin = self.rng.random() < 0.5
        maker = self.admins[tenant.name] if by_admin else self.api
        made = maker.request("POST", "/v1/keys", "/v1/keys", json={
            "name": "soak-temporary", "role": "member",
            **({} if by_admin else {"tenant": tenant.name})})
        if made is None or made.status_code != 201:
            return
        key = made.json()
        if key["tenant_id"] != tenant.tenant_id:
            self.journal.violate("no tenant sees another's object", f"a key made for "
                                 f"{tenant.name} belongs to {key['tenant_id']}", key=key["id"])
        user = RecordingClient(self.api_url, key["key"], f"{tenant.name}-temp", self.journal)
        try:
            user.request("GET", "/v1/jobs", "/v1/jobs")
            revoked = maker.request("DELETE", f"/v1/keys/{key['id']}", "/v1/keys/{id}")
            if revoked is None or revoked.status_code != 204:
                return
            time.sleep(KEY_CACHE_S + 0.5)
            after = user.request("GET", "/v1/jobs", "/v1/jobs")
            if after is not None and after.status_code != 401 and after.status_code < 500:
                self.journal.violate("a revoked key stops working",
                                     f"key {key['id']} of {tenant.name} answered "
                                     f"{after.status_code} {KEY_CACHE_S + 0.5} s after its "
                                     "revocation", key=key["id"])
        finally:
            user.close()

    def change_quotas(self, tenant: TenantState) -> None:
        quotas = {name: self.rng.choice(values) for name, values in QUOTA_CHOICES.items()}
        self.api.request("PUT", f"/v1/tenants/{tenant.name}/quotas", "/v1/tenants/{id}/quotas",
                         json=quotas)
