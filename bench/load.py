"""Load: 200 concurrent clients for 60 s against `ftune up` (one worker, training), loopback
only. Each client has its own member key and mixes job polling, job lists, event streams,
predictions and dataset uploads.

Prints the error count (target 0; 429 and 503 answers carrying Retry-After are the limits
working and are counted apart), p50/p99 latency per route, the API's RSS growth (target under
300 MB) and whether the job training through the run lost or repeated an epoch (target: none),
with its epoch time before and during the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil
from PIL import Image

from ftune.processes import FtuneUp, start_ftune_up, wait_until
from ftune.testing.archives import zip_folder
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

# The limits of the run: the defaults, except that uploads are a larger share than any team
# would make (each is unpacked and checked in a child process).
LIMITS = {"FTUNE_LIMIT_CONCURRENCY": "1000", "FTUNE_MAX_STREAMS": "500",
          "FTUNE_MAX_STREAMS_PER_KEY": "20", "FTUNE_RATE_UPLOADS": "30/minute",
          "FTUNE_RATE_JOBS": "120/minute", "FTUNE_RATE_PREDICTIONS": "1200/minute"}
QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12}
# Long enough to train through the whole run; every epoch is recorded and streamed.
TRAINING = {"image_size": 32, "epochs": 10_000, "batch_size": 12,
            "early_stopping": {"patience": 100_000}}
ACTIONS = (("poll", 40), ("list", 10), ("predict", 30), ("stream", 12), ("upload", 3),
           ("job", 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-load-"))
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 12, classes=3)
    archive = zip_folder(write_image_folder(work / "data", images[idx], labels[idx]))
    with start_ftune_up(work / "home", env=LIMITS) as up:  # its output in work/up.log
        Bench(up, archive, args.clients, args.seconds).run()


class Bench:
    def __init__(self, up: FtuneUp, archive: bytes, clients: int, seconds: float) -> None:
        self.up, self.url, self.archive = up, up.url, archive
        self.clients, self.seconds = clients, seconds
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.answers: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.png = _png()

    def run(self) -> None:
        with self.up.operator_client(timeout=300) as http:
            keys = [http.post("/v1/keys", json={"name": f"client {i}", "tenant": "default"}
                              ).json()["key"] for i in range(self.clients)]
            self.dataset = http.post("/v1/datasets", files={"file": ("d.zip", self.archive)}
                                     ).json()["id"]
            self.model = self._train(http)
            self.job = http.post("/v1/jobs", json={"dataset_id": self.dataset,
                                                   "spec": TRAINING}).json()["id"]
            wait_until(lambda: len(http.get(f"/v1/jobs/{self.job}").json()["metrics"]) >= 5,
                       300, "the training job's first epochs")
            http.post(f"/v1/models/{self.model}/predict", files={"files": ("a.png", self.png)})
            rss = RssSampler(self._pid("api"))
            cpu = CpuMeter({"api": self._pid("api"), "worker": self._pid("worker"),
                            "load_generator": os.getpid()})
            before = self._epochs(http)
            rss.start()
            asyncio.run(self._load(keys))
            rss.stop()
            self.cpu_used = cpu.used()
            during = self._epochs(http)[len(before):]
            http.post(f"/v1/jobs/{self.job}/cancel")
            wait_until(lambda: http.get(f"/v1/jobs/{self.job}").json()["status"] == "cancelled",
                       120, "the training job to stop")
            self._report(http, before, during, rss)

    def _train(self, http: httpx.Client) -> str:
        job = http.post("/v1/jobs", json={"dataset_id": self.dataset, "spec": QUICK}).json()
        done = wait_until(lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["model_id"]
                          and j, 300, "the model to predict with")
        return done["model_id"]

    def _pid(self, role: str) -> int:
        state = json.loads(self.up.state_file.read_text())
        return next(pid for name, pid in state["children"].items() if name.startswith(role))

    def _epochs(self, http: httpx.Client) -> list[dict]:
        return http.get(f"/v1/jobs/{self.job}").json()["metrics"]

    # -- the load -----------------------------------------------------------------------
    async def _load(self, keys: list[str]) -> None:
        deadline = time.monotonic() + self.seconds
        await asyncio.gather(*(self._client(key, deadline, random.Random(i))
                               for i, key in enumerate(keys)))

    async def _client(self, key: str, deadline: float, rng: random.Random) -> None:
        names, weights = zip(*ACTIONS, strict=True)
        async with httpx.AsyncClient(base_url=self.url, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            await asyncio.sleep(rng.random())  # do not all start in the same millisecond
            while time.monotonic() < deadline:
                action = rng.choices(names, weights)[0]
                wait = await getattr(self, f"_{action}")(http, rng)
                await asyncio.sleep(wait if wait else rng.uniform(0.2, 0.8))

    async def _call(self, route: str, http: httpx.AsyncClient, method: str, path: str,
                    **kwargs: object) -> float:
        """One request, timed and classified; returns how long to back off (Retry-After)."""
        started = time.perf_counter()
        try:
            response = await http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.errors[f"{route}: {type(exc).__name__}"] += 1
            return 1.0
        self.latency[route].append((time.perf_counter() - started) * 1000)
        return self._classify(route, response)

    def _classify(self, route: str, response: httpx.Response) -> float:
        status = response.status_code
        if status in (429, 503) and "Retry-After" in response.headers:
            self.answers[(route, f"{status} with Retry-After")] += 1
            return min(5.0, float(response.headers["Retry-After"]))
        self.answers[(route, str(status))] += 1
        if status >= 400:
            self.errors[f"{route}: {status} {response.text[:120]}"] += 1
        return 0.0

    async def _poll(self, http: httpx.AsyncClient, rng: random.Random) -> float:
        return await self._call("GET /v1/jobs/{id}", http, "GET", f"/v1/jobs/{self.job}")

    async def _list(self, http: httpx.AsyncClient, rng: random.Random) -> float:
        return await self._call("GET /v1/jobs", http, "GET", "/v1/jobs", params={"limit": 20})

    async def _predict(self, http: httpx.AsyncClient, rng: random.Random) -> float:
        return await self._call("POST /v1/models/{ref}/predict", http, "POST",
                                f"/v1/models/{self.model}/predict",
                                files={"files": ("a.png", self.png)})

    async def _upload(self, http: httpx.AsyncClient, rng: random.Random) -> float:
        return await self._call("POST /v1/datasets", http, "POST", "/v1/datasets",
                                files={"file": ("d.zip", self.archive)})

    async def _job(self, http: httpx.AsyncClient, rng: random.Random) -> float:
        """Submit a job and cancel it at once (it never reaches the busy worker)."""
        started = time.perf_counter()
        response = await http.post("/v1/jobs", json={"dataset_id": self.dataset,
                                                     "spec": QUICK})
        self.latency["POST /v1/jobs"].append((time.perf_counter() - started) * 1000)
        back_off = self._classify("POST /v1/jobs", response)
        if response.status_code == 202:
            await self._call("POST /v1/jobs/{id}/cancel", http, "POST",
                             f"/v1/jobs/{response.json()['id']}/cancel")
        return back_off

    async def _stream(self, http: httpx.AsyncClient, rng: random.Random) -> float:
        """Follow the training job's events for a few seconds."""
        route = "GET /v1/jobs/{id}/events (first event)"
        started = time.perf_counter()
        try:
            async with http.stream("GET", f"/v1/jobs/{self.job}/events") as response:
                if response.status_code != 200:
                    await response.aread()
                    return self._classify(route, response)
                first = True
                async with asyncio.timeout(rng.uniform(2, 5)):
                    async for line in response.aiter_lines():
                        if first and line.startswith("event:"):
                            self.latency[route].append((time.perf_counter() - started) * 1000)
                            self.answers[(route, "200")] += 1
                            first = False
        except TimeoutError:
            pass
        except httpx.HTTPError as exc:
            self.errors[f"{route}: {type(exc).__name__}"] += 1
            return 1.0
        return 0.0

    # -- the results --------------------------------------------------------------------
    def _report(self, http: httpx.Client, before: list[dict], during: list[dict],
                rss: RssSampler) -> None:
        # Every epoch as the job's event stream told it (the stream ends with the job).
        epochs = []
        with http.stream("GET", f"/v1/jobs/{self.job}/events") as response:
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind == "epoch":
                    epochs.append(json.loads(line[5:])["epoch"])
        lost = sorted(set(range(1, max(epochs) + 1)) - set(epochs))
        repeated = [e for e, n in Counter(epochs).items() if n > 1]
        recorded = [row["epoch"] for row in self._epochs(http)]
        print(f"load clients={self.clients} seconds={self.seconds:.0f} "
              f"limits={' '.join(f'{k}={v}' for k, v in LIMITS.items())}")
        print(f"load requests={sum(self.answers.values())} errors={sum(self.errors.values())} "
              f"retry_after_answers={sum(n for (_, s), n in self.answers.items() if 'Retry' in s)}"
              " target_errors=0")
        for error, count in self.errors.most_common(10):
            print(f"load error count={count} {error}")
        for route, values in sorted(self.latency.items()):
            print(f"load route=\"{route}\" n={len(values)} p50_ms={_pct(values, 50):.0f} "
                  f"p99_ms={_pct(values, 99):.0f}")
        print(f"load cpu_s_used {' '.join(f'{k}={v:.0f}' for k, v in self.cpu_used.items())} "
              f"cpu_s_available={(os.cpu_count() or 1) * self.seconds:.0f} (the load generator "
              "shares the machine)")
        print(f"load api_rss_before_mb={rss.before / 1024:.0f} api_rss_peak_growth_mb="
              f"{(rss.peak - rss.before) / 1024:.0f} target_growth_mb=300")
        print(f"load training_epochs={len(epochs)} during_load={len(during)} lost={len(lost)} "
              f"repeated={len(repeated)} events_match_metrics={epochs == recorded} "
              f"epoch_s_before={_epoch_seconds(before):.2f} "
              f"epoch_s_during={_epoch_seconds(during):.2f}")


class RssSampler:
    """The API's resident memory before the load and at its highest during it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = _rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kb(self.pid))
            self._stop.wait(0.1)


class CpuMeter:
    """CPU seconds each process (with the children it waited for) used since it was made."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: _cpu_s(pid) for name, pid in pids.items()}

    def used(self) -> dict[str, float]:
        return {name: _cpu_s(pid) - self.start[name] for name, pid in self.pids.items()}


def _cpu_s(pid: int) -> float:
    """The process, its finished children and its live descendants."""
    process = psutil.Process(pid)
    total = sum(process.cpu_times()[:4])
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KeyError("VmRSS")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def _epoch_seconds(rows: list[dict]) -> float:
    times = [row["seconds"] for row in rows if row.get("seconds") is not None]
    return statistics.median(times) if times else float("nan")


if __name__ == "__main__":
    main()
