"""The `fedsilo` command line. Each subcommand lives beside the code it drives.

  fedsilo simulate   run a federation of virtual sites on this machine
  fedsilo audit      verify site privacy ledgers and report their spend
  fedsilo provision  make the federation's CA, server TLS and site keys
  fedsilo server     run the aggregation server (flower-superlink over TLS)
  fedsilo client     run a site (flower-supernode, authenticated by its key)
  fedsilo data       split a dataset into per-site files for demos and tests
  (run `fedsilo --help` for the full list)

User mistakes (FedsiloError) print one `error:` line and exit non-zero, with no
traceback; `--debug` keeps the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from fedsilo import __version__
from fedsilo.errors import FedsiloError
from fedsilo.flwr_adapter import disable_telemetry

# Modules providing `register(subparsers)`; each adds one subcommand with `func` set.
COMMANDS = (
    "fedsilo.simulations.command",
    "fedsilo.privacy.audit_command",
    "fedsilo.simulations.data_command",
    "fedsilo.privacy.provision_command",
    "fedsilo.server.command",
    "fedsilo.clients.command",
    "fedsilo.server.export_command",
    "fedsilo.server.dashboard_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsilo",
        description="Privacy-preserving federated learning across data-center sites: "
        "Flower over TLS gRPC, Opacus DP-SGD at every site, budgets the sites enforce.",
        epilog="Start with `fedsilo simulate` (a 3-site federation on digits, 20-30 s).",
    )
    parser.add_argument("--version", action="version", version=f"fedsilo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    disable_telemetry()  # before any Flower code runs here or in a child (Ray included)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedsiloError as exc:
        if args.debug:
            raise
        # escape: messages name TOML tables ("[policy]"), which are not rich markup
        Console(stderr=True).print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return exc.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
