"""Serve a Prometheus collector over HTTP: what `--metrics-port` starts.

`add_flags(parser, what)` declares `--metrics-port` and `--metrics-host` once for
`fedsilo simulate`, `server start` and `client start`; `address(args)` checks them before
anything starts, and `serving(collector, address)` serves while a `with` block runs,
where the user asked for it. `serve(collector, host, port)`
starts prometheus-client's threaded HTTP server on `host:port` (127.0.0.1 unless the
operator names another address, never every address) with a registry that holds
`collector` alone: no process or platform metrics, only what the collector reads from
the run directory or the ledger at each scrape.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

from fedsilo.config import check_port
from fedsilo.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"


def check_address(host: str, port: int, flag: str = "--metrics-port") -> None:
    """Refuse a port outside 1..65535 or an empty host, naming the flag and the fix."""
    check_port(port, flag=flag)
    if not host.strip():
        raise ConfigError(
            f"`--metrics-host` is empty; give an address to bind, e.g. {DEFAULT_HOST}."
        )
    try:
        if ipaddress.ip_address(host).is_unspecified:
            raise ConfigError(
                f"`--metrics-host {host}` would serve the metrics on every address of this "
                "machine; name the one address your Prometheus scrapes (e.g. 10.0.0.5)."
            )
    except ValueError:
        pass  # a host name: resolved when binding


def serve(collector: Any, host: str, port: int) -> Callable[[], None]:
    """Serve `collector` at http://HOST:PORT/metrics; returns a function that stops it.

    Raises:
        ConfigError: the address cannot be bound (in use, not this machine's).
    """
    from prometheus_client import CollectorRegistry, start_http_server

    check_address(host, port)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"Cannot serve metrics on {host}:{port}: {exc.strerror or exc}. Pick a free "
            "port with --metrics-port (and an address of this machine with --metrics-host)."
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def add_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """`--metrics-port` and `--metrics-host`, for a command whose metrics are `what`."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help=f"serve Prometheus metrics ({what}) at http://HOST:PORT/metrics while this runs "
        "(default: none served)",
    )
    parser.add_argument(
        "--metrics-host",
        default=DEFAULT_HOST,
        metavar="HOST",
        help=f"the address --metrics-port binds (default {DEFAULT_HOST}: this machine only; "
        "never every address)",
    )


def address(args: argparse.Namespace) -> tuple[str, int] | None:
    """The checked (host, port) of --metrics-host/--metrics-port, or None when no
    --metrics-port was given: called before the command starts anything, so a bad
    address fails first (`serve` checks it again, the guarantee's own home)."""
    if args.metrics_port is None:
        return None
    check_address(args.metrics_host, args.metrics_port)
    return args.metrics_host, args.metrics_port


@contextlib.contextmanager
def serving(collector: Callable[[], Any], where: tuple[str, int] | None) -> Iterator[None]:
    """Serve `collector()` at `where` (from `address`) while the block runs; nothing when None."""
    if where is None:
        yield
        return
    stop = serve(collector(), *where)
    try:
        yield
    finally:
        stop()
