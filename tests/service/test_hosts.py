"""The hosts the multi-host tests run on (ftune/testing/hosts.py): separate network and /tmp,
one switch between them, faults on demand, and nothing left behind afterwards.

Where this machine cannot make namespaces (not root, no iproute2) these tests fail with
HostsUnavailable's message; they never skip. Where the kernel lacks netem, the test of
``slow`` checks its clear refusal instead of the delay."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftune.testing import hosts as hosts_module
from ftune.testing.hosts import Hosts, HostsUnavailable, NetemUnavailable

pytestmark = pytest.mark.processes

PORT = 8080  # every host has its own ports: parallel runs cannot clash on it
PY = sys.executable  # the same interpreter on every host: the filesystem outside /tmp is shared

# Connects `tries` times to HOST:PORT, each with a timeout; prints the outcomes as JSON.
CONNECT = """import json, socket, sys, time
host, port, tries, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
outcomes = []
for _ in range(tries):
    start = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        error = None
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    outcomes.append({"error": error, "seconds": time.monotonic() - start})
print(json.dumps(outcomes))
"""

# Fetches URL until it answers or DEADLINE seconds pass; prints the body.
FETCH = """import sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with opener.open(sys.argv[1], timeout=2) as response:
            print(response.read().decode(), end="")
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""


def assert_nothing_left(run_id: str, base: Path | None) -> None:
    """No namespace, link, mount, file or owner record of the run remains."""
    assert run_id
    assert [ns for ns in hosts_module.namespaces() if f"-{run_id}-" in ns] == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    assert f"ft{run_id}" not in links
    assert run_id not in Path("/proc/self/mountinfo").read_text()
    assert base is None or not base.exists()
    assert not (hosts_module.RECORDS / f"{run_id}.json").exists()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with Hosts("control", "w1") as made:
        yield made
    assert_nothing_left(made.run_id, made.base)


