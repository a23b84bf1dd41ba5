"""`fedsilo client start`: run this site of the federation.

Examples:
  fedsilo client start --kit site-a --data /data/site-a.npz
  fedsilo client start --kit site-a --data /data/site-a.csv --task breast_cancer.task:task
  fedsilo client start --kit site-a --data a.npz --server fl.example.org:9092 --device cpu

The kit (DIR/sites/NAME from `fedsilo provision`) holds the federation CA, this
site's private key and site.toml (server address, site name, privacy policy).
The site waits (with backoff) for the server, trains every round it is asked to
under DP-SGD within its policy, and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import threading
from pathlib import Path

from rich.console import Console
from rich.text import Text

from fedsilo import exporter, flwr_adapter
from fedsilo.clients.launcher import ClientOptions, start_client
from fedsilo.clients.prometheus import SiteCollector, watch_spends
from fedsilo.config import DEVICES
from fedsilo.console import add_log_format, emit
from fedsilo.errors import ConfigError
from fedsilo.privacy.provision import read_site_kit
from fedsilo.processes import split_address, terminate_on_signals
from fedsilo.task.train import resolve_device

INSECURE_WARNING = (
    "[bold red]WARNING: --insecure: no TLS and no site authentication.[/] This site's model "
    "updates cross the network in clear text and it cannot tell the real server from an "
    "impostor. Use only on a network you fully trust."
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("client", help="run a site of the federation (`fedsilo client start`)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "start",
        help="join the federation as this site",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--kit", required=True, type=Path, help="this site's kit (DIR/sites/NAME)")
    s.add_argument(
        "--data",
        required=True,
        type=Path,
        help="this site's data: a .npz file for the built-in tasks, else what --task reads",
    )
    s.add_argument(
        "--task",
        default="builtin",
        metavar="PACKAGE.MODULE:OBJECT",
        help="the one task this site trains, installed here (the server must run the same); "
        "default: fedsilo's built-in tasks. The site refuses runs of any other task.",
    )
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--server", help="HOST:PORT of the server (default: site.toml's)")
    s.add_argument(
        "--connect-timeout",
        type=float,
        default=600.0,
        help="seconds to keep retrying a server that is not up (default 600)",
    )
    s.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per training process (default: all cores); 1 when several "
        "sites share one machine",
    )
    s.add_argument(
        "--keep-feature-cache",
        action="store_true",
        help="keep the features computed from this site's data (KIT/feature-cache, owner-only) "
        "after a run ends or the site stops; by default they are deleted, since a model's "
        "features (scatnet's) are a near-invertible copy of the private examples",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS and NO authentication (only if the server runs --insecure too)",
    )
    exporter.add_flags(s, "this site's own ledger: epsilon spent, budget left, rounds")
    add_log_format(s)
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    flwr_adapter.check_flower_version()  # the launcher drives Flower 1.39's SuperNode
    err = Console(stderr=True)
    if args.device not in DEVICES:
        raise ConfigError(f"`--device` must be one of {', '.join(DEVICES)}. Found {args.device!r}.")
    resolve_device(args.device)
    if args.threads < 0:
        raise ConfigError(f"`--threads` must be >= 0 (0 = all cores). Found {args.threads}.")
    if not (math.isfinite(args.connect_timeout) and args.connect_timeout >= 0):
        # NaN compares false with every deadline: the site would retry forever.
        raise ConfigError(
            "`--connect-timeout` must be a finite number of seconds >= 0. "
            f"Found {args.connect_timeout}; e.g. 600 (ten minutes)."
        )
    metrics = exporter.address(args)
    kit = read_site_kit(args.kit)
    server = args.server or kit.server
    split_address(server)
    opts = ClientOptions(
        server=server,
        data=args.data,
        device=args.device,
        connect_timeout_s=args.connect_timeout,
        insecure=args.insecure,
        threads=args.threads,
        keep_feature_cache=args.keep_feature_cache,
        task=args.task,
    )
    json_log = args.log_format == "json"

    def on_event(text: str) -> None:
        if json_log:
            emit("status", {"site": kit.name, "message": Text.from_markup(text).plain})
        else:
            err.print(text, highlight=False)

    if args.insecure:
        on_event(INSECURE_WARNING)
    on_event(
        f"[bold]fedsilo client[/]: site {kit.name}, data {args.data}, server {server}, policy "
        f"max epsilon {kit.policy.max_epsilon:g} at delta {kit.policy.delta:g}"
    )

    stop = threading.Event()
    if json_log:  # each new spend on the site's own ledger, with its total after it
        threading.Thread(
            target=watch_spends,
            args=(kit.ledger, lambda fields: emit("spend", fields), stop),
            daemon=True,
        ).start()
    with terminate_on_signals(), exporter.serving(lambda: SiteCollector(kit.ledger), metrics):
        try:
            start_client(kit, opts, on_event=on_event)
        except KeyboardInterrupt:
            on_event(f"site {kit.name} stopped")
        finally:
            stop.set()
    return 0
