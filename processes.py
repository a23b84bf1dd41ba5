"""Child processes of `fedsilo server`/`fedsilo client`: started in their own process
group, stopped by PID (the whole group: Flower's SuperLink and SuperNode spawn
`flwr-serverapp`/`flwr-clientapp` children), never left behind.

Also the network checks both launchers make before starting Flower: is a port
free, and does the server speak TLS with a certificate the federation CA signed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from fedsilo.config import check_port
from fedsilo.errors import ConfigError, FedsiloError
from fedsilo.flwr_adapter import TELEMETRY_OFF

log = logging.getLogger("fedsilo.processes")
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long

CONTROL_PORT = 9093  # Flower's Control/Runtime HTTPS API (operator only; bound to loopback)


class TLSError(FedsiloError):
    """The TLS connection to the federation server failed in a way retrying cannot fix."""


class Unreachable(Exception):
    """The server is not (yet) accepting connections: worth retrying."""


def flower_bin(name: str) -> str:
    """The Flower executable installed beside this Python (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` not found: is flwr installed in this environment?")
    return found


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with this Python's bin directory first on PATH (Flower's
    SuperLink and SuperNode start `flower-superexec`/`flwr-*app` by name) and Flower's
    telemetry off (fedsilo.flwr_adapter.disable_telemetry)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra, **TELEMETRY_OFF}


# glibc's malloc gives a thread that allocates while another holds an arena an arena of
# its own, up to 8 a core, and each keeps the memory freed in it. The SuperLink answers
# each 5 MB chunk of a model from a pool of threads and the ServerApp pulls on several,
# so a big model's chunks spread over many arenas. Two arenas, measured at 17 M
# parameters (docs/performance.md): peaks over a 1.1 M model's of 4.8-5.2x the model
# (ServerApp) and 4.9-5.1x (SuperLink), against 5.3-5.8x and 6.0-6.6x, the rounds as
# fast. An operator's own MALLOC_ARENA_MAX is kept.
SERVER_MALLOC = {"MALLOC_ARENA_MAX": "2"}


def server_env(**extra: str) -> dict[str, str]:
    """child_env for the server's processes (SuperLink, SuperExec, ServerApp), with
    SERVER_MALLOC where the operator's environment does not set its own."""
    return {**SERVER_MALLOC, **child_env(**extra)}


def spawn(
    cmd: Sequence[str], *, log_file: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a new session (its own process group), output to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    log.info("spawn: pid %d: %s", proc.pid, " ".join(cmd))
    return proc


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the launcher dies, even by
    SIGKILL, so a SuperLink/SuperNode never outlives the `fedsilo` process that owns it."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes], *, grace: float = STOP_GRACE_S) -> int | None:
    """SIGTERM the process group of `proc`, SIGKILL it after `grace` seconds; reap it."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader is gone; children it left in the group (flwr-*app) go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return proc.returncode


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt, so `finally` blocks stop children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_port_free(host: str, port: int, *, flag: str) -> None:
    """Raise ConfigError when something already listens on host:port.

    SO_REUSEADDR, as servers set it: connections of a server that just stopped linger in
    TIME_WAIT for about a minute and must not make its port look taken; a socket that
    listens still does (Linux refuses the bind then).
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ConfigError(
                    f"Port {port} on {host} is taken ({exc.strerror}): another server "
                    f"(flower-superlink?) is running. Stop it, or pick a free port with {flag}."
                ) from None
            raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (for a SuperNode's local Runtime API)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(
            f"Server address {address!r} must be HOST:PORT, e.g. fl.example.org:9092."
        )
    return host.strip("[]"), check_port(int(port), flag=f"port of {address}")


def _connect(address: str, timeout: float) -> tuple[str, socket.socket]:
    """A TCP connection to `host:port` and the host it dialled; Unreachable when none."""
    host, port = split_address(address)
    try:
        return host, socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(f"{address}: {exc.strerror or exc}") from None


def probe_tls(address: str, ca_file: Path, *, timeout: float = 5.0) -> None:
    """One TLS handshake with the server, verifying its certificate against `ca_file`.

    Raises Unreachable when nothing answers (retry), TLSError when the server answers
    but TLS fails (a wrong CA, a name the certificate does not cover, a plaintext server).
    """
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.set_alpn_protocols(["h2"])
    host, raw = _connect(address, timeout)
    with raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code == 62 or "match" in str(exc.verify_message):  # hostname mismatch
                raise TLSError(
                    f"TLS: the server at {address} has a certificate that does not cover "
                    f"{host!r} ({exc.verify_message}). Dial a name the server was provisioned "
                    "with (see [site] server in site.toml), or re-provision with that "
                    "--server-host."
                ) from None
            raise TLSError(
                f"TLS: the server at {address} presented a certificate this site's "
                f"federation CA ({ca_file}) did not sign ({exc.verify_message}). It is not "
                "your federation's server, or your kit comes from another provisioning. "
                "Not connecting."
            ) from None
        except (TimeoutError, ssl.SSLEOFError, ConnectionResetError, BrokenPipeError) as exc:
            # Closed before any answer: a server still starting, or a proxy whose backend
            # is down. Worth retrying.
            raise Unreachable(
                f"{address}: connection closed during the TLS handshake ({exc})"
            ) from None
        except ssl.SSLError as exc:
            raise TLSError(
                f"TLS: the server at {address} does not speak TLS ({exc}). If it was started "
                "with --insecure, the whole federation must be: pass --insecure here too "
                "(traffic is then readable by anyone on the network)."
            ) from None


def server_speaks_tls(address: str, *, timeout: float = 5.0) -> bool:
    """True when the server completes a TLS handshake (certificate not checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    host, raw = _connect(address, timeout)
    with raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                return True
        except (ssl.SSLError, OSError):
            return False


def wait_with_backoff(
    attempt: Callable[[], object],
    *,
    deadline_s: float,
    what: str,
    on_retry: Callable[[str], None],
    first: float = 1.0,
    cap: float = 15.0,
) -> None:
    """Call `attempt()` until it stops raising Unreachable, sleeping 1, 2, 4... (capped) s."""
    start = time.monotonic()
    delay = first
    while True:
        try:
            attempt()
            return
        except Unreachable as exc:
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise ConfigError(
                    f"Gave up after {deadline_s:.0f} s: {what} is not reachable ({exc}). Is the "
                    "server running, and is the address right?"
                ) from None
            on_retry(f"{what} not reachable ({exc}); retrying in {min(delay, left):.0f} s")
            time.sleep(min(delay, left))
            delay = min(delay * 2, cap)
