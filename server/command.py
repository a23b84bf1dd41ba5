"""`fedsilo server start`: run the federation server for one federated run.

Examples:
  fedsilo server start --kit fed/server                       # every site, digits defaults
  fedsilo server start --kit fed/server --task breast_cancer.task:task --eval-data eval.csv
  fedsilo server start --kit fed/server --rounds 5 --min-sites 2 --eval-data eval.npz
  fedsilo server start --kit fed/server --config run.toml --out runs/exp1
  fedsilo server start --kit fed/server --resume runs/exp1    # after a crash: go on

Starts Flower's SuperLink with TLS and SuperNode authentication, admits only the
kit's sites (fed/server/sites/*.pub), waits for them, runs the rounds and writes the
run directory (metrics.jsonl, checkpoints, final model, summary.json). Ctrl-C or
SIGTERM stops the run and every process it started. A run whose server stopped
(crash, kill, power loss) goes on with --resume RUN_DIR from its last completed
round, with the same run identity: sites keep the noise plan they recorded and
never train a round twice. The round in progress when it stopped is asked for again:
with local DP each site that trained it resends the reply it kept (no new spend), so
no round is lost; with distributed DP it is lost (a site never re-masks its input).

With --dp distributed the run's one noise multiplier is calibrated here, before any
site joins, for --dp-max-sample-rate (required: batch-size / the smallest site's
examples), and sent to every site in the run config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from fedsilo import exporter, flwr_adapter
from fedsilo.config import RunConfig, check_port
from fedsilo.console import (
    add_log_format,
    dp_note,
    emit,
    end_event,
    end_of_run_lines,
    quiet_logs,
    resume_line,
    round_events,
    stopped_round_events,
    summary_table,
)
from fedsilo.errors import ConfigError
from fedsilo.privacy.provision import read_server_kit, read_toml
from fedsilo.processes import CONTROL_PORT, terminate_on_signals
from fedsilo.run_flags import Layer, add_run_flags, build, given, resume
from fedsilo.server.evaluate import load_eval_data
from fedsilo.server.launcher import Event, ServerOptions, start_server
from fedsilo.server.records import RoundRecord
from fedsilo.server.run_dir import resume_config, run_complete
from fedsilo.task.builtin import task_for
from fedsilo.task.train import check_trainable

INSECURE_WARNING = (
    "[bold red]WARNING: --insecure: no TLS and no site authentication.[/] Models, updates "
    "and metrics cross the network in clear text, and ANY machine that reaches the port "
    "can join as a site and receive the model. Use only on a network you fully trust."
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("server", help="run the federation server (`fedsilo server start`)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "start",
        help="start the server and run the federation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--kit", required=True, type=Path, help="the server kit (DIR/server)")
    s.add_argument(
        "--config",
        type=Path,
        help="run config TOML (kebab-case run-config keys); flags override it",
    )
    s.add_argument(
        "--wait-sites",
        type=int,
        help="start once this many sites are online (default: --min-sites)",
    )
    add_run_flags(s, simulation=False)
    s.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>)")
    exporter.add_flags(s, "the run's rounds, replies, sites online and reported epsilon")
    add_log_format(s)
    s.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last completed round, with its recorded "
        "settings: --rounds may add rounds (each site trains them only if its policy "
        "allows more rounds and they fit its budget); any other flag must repeat the "
        "recorded value (no --config)",
    )
    n = s.add_argument_group("network")
    n.add_argument("--listen", default="0.0.0.0", help="address the Fleet API binds")
    n.add_argument("--fleet-port", type=int, help="port sites dial (default: the kit's)")
    n.add_argument(
        "--control-port",
        type=int,
        default=CONTROL_PORT,
        help=f"Flower's Control API port, on 127.0.0.1 (default {CONTROL_PORT})",
    )
    n.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS and NO site authentication (sites must pass --insecure too)",
    )
    s.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, sites: int) -> RunConfig:
    """Defaults, then --config TOML, then flags (run_flags.build); or, with --resume, the
    recorded config, which flags may only repeat, but for more rounds (run_flags.resume)."""
    flags = Layer(given(args), "the command line")
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError(
                f"--resume continues {args.resume} with the settings it recorded; drop --config."
            )
        run_dir, values = resume_config(args.resume, rounds=args.rounds)
        recorded = RunConfig.from_flwr(values, source=f"{run_dir}/config.json")
        return checked(resume(recorded, flags, run_dir=run_dir), sites)
    layers = [flags]
    if args.config is not None:
        layers.insert(0, Layer(read_toml(args.config), str(args.config)))
    return checked(build(*layers, sites=sites, min_sites=sites), sites)


def checked(cfg: RunConfig, sites: int) -> RunConfig:
    """`cfg` with eval-data absolute, once its task trains and its data loads here."""
    if cfg.eval_data:
        cfg = dataclasses.replace(cfg, eval_data=str(Path(cfg.eval_data).resolve()))
    # A task that cannot train and a bad evaluation file fail now, not after sites joined.
    check_trainable(task_for(cfg), seed=cfg.seed)
    load_eval_data(cfg, cfg.eval_data)
    if cfg.min_sites > sites:
        raise ConfigError(
            f"`min-sites` is {cfg.min_sites} but the kit authorises only {sites} site(s). "
            "Lower --min-sites or add sites with `fedsilo provision add-site`."
        )
    return cfg


def run(args: argparse.Namespace) -> int:
    flwr_adapter.check_flower_version()  # the launcher drives Flower 1.39's CLI and processes
    err = Console(stderr=True)
    kit = read_server_kit(args.kit, check=not args.insecure)
    cfg = config_from_args(args, len(kit.sites))
    wait = args.wait_sites if args.wait_sites is not None else cfg.min_sites
    if wait < cfg.min_sites:
        raise ConfigError(f"`--wait-sites` ({wait}) must be >= min-sites ({cfg.min_sites}).")
    if wait > len(kit.sites) and not args.insecure:
        raise ConfigError(
            f"`--wait-sites` is {wait} but the kit authorises only {len(kit.sites)} site(s); "
            "the server would wait forever. Lower it or add sites with "
            "`fedsilo provision add-site`."
        )
    opts = ServerOptions(
        listen=args.listen,
        fleet_port=check_port(
            kit.fleet_port if args.fleet_port is None else args.fleet_port, flag="--fleet-port"
        ),
        control_port=check_port(args.control_port, flag="--control-port"),
        wait_sites=wait,
        insecure=args.insecure,
        metrics=exporter.address(args),
    )
    json_log = args.log_format == "json"

    def say(text: str) -> None:
        if json_log:
            emit("message", {"message": Text.from_markup(text).plain})
        else:
            err.print(text, highlight=False)

    if args.insecure:
        say(INSECURE_WARNING)
    quiet_logs(False)
    who = (
        "ANY site may join (--insecure)"
        if args.insecure
        else f"{len(kit.sites)} authorised site(s) ({', '.join(kit.sites)})"
    )
    say(
        f"[bold]fedsilo server[/]: {who}, {cfg.rounds} rounds of task {task_for(cfg).name}, "
        f"min-sites {cfg.min_sites}{dp_note(cfg)}; run dir {cfg.run_dir}"
    )
    if cfg.resume:
        say(resume_line(cfg.run_id, cfg.run_dir, cfg.rounds, ask_again=not cfg.distributed))
    t0 = time.monotonic()

    def on_event(kind: str, info: Event) -> None:
        elapsed = f"[{time.monotonic() - t0:6.1f} s]"
        if isinstance(info, RoundRecord):
            err.print(
                f"{elapsed} round {info.round}: accuracy {info.accuracy:.3f}, max epsilon "
                f"{info.max_epsilon:.2f}, sites {', '.join(info.sites)} "
                f"({info.seconds:.1f} s)",
                highlight=False,
            )
            for line in absent_lines(info):
                err.print(f"{elapsed}   {line}", highlight=False)
        elif kind == "superlink":
            err.print(f"{elapsed} listening for sites on {info['fleet']}", highlight=False)
            err.print(
                f"{elapsed} Flower's commands on this run: FLWR_HOME={cfg.run_dir}/flwr-home "
                "flwr ls (then flwr log RUN_ID, flwr stop RUN_ID)",
                highlight=False,
            )
        elif kind == "registered":
            err.print(f"{elapsed} authorised: {', '.join(info['sites'])}", highlight=False)
        elif kind == "sites":
            err.print(
                f"{elapsed} sites online: {info['online']} (starting at {info['wanted']})",
                highlight=False,
            )

    def on_json_event(kind: str, info: Event) -> None:
        if isinstance(info, RoundRecord):
            for event, fields in round_events(info):
                emit(event, fields)
        else:
            emit({"superlink": "listening", "sites": "sites_online"}.get(kind, kind), info)

    with terminate_on_signals():
        summary = start_server(kit, cfg, opts, on_event=on_json_event if json_log else on_event)
    if json_log:
        for event, fields in stopped_round_events(summary):
            emit(event, fields)
        emit("end", end_event(summary))
        return 0 if run_complete(summary) else 1
    Console().print(summary_table(summary))
    for line in end_of_run_lines(summary):
        Console().print(line, highlight=False)
    Console().print(
        f"run directory: {summary.run_dir}  ({time.monotonic() - t0:.1f} s)", highlight=False
    )
    sys.stdout.flush()
    return 0 if run_complete(summary) else 1


def absent_lines(record: RoundRecord) -> list[str]:
    """One line per site that failed or refused in a round's metrics record, with why."""
    return [
        f"{site} {what}: {record.reasons.get(site, 'no reason given')}"
        for what, sites in (("refused", record.refused), ("failed", record.failed))
        for site in sites
    ]
