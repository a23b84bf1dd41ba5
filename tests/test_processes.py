"""The site's pre-flight TLS check against small local servers (no Flower)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.privacy.provision import provision
from fedsilo.processes import TLSError, Unreachable, free_port, probe_tls, server_speaks_tls


@contextlib.contextmanager
def listener(tls: ssl.SSLContext | None, host: str = "127.0.0.1") -> Iterator[int]:
    """A loopback server: a TLS handshake with `tls`, or plaintext bytes back when None."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if tls is None:
                        conn.recv(1024)
                        conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + b"\x00" * 18)
                    else:
                        with tls.wrap_socket(conn, server_side=True) as s:
                            s.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    # The server certificate covers localhost, 127.0.0.1 and ::1 (always) but no other IP.
    provision(tmp_path / "fed", hosts=["localhost"], sites=["a"])
    provision(tmp_path / "other", hosts=["localhost"], sites=["a"])
    return tmp_path


def server_ctx(fed: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(fed / "server/server.crt", fed / "server/server.key")
    return ctx


def test_verified_server(kits: Path) -> None:
    with listener(server_ctx(kits / "fed")) as port:
        probe_tls(f"localhost:{port}", kits / "fed/sites/a/ca.crt")
        assert server_speaks_tls(f"localhost:{port}")


def test_server_of_another_federation(kits: Path) -> None:
    with (
        listener(server_ctx(kits / "other")) as port,
        pytest.raises(TLSError, match="did not sign"),
    ):
        probe_tls(f"localhost:{port}", kits / "fed/sites/a/ca.crt")


def test_address_not_in_the_certificate(kits: Path) -> None:
    with (
        listener(server_ctx(kits / "fed"), host="127.0.0.2") as port,
        pytest.raises(TLSError, match=r"does not cover '127\.0\.0\.2'"),
    ):
        probe_tls(f"127.0.0.2:{port}", kits / "fed/sites/a/ca.crt")


def test_loopback_is_always_covered(kits: Path) -> None:
    # The server's own Flower components dial 127.0.0.1 even when provisioned for a name.
    with listener(server_ctx(kits / "fed")) as port:
        probe_tls(f"127.0.0.1:{port}", kits / "fed/sites/a/ca.crt")


def test_plaintext_server(kits: Path) -> None:
    with listener(None) as port:
        with pytest.raises(TLSError, match=r"does not speak TLS.*--insecure"):
            probe_tls(f"127.0.0.1:{port}", kits / "fed/sites/a/ca.crt")
        assert not server_speaks_tls(f"127.0.0.1:{port}")


def test_nothing_listening_is_retried(kits: Path) -> None:
    with pytest.raises(Unreachable):
        probe_tls(f"127.0.0.1:{free_port()}", kits / "fed/sites/a/ca.crt")


def test_a_port_in_time_wait_is_free_but_a_listening_one_is_not() -> None:
    import socket

    from fedsilo.errors import ConfigError
    from fedsilo.processes import check_port_free

    # A server that accepted a connection and closed first leaves its port in TIME_WAIT.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    with pytest.raises(ConfigError, match="is taken"):
        check_port_free("127.0.0.1", port, flag="--fleet-port")  # still listening
    conn.close()
    server.close()
    client.close()
    check_port_free("127.0.0.1", port, flag="--fleet-port")  # restartable at once


def test_the_servers_processes_use_two_malloc_arenas_unless_the_operator_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """server_env adds SERVER_MALLOC to what every child gets; an operator's own
    MALLOC_ARENA_MAX wins, and the sites' environment (child_env) is left alone."""
    from fedsilo.processes import child_env, server_env

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    env = server_env(FLWR_HOME="h")
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["FLWR_HOME"] == "h" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert "MALLOC_ARENA_MAX" not in child_env(FLWR_HOME="h")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert server_env()["MALLOC_ARENA_MAX"] == "8"
