"""Test harness: real `fedsilo server`/`fedsilo client` processes on loopback.

Every process is started in its own process group with FLWR_HOME under the test's
tmp dir; `leftovers` finds any process (however deep: flower-superexec,
flwr-serverapp, flwr-clientapp) whose command line or environment mentions that
dir, so tests can assert none is left behind and teardown can end them by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fedsilo(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for(cwd, "cli"),
    )


def env_for(tmp: Path, name: str) -> dict[str, str]:
    home = tmp / "flwr-homes" / name
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}


class Proc:
    """A `fedsilo ...` process in its own group, output to a file."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        *args: str,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`prefix`: what runs the command, e.g. `ip netns exec NS`; `env`: added to its
        environment (e.g. fedsilo.clients.failpoint's)."""
        self.name = name
        self.log = tmp / f"{name}.log"
        self._out = open(self.log, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "fedsilo", *args],
            cwd=tmp,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**env_for(tmp, name), **(env or {})},
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout=timeout)
        self._out.close()
        return code

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (as Ctrl-C or a service manager would) and wait for a clean exit."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        return self.wait(timeout)

    def send(self, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._out.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.text()[-2500:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def leftovers(tmp: Path, grace_s: float = 0.0) -> list[tuple[int, str]]:
    """Live processes whose command line or environment mentions `tmp`; with `grace_s`,
    those still alive after up to that many seconds (a stopped SuperNode's SuperExec
    exits on its own once it sees its parent gone: Flower checks every 0.2 s, later on
    a loaded machine)."""
    deadline = time.monotonic() + grace_s
    while (found := _live(tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def terminate_all(procs: Iterable[Proc | None], timeout: float = 60) -> None:
    """SIGTERM every live one at once (each site's stop waits ~5 s on Flower's SuperNode
    shutdown: one after another, they add up), then assert each stopped cleanly."""
    live = [p for p in procs if p is not None and p.popen.poll() is None]
    for proc in live:
        proc.send()
    for proc in live:
        assert proc.wait(timeout) == 0, proc.text()[-3000:]


def _live(tmp: Path) -> list[tuple[int, str]]:
    needle = str(tmp).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in cmd or needle in env:
            found.append((int(entry.name), cmd.replace(b"\0", b" ").decode(errors="replace")))
    return found


def end_leftovers(tmp: Path) -> None:
    for pid, _ in leftovers(tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class TLSSniffer:
    """A TCP relay 127.0.0.1:port -> target that keeps the first bytes each client sends."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.first_bytes: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        first = record
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if first:
                    self.first_bytes.append(data[:5])
                    first = False
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def server(tmp: Path, fleet: int, *args: str) -> Proc:
    """`fedsilo server start` with kit fed/server on 127.0.0.1:`fleet`."""
    return Proc(
        tmp,
        "server",
        "server",
        "start",
        "--kit",
        "fed/server",
        "--listen",
        "127.0.0.1",
        "--fleet-port",
        str(fleet),
        "--control-port",
        str(free_port()),
        *args,
    )


def client(
    tmp: Path, site: str, data: int, address: str, *args: str, env: dict[str, str] | None = None
) -> Proc:
    """`fedsilo client start` for site kit fed/sites/SITE on data/site-DATA.npz."""
    return Proc(
        tmp,
        f"client-{site}",
        "client",
        "start",
        "--kit",
        f"fed/sites/{site}",
        "--data",
        f"data/site-{data}.npz",
        "--server",
        address,
        "--device",
        "cpu",
        "--threads",
        "1",  # the sites share this machine's cores
        *args,
        env=env,
    )


def rounds(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    """The run's metrics.jsonl records so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus scrape of http://127.0.0.1:PORT/metrics: (name, labels) -> value."""
    import urllib.request

    from tests.metrics import samples

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return samples(text.decode())
