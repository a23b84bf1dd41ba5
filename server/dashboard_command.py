"""`fedsilo dashboard`: watch a run, or a site's ledger, in a browser.

Examples:
  fedsilo dashboard runs/exp1                       # then open http://127.0.0.1:8050/
  fedsilo dashboard --ledger fed/sites/a/ledger.jsonl --port 8051
  fedsilo dashboard runs/exp1 --host 10.0.0.5       # prints an address with its token
  fedsilo dashboard runs/exp1 --json                # the view once, for scripts

A run that is still going updates on the page every 2 s (accuracy and loss per round,
each site's epsilon against the run's target, sites aggregated, failed and refused per
round, the round timeline, every failure and refusal with its reason). `--ledger` shows
a site operator their own ledger: the audit, every spend and the total against the
site's budget (what `fedsilo audit` verifies). Read-only: it shows what the files hold.

Binds 127.0.0.1 unless --host names another address of this machine; then it needs an
access token (--token, or one is generated and printed in the address to open).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsilo.config import check_port
from fedsilo.errors import ConfigError
from fedsilo.exporter import DEFAULT_HOST, check_address
from fedsilo.server.dashboard import Source, check_token, make_app

DEFAULT_PORT = 8050


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dashboard",
        help="watch a run (or a site's ledger) live in a browser",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="a run directory (simulate or server)"
    )
    p.add_argument("--ledger", metavar="PATH", help="show this site ledger instead of a run")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only; never every "
        "address). Another address needs a token.",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help="require this access token (16+ characters); generated when --host is not "
        "loopback and none is given",
    )
    p.add_argument("--json", action="store_true", help="print the view once as JSON and exit")
    p.set_defaults(func=run)


def source(args: argparse.Namespace) -> Source:
    if bool(args.run_dir) == bool(args.ledger):
        raise ConfigError(
            "`fedsilo dashboard` shows one thing: give a RUN_DIR, or --ledger PATH for a "
            "site's ledger."
        )
    src = Source(run_dir=Path(args.run_dir) if args.run_dir else None,
                 ledger=Path(args.ledger) if args.ledger else None)  # fmt: skip
    src.check()
    return src


def run(args: argparse.Namespace) -> int:
    src = source(args)
    if args.json:
        print(json.dumps(src.view(), indent=2))
        return 0
    check_port(args.port, flag="--port")
    check_address(args.host, args.port, flag="--port")
    check_token(args.token)
    token = args.token
    if token is None and not _loopback(args.host):
        token = secrets.token_urlsafe(24)
    sock = _bind(args.host, args.port)
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]", args.host]
    app = make_app(src, token=token, hosts=hosts)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    what = f"ledger {src.ledger}" if src.ledger else f"run {src.run_dir}"
    Console(stderr=True).print(
        f"fedsilo dashboard for {what}: open {url}  (Ctrl-C stops it)",
        highlight=False,
        soft_wrap=True,
    )
    _serve(app, sock)
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is served, so a taken port or an
    address of another machine fails with one clear line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(
            f"Cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}. Pick a "
            "free port with --port (and an address of this machine with --host)."
        ) from None
    sock.listen(64)
    return sock


def _serve(app: Any, sock: socket.socket) -> None:
    """Serve until Ctrl-C or SIGTERM, then return: a stop is a clean exit (0). uvicorn
    shuts down on either signal and then raises it again under the handlers it found,
    which are these no-ops while it serves."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
