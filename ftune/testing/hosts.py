"""Hosts that share nothing but the network, made on this one machine for the tests.

``Hosts("control", "w1")`` makes each named host a network namespace with one interface,
``eth0``, at 198.51.100.1, .2, ... (TEST-NET-2, RFC 5737: documentation addresses that no
network routes). Every ``eth0`` is one end of a veth pair whose other end is a port of a bridge
in a namespace of its own (the "switch"), so the root namespace never holds any of our links.
A host has no default route: it can reach the other hosts and its own loopback, nothing else.

Each host also has a mount namespace of its own, kept alive by a holder process (``sleep``)
that every command on the host joins with ``nsenter``. What is private to a host:

- ``/tmp``: a directory of its own, empty at start, bind-mounted over ``/tmp``. It hides the
  machine's ``/tmp`` and with it the test's ``tmp_path`` and every other host's ``/tmp``.
  The test itself reads a host's files through ``Hosts.tmp_dir(name)``.
- ``HOME`` (``/tmp/home``, inside the private ``/tmp``) and ``TMPDIR`` (``/tmp``).
- ``/dev/shm``: a fresh tmpfs.
- its network: addresses, ports, routes, loopback (127.0.0.1 on a host is that host's own).

Everything else (the repository, the virtualenv, ``/usr``) is shared, as identical machine
images would be, even where it lives under ``/tmp`` (bound through into each private
``/tmp``): a test that wants data to be private to a host puts it elsewhere under ``/tmp``.

Teardown (leaving the ``with`` block for any reason, or an exception while setting up) kills
every process in the hosts' namespaces, deletes the namespaces (which removes the veths and
the bridge) and the private directories; the bind mounts exist only inside the hosts' mount
namespaces and vanish with their last process. Each run records its owner under
``/run/ftune-hosts``; a later run removes what an owner that died outright (SIGKILL) left.

Making namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2; without them
``HostsUnavailable`` says what is missing. ``slow`` needs the kernel's netem qdisc
(``NetemUnavailable`` otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ftune.processes import _die_with_parent

SUBNET = "198.51.100"  # TEST-NET-2: never routed anywhere, so nothing can leave by mistake
PREFIX_LEN = 24
NS_PREFIX = "ftune-"
RECORDS = Path("/run/ftune-hosts")  # one file per run: who owns it, where its files are
HOST_HOME = "/tmp/home"
SBIN = ("/usr/sbin", "/sbin")  # where ip and tc live, often missing from a non-root PATH
_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
_SWITCH = "switch"

# Variables that point at the machine's own files or services (and XDG_*, *_proxy): a host
# gets its own or none.
_ROOT_ONLY = frozenset({"TMPDIR", "TMP", "TEMP", "HOME", "DATABASE_URL", "FTUNE_DATABASE_URL",
                        "REDIS_URL", "FTUNE_REDIS_URL", "FTUNE_HOME"})

# Run by the holder inside its new mount namespace: the private /tmp (with the software the
# hosts run bound through when it lives under /tmp: a clone there must still run) and
# /dev/shm, then hide the folder holding every host's /tmp when it is not under /tmp already,
# then wait forever.
_HOLDER_SCRIPT = """set -e
own=$1 base=$2
shift 2
for keep in "$@"; do
  mkdir -p "$own/${keep#/tmp/}"
  mount --bind "$keep" "$own/${keep#/tmp/}"
