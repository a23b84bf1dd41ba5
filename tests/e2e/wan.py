"""A wide-area path on one machine: network namespaces, 100 Mbit/s links, 25 ms each way.

    server ns (10.213.1.2) --veth-- middle ns --veth-- site ns 1 (10.213.2.2)
                                    (relay)   --veth-- site ns 2 (10.213.3.2) ...

Every link is shaped to RATE by `tc tbf` on both of its ends (this kernel has no
`netem`). The latency comes from a TCP relay in the middle namespace (`python -m
tests.e2e.wan relay`) that holds every chunk it reads for DELAY_MS before forwarding
it, in both directions: sites dial the relay's address on their own link
(10.213.N.1), which the server's certificate must name, and the relay dials the
server. A round trip between a site and the server thus takes 2 x DELAY_MS plus the
transmission time.

Only addresses inside the namespaces made here are used; `Wan.close()` kills what
runs in them and deletes them (their veths go with them). Needs root and `ip`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DELAY_MS = 25.0  # each way
RATE = "100mbit"
SUBNET = "10.213"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def available() -> str:
    """Why a WAN can't be built here ("" when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True)
        subprocess.run(["tc", "-V"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"`ip netns` or `tc` does not work here ({exc})"
    return ""


class Wan:
    """The namespaces, links and relay of one WAN; a context manager that removes them."""

    def __init__(self, sites: int, *, delay_ms: float = DELAY_MS, rate: str = RATE) -> None:
        tag = f"fsw{os.getpid() % 100000}"
        self.server_ns, self.middle_ns = f"{tag}-srv", f"{tag}-mid"
        self.site_ns = [f"{tag}-s{i + 1}" for i in range(sites)]
        self.server_ip = f"{SUBNET}.1.2"
        self.relay_ips = [f"{SUBNET}.{i + 2}.1" for i in range(sites)]  # the sites dial these
        self.delay_ms, self.rate = delay_ms, rate
        self.relays: list[subprocess.Popen[bytes]] = []
        self.namespaces = [self.server_ns, self.middle_ns, *self.site_ns]
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ends = [(self.server_ns, self.server_ip, f"{SUBNET}.1.1")]
        ends += [
            (ns, f"{SUBNET}.{i + 2}.2", self.relay_ips[i]) for i, ns in enumerate(self.site_ns)
        ]
        for i, (ns, addr, middle_addr) in enumerate(ends):
            outer, inner = f"wa{i}", f"wb{i}"
            ip("link", "add", outer, "netns", ns, "type", "veth",
               "peer", "name", inner, "netns", self.middle_ns)  # fmt: skip
            for where, dev, address in ((ns, outer, addr), (self.middle_ns, inner, middle_addr)):
                ip("-n", where, "addr", "add", f"{address}/24", "dev", dev)
                ip("-n", where, "link", "set", dev, "up")
                subprocess.run(
                    ["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root",
                     "tbf", "rate", self.rate, "burst", "64kb", "latency", "200ms"],
                    check=True, capture_output=True,
                )  # fmt: skip

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def start_relay(self, listen_port: int, server_port: int, log: Path) -> None:
        """Relay MIDDLE:listen_port -> server:server_port with the delay, both ways."""
        with open(log, "ab") as out:
            relay = subprocess.Popen(
                [*self.exec_prefix(self.middle_ns), sys.executable, "-m", "tests.e2e.wan",
                 "relay", "--port", str(listen_port), "--to", f"{self.server_ip}:{server_port}",
                 "--delay-ms", str(self.delay_ms)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip
        self.relays.append(relay)
        wait_port(self.exec_prefix(self.site_ns[0]), self.relay_ips[0], listen_port)

    def qdiscs(self, ns: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "show"], capture_output=True, text=True
        ).stdout

    def close(self) -> None:
        for relay in self.relays:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(relay.pid, signal.SIGKILL)
            relay.wait(timeout=10)
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> Wan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- relay


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward what `reader` gets to `writer`, each chunk `delay` s after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while True:
            data = await reader.read(1 << 16)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    task = asyncio.create_task(receive())
    try:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def relay(port: int, target: tuple[str, int], delay: float) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))

    server = await asyncio.start_server(serve, "0.0.0.0", port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a TCP relay that delays both directions")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--to", required=True, help="HOST:PORT")
    r.add_argument("--delay-ms", type=float, default=DELAY_MS)
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    print(f"relay :{args.port} -> {args.to}, {args.delay_ms:g} ms each way", flush=True)
    asyncio.run(relay(args.port, (host, int(port)), args.delay_ms / 1000))
    return 0


# A probe server for the path's checks: b"x" is echoed; b"b" + 8 bytes N: read N bytes
# and answer b"k" (a bulk transfer's end to end time).
PROBE = """
import socket, threading
def serve(c):
    with c:
        while (k := c.recv(1)):
            if k == b"x":
                c.sendall(b"x")
            else:
                n = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big")
                while n > 0:
                    n -= len(c.recv(min(n, 1 << 16)))
                c.sendall(b"k")
s = socket.create_server(("0.0.0.0", PORT))
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


def probe_command(port: int) -> list[str]:
    return [sys.executable, "-c", PROBE.replace("PORT", str(port))]


def bulk_seconds(host: str, port: int, prefix: list[str], nbytes: int) -> float:
    """Seconds to send `nbytes` to a probe at host:port and hear that all arrived."""
    code = (
        "import socket,time;"
        f"s=socket.create_connection(('{host}',{port}));a=time.perf_counter();"
        f"s.sendall(b'b'+({nbytes}).to_bytes(8,'big'));s.sendall(bytes({nbytes}));s.recv(1);"
        "print(time.perf_counter()-a)"
    )
    out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip() or "nan")


def round_trip_ms(host: str, port: int, prefix: list[str], n: int = 5) -> float:
    """The median time (ms) one byte takes to an echo at host:port and back, run in `prefix`."""
    code = (
        "import socket,time,statistics;"
        f"s=socket.create_connection(('{host}',{port}));s.setsockopt(6,1,1);t=[]\n"
        f"for _ in range({n}):\n"
        " a=time.perf_counter();s.sendall(b'x');s.recv(1);t.append(time.perf_counter()-a)\n"
        "print(statistics.median(t)*1000)"
    )
    out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip() or "nan")


def wait_port(prefix: list[str], host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    code = f"import socket;socket.create_connection(('{host}',{port}),timeout=1).close()"
    while time.monotonic() < deadline:
        if (
            subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True).returncode
            == 0
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not open within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