def serve_http(hosts: Hosts, name: str) -> str:
    """A tiny HTTP server on host ``name`` serving index.txt; returns its URL."""
    address = hosts.address(name)
    hosts.popen(name, ["sh", "-c", f'echo "hello from {name}" > index.txt && exec "$0" -m '
                       f"http.server --bind {address} {PORT}", PY],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"http://{address}:{PORT}/index.txt"


def fetch(hosts: Hosts, name: str, url: str, deadline_s: float = 10) -> str:
    return hosts.run(name, [PY, "-c", FETCH, url, str(deadline_s)]).stdout


def connect(hosts: Hosts, name: str, address: str, port: int, *, tries: int = 1,
            timeout_s: float = 1) -> list[dict]:
    result = hosts.run(name, [PY, "-c", CONNECT, address, str(port), str(tries),
                              str(timeout_s)])
    return json.loads(result.stdout)


def test_hosts_reach_each_other_and_nothing_of_the_machine(hosts: Hosts) -> None:
    assert hosts.address("control") == "198.51.100.1"
    assert hosts.address("w1") == "198.51.100.2"
    url = serve_http(hosts, "control")
    assert fetch(hosts, "w1", url) == "hello from control\n"

    # A server on the machine's own loopback: 127.0.0.1 on a host is the host's own, so the
    # connection is refused there and never reaches this one.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        [outcome] = connect(hosts, "w1", "127.0.0.1", listener.getsockname()[1])
        assert outcome["error"] and "ConnectionRefused" in outcome["error"]
        with pytest.raises(BlockingIOError):
            listener.accept()

    # The only route is the hosts' own network: no default route leads off the switch.
    routes = hosts.run("w1", ["ip", "route"]).stdout.strip().splitlines()
    assert routes == ["198.51.100.0/24 dev eth0 proto kernel scope link src 198.51.100.2"]


def test_worker_host_cannot_see_the_api_hosts_files(hosts: Hosts, tmp_path: Path) -> None:
    (tmp_path / "root-marker").write_text("the machine's")
    exists = "import os, sys; print([os.path.exists(p) for p in sys.argv[1:]])"
    paths = ["/tmp/api-home/marker", str(tmp_path / "root-marker"), "/dev/shm/ftune-marker"]

    hosts.run("control", ["sh", "-c", "mkdir -p /tmp/api-home && echo api > "
                          "/tmp/api-home/marker && echo shm > /dev/shm/ftune-marker"])
    # Every process on control shares its /tmp; the test's tmp_path is not there.
    assert hosts.run("control", [PY, "-c", exists, *paths]).stdout == "[True, False, True]\n"
    # w1 sees neither control's /tmp and /dev/shm nor the machine's /tmp (the test's tmp_path).
    assert hosts.run("w1", [PY, "-c", exists, *paths]).stdout == "[False, False, False]\n"
    # The test reads a host's files from outside; the machine's /dev/shm never got one.
    assert (hosts.tmp_dir("control") / "api-home" / "marker").read_text() == "api\n"
    assert not Path("/dev/shm/ftune-marker").exists()

    homes = {name: hosts.run(name, ["sh", "-c", 'echo "$HOME $TMPDIR $(pwd)"']).stdout
             for name in ("control", "w1")}
    assert homes == {"control": "/tmp/home /tmp /tmp/home\n", "w1": "/tmp/home /tmp /tmp/home\n"}


def test_cut_and_restore(hosts: Hosts) -> None:
    url = serve_http(hosts, "control")
    fetch(hosts, "w1", url)
    control = hosts.address("control")

    hosts.cut("control")
    [outcome] = connect(hosts, "w1", control, PORT, timeout_s=1)
    assert outcome["error"], "w1 reached control through a cut link"
    assert outcome["seconds"] < 3

    hosts.restore("control")
    assert fetch(hosts, "w1", url, deadline_s=5) == "hello from control\n"


def test_slow_delays_every_round_trip_or_names_the_missing_kernel_option(hosts: Hosts) -> None:
    """Where the kernel has netem, every round trip is slower by the delay; where it has not
    (these machines' kernels are built without CONFIG_NET_SCH_NETEM), ``slow`` says so and
    leaves the link as it was."""
    url = serve_http(hosts, "control")
    fetch(hosts, "w1", url)
    control = hosts.address("control")
    try:
        hosts.slow("control", delay_ms=100, loss_pct=0)
    except NetemUnavailable as exc:
        assert "netem" in str(exc) and "CONFIG_NET_SCH_NETEM" in str(exc)
        plain = connect(hosts, "w1", control, PORT, tries=3, timeout_s=5)
        assert all(o["error"] is None for o in plain), plain
        assert min(o["seconds"] for o in plain) < 0.1, plain
        return

    # A TCP connect is one round trip: 100 ms each way on control's link.
    slowed = connect(hosts, "w1", control, PORT, tries=3, timeout_s=5)
    assert all(o["error"] is None for o in slowed), slowed
    assert min(o["seconds"] for o in slowed) >= 0.19, slowed

    hosts.restore("control")
    plain = connect(hosts, "w1", control, PORT, tries=3, timeout_s=5)
    assert all(o["error"] is None for o in plain), plain
    assert min(o["seconds"] for o in plain) < 0.1, plain


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_teardown_after_an_error_in_the_block_leaves_nothing() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Hosts("control", "w1") as made:
        server = made.popen("control", ["sleep", "60"])
        # A grandchild in a session of its own escapes the process group we kill: teardown
        # must find it through its network namespace.
        parent = made.popen("w1", ["sh", "-c", "setsid sleep 60 & echo $!; exec sleep 60"],
                            stdout=subprocess.PIPE)
        assert parent.stdout is not None
        escaped = int(parent.stdout.readline())
        raise RuntimeError("the test failed")
    assert server.poll() == -signal.SIGTERM
    deadline = time.monotonic() + 5  # init reaps the orphan in its own time
    while _alive(escaped) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(escaped)
    assert_nothing_left(made.run_id, made.base)


class FailingSecondHost(Hosts):
    """Hosts whose setup fails halfway, after the switch and one host exist."""

    def _add_host(self, index: int, name: str) -> None:
        if index == 1:
            raise KeyboardInterrupt("interrupted while setting up")
        super()._add_host(index, name)


def test_teardown_after_an_error_in_the_setup_leaves_nothing() -> None:
    made = FailingSecondHost("control", "w1")
    with pytest.raises(KeyboardInterrupt), made:
        pass
    assert_nothing_left(made.run_id, made.base)


def test_a_dead_owners_hosts_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """A run killed outright (SIGKILL) cannot tear down; the next one does it for it."""
    script = ("import os, signal, sys\n"
              "from ftune.testing.hosts import Hosts\n"
              "made = Hosts('control').__enter__()\n"
              "print(made.run_id, made.base, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr
    run_id, base = result.stdout.split()
    assert any(run_id in ns for ns in hosts_module.namespaces())
    with Hosts("w1"):
        pass
    assert_nothing_left(run_id, Path(base))


def test_missing_root_or_iproute2_is_named(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HostsUnavailable, match=r"hosts need root.*CAP_NET_ADMIN"):
        Hosts("control").__enter__()
    monkeypatch.undo()

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no ip anywhere
    monkeypatch.setattr(hosts_module, "SBIN", ())
    with pytest.raises(HostsUnavailable, match=r"`ip` command.*install Debian's iproute2"):
        Hosts("control").__enter__()