done
mount --rbind "$own" /tmp
if [ -d /dev/shm ]; then mount -t tmpfs -o size=64m,mode=1777 ftune-shm /dev/shm; fi
if [ -d "$base" ]; then mount -t tmpfs -o size=1m,mode=700 ftune-hidden "$base"; fi
cd /tmp/home
echo ready
exec sleep infinity
"""

# Runs a command in the host's namespaces from the directory given as $0.
_IN_DIR = 'cd -- "$0" && exec "$@"'


class HostsUnavailable(RuntimeError):
    """This machine cannot make hosts: the message says what is missing."""


class NetemUnavailable(RuntimeError):
    """The kernel has no netem qdisc, so links cannot be slowed or made lossy."""


class HostCommandError(RuntimeError):
    """A command run with ``Hosts.run`` exited with an error (its output is in the message)."""


@dataclass
class Host:
    name: str
    netns: str
    address: str
    port: str  # its end of the link on the switch's bridge
    tmp: Path  # its private /tmp, as the machine (and the test) sees it
    holder: subprocess.Popen | None = None
    slowed: bool = False


def _tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"{d}/{name}" for d in SBIN) if os.access(p, os.X_OK)), None)
    if not found:
        raise HostsUnavailable(f"hosts need the `{name}` command, which is missing: install "
                               f"Debian's {package} package (apt-get install {package}; "
                               f"`make test` does this when run as root)")
    return found


def _check_root() -> None:
    if os.geteuid() != 0:
        raise HostsUnavailable(
            "hosts need root: making network and mount namespaces (ip netns add, unshare "
            "--mount) needs CAP_SYS_ADMIN and CAP_NET_ADMIN; run the tests as root (in a "
            "container: --privileged or --cap-add SYS_ADMIN --cap-add NET_ADMIN)")


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None when there is no such process:
    with the pid it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _run_quietly(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=30,
                          check=False)


class Hosts:
    """N hosts joined by one switch; see the module's docstring. Use as a context manager."""

    def __init__(self, *names: str, workdir: Path | None = None) -> None:
        if not names:
            raise ValueError("Hosts needs at least one host name")
        bad = [n for n in names if not _NAME.fullmatch(n) or n == _SWITCH]
        if bad or len(set(names)) != len(names) or len(names) > 250:
            raise ValueError(f"host names must be distinct, match {_NAME.pattern} and not be "
                             f"{_SWITCH!r} (at most 250): {names}")
        self.names = names
        self.workdir = Path(workdir or tempfile.gettempdir())
        self.run_id = ""
        self.base: Path | None = None
        self.hosts: dict[str, Host] = {}
        self.processes: list[subprocess.Popen] = []
        self._ip = ""

    # -- setting up -----------------------------------------------------------------------
    def __enter__(self) -> Hosts:
        try:
            self._create()
        except BaseException as exc:
            problems = self.close()
            if problems:  # the setup's own error stays the one raised
                exc.add_note("ftune hosts left things behind: " + "; ".join(problems))
            raise
        return self

    def _create(self) -> None:
        _check_root()
        self._ip = _tool("ip", "iproute2")
        for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"),
                              ("mount", "mount")):
            _tool(tool, package)
        sweep_stale(self._ip)
        self.run_id = self._new_run_id()
        self.base = Path(tempfile.mkdtemp(prefix=f"ftune-hosts-{self.run_id}-",
                                          dir=self.workdir))
        _record_owner(self.run_id, self.base)
        self._add_switch()
        for index, name in enumerate(self.names):
            self._add_host(index, name)
        for host in self.hosts.values():
            self._start_holder(host)

    def _new_run_id(self) -> str:
        taken = self._namespaces()
        while True:  # 24 random bits: parallel runs on one machine never share names
            run_id = secrets.token_hex(3)
            if not any(ns.startswith(f"{NS_PREFIX}{run_id}-") for ns in taken):
                return run_id

    @property
    def switch_ns(self) -> str:
        return f"{NS_PREFIX}{self.run_id}-{_SWITCH}"

    @property
    def bridge(self) -> str:
        return f"ft{self.run_id}br"  # interface names: 15 characters at most

    def _add_switch(self) -> None:
        self._netns_add(self.switch_ns)
        self._ip_ok("-n", self.switch_ns, "link", "add", self.bridge, "type", "bridge")
        self._ip_ok("-n", self.switch_ns, "link", "set", self.bridge, "up")

    def _add_host(self, index: int, name: str) -> None:
        assert self.base is not None
        tmp = self.base / name / "tmp"
        (tmp / "home").mkdir(parents=True)
        tmp.chmod(0o1777)  # a /tmp, as every program expects it
        host = Host(name, f"{NS_PREFIX}{self.run_id}-{name}", f"{SUBNET}.{index + 1}",
                    f"ft{self.run_id}h{index}", tmp)
        self.hosts[name] = host
        self._netns_add(host.netns)
        # Both ends are made straight inside their namespaces: never in the machine's own.
        self._ip_ok("link", "add", "eth0", "netns", host.netns, "type", "veth",
                    "peer", "name", host.port, "netns", self.switch_ns)
        self._ip_ok("-n", self.switch_ns, "link", "set", host.port, "master", self.bridge)
        self._ip_ok("-n", self.switch_ns, "link", "set", host.port, "up")
        self._ip_ok("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}",
                    "dev", "eth0")
        self._ip_ok("-n", host.netns, "link", "set", "lo", "up")
        self._ip_ok("-n", host.netns, "link", "set", "eth0", "up")

    def _netns_add(self, netns: str) -> None:
        result = _run_quietly([self._ip, "netns", "add", netns])
        if result.returncode != 0:
            raise HostsUnavailable(
                f"cannot make network namespace {netns} (`ip netns add`: "
                f"{result.stderr.strip()}): hosts need root with CAP_SYS_ADMIN and "
                f"CAP_NET_ADMIN and a kernel with network namespaces")

    def _ip_ok(self, *args: str) -> None:
        result = _run_quietly([self._ip, *args])
        if result.returncode != 0:
            raise HostsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")

    def _start_holder(self, host: Host) -> None:
        """The process that keeps the host's mount namespace (and its private /tmp) alive."""
        assert self.base is not None
        log = self.base / f"{host.name}-holder.log"
        with log.open("wb") as errors:
            holder = subprocess.Popen(
                [self._ip, "netns", "exec", host.netns, "unshare", "--mount",
                 "--propagation", "private", "--", "sh", "-c", _HOLDER_SCRIPT, "holder",
                 str(host.tmp), str(self.base), *_software_under_tmp()],
                stdout=subprocess.PIPE, stderr=errors, start_new_session=True,
                preexec_fn=_die_with_parent)
        host.holder = holder
        assert holder.stdout is not None
        with holder.stdout:  # "ready" once mounted; end of file if it failed
            ready = holder.stdout.readline().strip() == b"ready"
        if not ready:
            holder.wait(10)
            raise HostsUnavailable(f"cannot make host {host.name}'s mount namespace "
                                   f"(unshare --mount, mount --bind): {log.read_text().strip()}")

    # -- using ----------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r}; hosts: {', '.join(self.hosts)}") from None

    def address(self, name: str) -> str:
        return self.host(name).address

    def in_network(self, name: str) -> list[str]:
        """A command prefix that runs a program in host ``name``'s network but the machine's
        files: for the services a test plants on a host from outside (a database whose
        folder the test owns)."""
        return [_tool("nsenter", "util-linux"), f"--net=/run/netns/{self.host(name).netns}",
                "--"]

    def tmp_dir(self, name: str) -> Path:
        """The host's /tmp as the test sees it (to read its logs or plant files)."""
        return self.host(name).tmp

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Ours, less what points at the machine's files or services, plus the host's own
        HOME and TMPDIR, plus ``env``."""
        inherited = {k: v for k, v in os.environ.items() if k not in _ROOT_ONLY
                     and not k.startswith("XDG_") and not k.lower().endswith("_proxy")}
        return {**inherited, "HOME": HOST_HOME, "TMPDIR": "/tmp", **(env or {})}

    def popen(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str = HOST_HOME, stdout: IO[Any] | int | None = None,
              stderr: IO[Any] | int | None = None,
              stdin: IO[Any] | int | None = None) -> subprocess.Popen:
        """Start ``argv`` on host ``name`` (in its own session; it dies with us, and at
        teardown). ``cwd`` is a path as the host sees it. ``env`` adds to ``environment()``."""
        holder = self.host(name).holder
        if holder is None or holder.poll() is not None:
            raise HostsUnavailable(f"host {name} is gone (its namespace holder exited)")
        command = [_tool("nsenter", "util-linux"), f"--target={holder.pid}", "--mount",
                   "--net", "--", "sh", "-c", _IN_DIR, cwd, *argv]
        process = subprocess.Popen(command, env=self.environment(env), stdin=stdin,
                                   stdout=stdout, stderr=stderr, start_new_session=True,
                                   preexec_fn=_die_with_parent)
        self.processes.append(process)
        return process

    def run(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: str = HOST_HOME, timeout_s: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on host ``name`` to the end; its output comes back as text."""
        process = self.popen(name, argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise HostCommandError(f"{list(argv)} on {name} ran over {timeout_s} s; "
                                   f"output: {out.decode()}{err.decode()}") from None
        result = subprocess.CompletedProcess(list(argv), process.returncode, out.decode(),
                                             err.decode())
        if check and result.returncode != 0:
            raise HostCommandError(f"{list(argv)} on {name} exited with {result.returncode}:"
                                   f"\n{result.stdout}{result.stderr}")
        return result

    # -- faults ---------------------------------------------------------------------------
    def cut(self, name: str) -> None:
        """Unplug the host: its switch port goes down, so nothing reaches it or leaves it
        (its own interface and addresses stay as they were, as with a pulled cable)."""
        self._ip_ok("-n", self.switch_ns, "link", "set", self.host(name).port, "down")

    def restore(self, name: str) -> None:
        """Plug the host back in and take away any ``slow``: a plain link again."""
        host = self.host(name)
        self._ip_ok("-n", self.switch_ns, "link", "set", host.port, "up")
        if host.slowed:
            for netns, dev in self._link_ends(host):
                self._tc(netns, "qdisc", "del", "dev", dev, "root")
            host.slowed = False

    def slow(self, name: str, delay_ms: float = 100, loss_pct: float = 1) -> None:
        """Delay every packet to and from the host by ``delay_ms`` each way (a round trip
        takes 2 x ``delay_ms`` more) and drop ``loss_pct`` percent each way (tc netem on both
        ends of its link). ``restore`` takes it away."""
        host = self.host(name)
        for netns, dev in self._link_ends(host):
            self._tc(netns, "qdisc", "replace", "dev", dev, "root", "netem",
                     "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%")
            host.slowed = True

    def _link_ends(self, host: Host) -> list[tuple[str, str]]:
        return [(host.netns, "eth0"), (self.switch_ns, host.port)]

    def _tc(self, netns: str, *args: str) -> None:
        result = _run_quietly([_tool("tc", "iproute2"), "-netns", netns, *args])
        if result.returncode == 0:
            return
        if "netem" in args and "unknown" in result.stderr.lower():
            raise NetemUnavailable(
                "this kernel has no netem qdisc (tc says: "
                f"{result.stderr.strip()}), so links cannot be delayed or made lossy: it "
                "needs CONFIG_NET_SCH_NETEM, or the sch_netem module (`modprobe sch_netem`; "
                "on Debian/Ubuntu it ships with the kernel's modules package)")
        raise HostsUnavailable(f"`tc {' '.join(args)}` in {netns} failed: "
                               f"{result.stderr.strip()}")

    # -- tearing down ---------------------------------------------------------------------
    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        problems = self.close()
        if not problems:
            return
        message = "ftune hosts left things behind: " + "; ".join(problems)
        if exc is None:
            raise RuntimeError(message)
        exc.add_note(message)  # the test's own failure stays the one reported

    def close(self) -> list[str]:
        """Stop everything, remove everything; safe to call twice and after a partial setup.
        Returns what could not be removed (nothing, normally)."""
        self._stop_processes()
        problems = remove_run(self._ip or "ip", self.run_id, self.base) if self.run_id else []
        for host in self.hosts.values():
            if host.holder is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.holder.wait(5)  # reaped: killed with the rest of its namespace
        self.hosts.clear()
        return problems

    def _stop_processes(self) -> None:
        """SIGTERM to each started process group, a moment to exit, then SIGKILL."""
        live = [p for p in self.processes if p.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in live:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def _namespaces(self) -> list[str]:
        return namespaces(self._ip)

    def links(self) -> list[str]:
        """Our links visible in the machine's own namespace (none, by design)."""
        result = _run_quietly([self._ip or "ip", "-o", "link", "show"])
        return [line for line in result.stdout.splitlines() if f"ft{self.run_id}" in line]

    def mounts(self) -> list[str]:
        """Our mounts visible in the machine's own mount namespace (the namespaces' own
        ``/run/netns`` entries while they exist)."""
        with open("/proc/self/mountinfo") as mountinfo:
            return [line for line in mountinfo if f"{NS_PREFIX}{self.run_id}-" in line
                    or f"ftune-hosts-{self.run_id}-" in line]


def namespaces(ip: str = "ip") -> list[str]:
    """The names ``ip netns list`` shows."""
    result = _run_quietly([ip, "netns", "list"])
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _record_owner(run_id: str, base: Path) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "start": _process_start(os.getpid()), "base": str(base)}
    (RECORDS / f"{run_id}.json").write_text(json.dumps(record))


def remove_run(ip: str, run_id: str, base: Path | None) -> list[str]:
    """Kill every process in the run's namespaces, delete them (the veths and the bridge go
    with them) and its files. Returns what is still there."""
    ours = [ns for ns in namespaces(ip) if ns.startswith(f"{NS_PREFIX}{run_id}-")]
    problems = [f"processes in {ns} survived SIGKILL" for ns in ours
                if not _kill_namespace(ip, ns)]
    for ns in ours:
        result = _run_quietly([ip, "netns", "delete", ns])
        if result.returncode != 0:
            problems.append(f"ip netns delete {ns}: {result.stderr.strip()}")
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
        if base.exists():
            problems.append(f"{base} could not be removed")
    if not problems:
        (RECORDS / f"{run_id}.json").unlink(missing_ok=True)
    return problems


def _kill_namespace(ip: str, netns: str, timeout_s: float = 5) -> bool:
    """SIGKILL whatever runs in ``netns`` (also what escaped our process groups): a namespace
    whose processes live on would keep its links after ``ip netns delete``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _run_quietly([ip, "netns", "pids", netns]).stdout.split()
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)
    return False


def sweep_stale(ip: str = "ip") -> None:
    """Remove the runs whose owner died without tearing down (killed outright)."""
    if not RECORDS.is_dir():
        return
    for path in RECORDS.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _process_start(int(record["pid"])) == record.get("start"):
            continue  # its owner is alive: a parallel run
        remove_run(ip, path.stem, Path(record["base"]))


def _software_under_tmp() -> list[str]:
    """The repository and the virtualenv, where they live under /tmp (a clone made there):
    every host runs them, as identical machine images would, so the private /tmp must not
    hide them. Outermost folders only."""
    import ftune

    found = sorted({str(p) for p in (Path(ftune.__file__).resolve().parents[1],
                                     Path(sys.prefix).resolve())
                    if p.is_relative_to("/tmp") and p != Path("/tmp")})
    return [p for p in found if not any(p != q and Path(p).is_relative_to(q) for q in found)]
