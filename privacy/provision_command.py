"""`fedsilo provision`: the federation's CA, the server's TLS certificate, one key per site.

Examples:
  fedsilo provision --out fed --server-host fl.example.org --server-host 10.0.0.5 --sites a,b,c
  fedsilo provision --out fed --federation federation.toml
  fedsilo provision add-site --out fed d          # a new site; nothing else changes
  fedsilo provision renew-server --out fed        # a new server certificate, same CA
  fedsilo provision certify-site --out fed a b    # site.crt for kits made without one

Then copy fed/server/ to the server machine and fed/sites/NAME/ to site NAME.
Each site kit's site.crt is the CA's certificate of its key: secure aggregation
(--dp distributed) needs it to prove each site's keys to the others.
Keep fed/ca/ca.key offline: whoever holds it can mint a server certificate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fedsilo.errors import ConfigError
from fedsilo.privacy.certify import certify_sites
from fedsilo.privacy.provision import (
    FLEET_PORT,
    add_site,
    parse_sites,
    provision,
    read_federation_file,
    renew_server,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "provision",
        help="create the federation's keys and certificates (server and site kits)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", dest="out_dir", help="federation directory to create")
    p.add_argument(
        "--server-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a name or IP address sites dial (repeat for each; every one gets a SAN)",
    )
    p.add_argument("--sites", help="comma-separated site names, e.g. a,b,c")
    p.add_argument(
        "--federation",
        type=Path,
        help="TOML file with [federation] server-hosts, sites (and fleet-port)",
    )
    p.add_argument("--fleet-port", type=int, default=None, help="port sites dial (default 9092)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing federation: a NEW CA; every site needs its new kit",
    )
    p.set_defaults(func=run_create)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    a = actions.add_parser("add-site", help="add one site to an existing federation")
    a.add_argument("--out", dest="out_dir", required=True, help="the federation directory")
    a.add_argument("name", help="the new site's name")
    a.add_argument("--force", action="store_true", help="re-issue an existing site's key")
    a.set_defaults(func=run_add_site)
    r = actions.add_parser("renew-server", help="issue a new server certificate from the CA")
    r.add_argument("--out", dest="out_dir", required=True, help="the federation directory")
    r.add_argument("--server-host", action="append", default=[], metavar="HOST")
    r.set_defaults(func=run_renew)
    c = actions.add_parser(
        "certify-site",
        help="issue site.crt for existing site kits (same key; also renews an expiring one)",
    )
    c.add_argument("--out", dest="out_dir", required=True, help="the federation directory")
    c.add_argument("names", nargs="*", metavar="NAME", help="the sites (default: every one)")
    c.set_defaults(func=run_certify)


def run_create(args: argparse.Namespace) -> int:
    if not args.out_dir:
        raise ConfigError("`fedsilo provision` needs --out DIR (the federation directory).")
    if args.federation is not None:
        if args.server_host or args.sites:
            raise ConfigError("Give either --federation FILE or --server-host/--sites, not both.")
        hosts, sites, port = read_federation_file(args.federation)
    else:
        if not args.server_host or not args.sites:
            raise ConfigError(
                "`fedsilo provision` needs --server-host HOST (repeatable) and --sites a,b,c "
                "(or --federation FILE.toml)."
            )
        hosts, sites, port = args.server_host, parse_sites(args.sites), FLEET_PORT
    if args.fleet_port is not None:
        port = args.fleet_port
    out = Path(args.out_dir)
    err = Console(stderr=True)
    if args.force and (out / "ca" / "ca.key").exists():
        err.print(
            f"[bold yellow]warning:[/] --force: replacing the federation CA in {out}. "
            "Every existing site kit stops working; send each site its new kit.",
            highlight=False,
        )
    provision(out, hosts=hosts, sites=sites, fleet_port=port, force=args.force)
    Console().print(
        f"federation in {out}: server kit {out / 'server'} (hosts {', '.join(hosts)}, "
        f"port {port}); site kits {', '.join(str(out / 'sites' / s) for s in sites)}.\n"
        f"Keep {out / 'ca' / 'ca.key'} offline.",
        highlight=False,
    )
    return 0


def run_add_site(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    add_site(out, args.name, force=args.force)
    Console().print(
        f"site {args.name}: kit {out / 'sites' / args.name}; its public key is in "
        f"{out / 'server' / 'sites'} (restart `fedsilo server start` to authorise it).",
        highlight=False,
    )
    return 0


def run_renew(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    renew_server(out, hosts=args.server_host)
    Console().print(f"new server certificate in {out / 'server'}", highlight=False)
    return 0


def run_certify(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    written = certify_sites(out, args.names)
    Console().print(
        "\n".join(f"site {p.parent.name}: certificate {p} (same key)" for p in written)
        + "\nCopy each site.crt into that site's kit; its SuperNode authorisation is unchanged.",
        highlight=False,
    )
    return 0
