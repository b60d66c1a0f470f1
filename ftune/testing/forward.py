"""Reaching a test host's service from the machine (the test process, a benchmark's client).

The hosts of ``ftune.testing.hosts`` have no route to or from the machine's own network, and
that is the point. The test still has to talk to what runs there (the API, the store), so a
``Tunnel`` carries one TCP service out through a Unix socket, which both sides see because
the file system outside ``/tmp`` is shared: a forwarder in the host's network namespace
listens on the socket and connects to the service; another, on the machine, listens on a free
loopback port and connects to the socket. Only these two processes cross: the service itself
sees a client on its own host.

``python -m ftune.testing.forward LISTEN CONNECT`` runs one forwarder; each side is
``tcp:HOST:PORT`` or ``unix:PATH``. ``--delay-ms`` holds every chunk that long before passing
it on (a slow link, where the kernel has no netem).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ftune.processes import free_port, stop_process, wait_until

CHUNK = 1 << 16


async def _open(target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, _, rest = target.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(rest)
    host, _, port = rest.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Copy until the end; with a delay, each chunk arrives ``delay_s`` after it was read
    (latency, not a cap on throughput: chunks in flight do not wait for each other)."""
    loop = asyncio.get_running_loop()
    in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await in_flight.get()
            if not data:
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            sink.write(data)
            await sink.drain()

    delivering = asyncio.ensure_future(deliver())
    try:
        while data := await source.read(CHUNK):
            await in_flight.put((loop.time() + delay_s, data))
        await in_flight.put((loop.time() + delay_s, b""))
        await delivering
    except (ConnectionError, OSError):
        pass
    finally:
        delivering.cancel()
        with contextlib.suppress(Exception):
            sink.close()


async def _serve(listen: str, connect: str, delay_s: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await _open(connect)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, upstream_writer, delay_s),
                             _pipe(upstream_reader, writer, delay_s))

    kind, _, rest = listen.partition(":")
    if kind == "unix":
        server = await asyncio.start_unix_server(handle, rest)
    else:
        host, _, port = rest.rpartition(":")
        server = await asyncio.start_server(handle, host, int(port))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftune.testing.forward")
    parser.add_argument("listen")
    parser.add_argument("connect")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.connect, args.delay_ms / 1000))


def start_forwarder(listen: str, connect: str, *, prefix: Sequence[str] = (),
                    delay_ms: float = 0.0) -> subprocess.Popen:
    """A forwarder process (run under ``prefix``, e.g. in a host's network), once it
    listens."""
    process = subprocess.Popen([*prefix, sys.executable, "-m", "ftune.testing.forward", listen,
                                connect, "--delay-ms", str(delay_ms)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        stop_process(process, 5)
        raise RuntimeError(f"the forwarder {listen} -> {connect} did not start")
    return process


class Tunnel:
    """``127.0.0.1:local_port`` on the machine reaches ``address:port`` in the host whose
    network ``prefix`` enters; ``socket`` is the Unix socket in between."""

    def __init__(self, prefix: Sequence[str], address: str, port: int, socket: Path) -> None:
        socket.unlink(missing_ok=True)
        self.inside = start_forwarder(f"unix:{socket}", f"tcp:{address}:{port}", prefix=prefix)
        self.local_port = free_port()
        self.outside = start_forwarder(f"tcp:127.0.0.1:{self.local_port}", f"unix:{socket}")
        wait_until(socket.exists, 10, f"the tunnel's socket {socket}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def close(self) -> None:
        for process in (self.outside, self.inside):
            stop_process(process, 5)


if __name__ == "__main__":
    main()
