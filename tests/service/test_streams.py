"""Event streams are capped per key (429) and per API process (503), both with Retry-After,
and a closed stream gives its slot back."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from ftune.processes import wait_until
from ftune.service.errors import TooManyRequests, Unavailable
from ftune.service.streams import StreamHub

SLOW = {"image_size": 64, "epochs": 300, "batch_size": 12, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 1000}}
PER_KEY = 20  # FTUNE_MAX_STREAMS_PER_KEY's default, which the test stack keeps


def test_a_key_holds_a_bounded_number_of_streams(api_url, client, tiny_dataset):
    made = client.post("/v1/keys", json={"name": "streams"}).json()
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": SLOW}).json()
    url = f"/v1/jobs/{job['id']}/events"
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {made['key']}"},
                      timeout=30, limits=httpx.Limits(max_connections=PER_KEY + 5)) as http, \
            contextlib.ExitStack() as streams:
        opened = [streams.enter_context(http.stream("GET", url)) for _ in range(PER_KEY)]
        assert all(response.status_code == 200 for response in opened)
        refused = http.get(url)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert "FTUNE_MAX_STREAMS_PER_KEY" in refused.json()["detail"]
        # Another key is not affected.
        with client.stream("GET", url) as other:
            assert other.status_code == 200
        opened[0].close()  # the server notices the disconnect and frees the slot

        def reopened() -> bool:
            with http.stream("GET", url) as again:
                return again.status_code == 200

        wait_until(reopened, 15, "a freed stream slot")
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_process_holds_a_bounded_number_of_streams():
    hub = StreamHub(db=None, max_streams=3, max_per_key=2)  # type: ignore[arg-type]
    releases = [hub.admit("a"), hub.admit("a"), hub.admit("b")]
    with pytest.raises(TooManyRequests):
        hub.admit("a")
    with pytest.raises(Unavailable) as full:
        hub.admit("c")
    assert full.value.status_code == 503 and "Retry-After" in full.value.headers
    releases[2]()
    releases[2]()  # giving a slot back twice frees it once
    hub.admit("c")
    with pytest.raises(Unavailable):
        hub.admit("d")
    assert hub.open_streams == 3
