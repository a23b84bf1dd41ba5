"""`fedsilo simulate`: a federation of virtual sites on this machine or a Ray cluster.

Examples:
  fedsilo simulate                                   # 3 sites, digits, epsilon 8
  fedsilo simulate --task breast_cancer.task:task --sites 3 --rounds 5 --target-epsilon 3
  fedsilo simulate --dataset fashion-mnist --sites 10 --target-epsilon 3 --rounds 5
  fedsilo simulate --partition dirichlet:0.5 --json > summary.json
  fedsilo simulate --sites 2 --site-max-epsilon 8,2   # site-1's budget refuses the run
  fedsilo simulate --dp distributed --rounds 40 --batch-size 300 --lr 2  # secure aggregation,
                                                     # noise shares: one step a round
  fedsilo simulate --resume runs/20260101-120000     # go on after a crash or Ctrl-C
  fedsilo simulate --ray-address 10.0.0.5:6379 --site-gpus 0.25 --sites 16 \\
      --out /shared/runs/x                           # on a Ray cluster; RUN_DIR shared
  fedsilo simulate --resume /shared/runs/x --ray-address 10.0.0.9:6379  # resume elsewhere
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsilo import exporter
from fedsilo.config import RunConfig
from fedsilo.console import dp_note, end_of_run_lines, quiet_logs, resume_line, summary_table
from fedsilo.errors import ConfigError
from fedsilo.privacy.policy import SitePolicy
from fedsilo.processes import terminate_on_signals
from fedsilo.run_flags import Layer, add_run_flags, build, given, resume
from fedsilo.server.prometheus import RunCollector
from fedsilo.server.records import RoundRecord
from fedsilo.server.run_dir import default_run_dir, new_run_dir, resume_config, run_complete
from fedsilo.simulations.attacks import Hostile
from fedsilo.simulations.cluster import disconnect, placement_line
from fedsilo.simulations.engine import EngineConfig, check_engine
from fedsilo.simulations.ledgers import rounds_allowed
from fedsilo.simulations.runner import (
    RecordedSimulation,
    max_sample_rate,
    preflight,
    recorded_simulation,
    run_simulation,
)

ENGINE = EngineConfig()
DEFAULT_SITES = 3


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="run a federation of virtual sites on this machine or a Ray cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sites", type=int, help=f"number of virtual sites (default {DEFAULT_SITES})")
    add_run_flags(p, simulation=True)
    _add_site_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="", help="run directory (default runs/<timestamp>)")
    o.add_argument(
        "--resume",
        dest="resume_dir",
        metavar="RUN_DIR",
        default="",
        help="continue a run that was stopped (crash, kill, Ctrl-C) from its last completed "
        "round, with its recorded settings, sites and ledgers; the round in progress when "
        "it stopped is asked for again (local DP: a site that trained it resends its kept "
        "reply at no new spend; one killed while training it refuses, having spent it). "
        "--rounds may add rounds where every site's "
        "budget allows them, --ray-address may move it to another cluster; any other flag "
        "must repeat the recorded value",
    )
    o.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)"
    )
    o.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    exporter.add_flags(o, "the run's rounds, replies and the sites' reported epsilon")
    p.set_defaults(func=run)


def _add_site_flags(p: argparse.ArgumentParser) -> None:
    """The virtual sites' own budgets and where they run (not part of the run config)."""
    p.add_argument(
        "--site-max-epsilon",
        default="",
        metavar="EPS[,EPS...]",
        help="each virtual site's own budget (its policy, kept in RUN_DIR/ledgers): one value "
        "for all sites or one per site (default: the target epsilon)",
    )
    p.add_argument(
        "--hostile-sites",
        default="",
        metavar="K:KIND",
        help="make the last K virtual sites hostile, to measure an --aggregation rule before "
        "you trust it (local DP): sign-flip:F (send the update times -F), noise:S (add "
        "Gaussian noise of std S), label-flip (train on shifted labels) or free-ride (send "
        "the global model back). They train and spend budget as every site does; the run "
        "records them as hostile (summary.json's `hostile`). E.g. 2:sign-flip:10",
    )
    e = p.add_argument_group(
        "where the sites run (simulation only: not part of the run config sites receive)"
    )
    e.add_argument(
        "--ray-address",
        default=ENGINE.ray_address,
        metavar="HOST:PORT",
        help="run the virtual sites on the running Ray cluster whose head is HOST:PORT (what "
        "`ray start --head` prints; 6379 by default), or auto for one started on this machine. "
        "Every node needs this fedsilo (and your task's package), and RUN_DIR (--out) on a "
        "filesystem they all mount at the same path: the sites write their ledgers there "
        "(checked before the run starts). Default: a private Ray instance on this machine. "
        "Allowed with --resume",
    )
    e.add_argument(
        "--site-cpus",
        type=float,
        metavar="N",
        help="CPUs each virtual site holds, fractions allowed; torch runs that many threads "
        f"per site, at least one (default {ENGINE.site_cpus:g})",
    )
    e.add_argument(
        "--site-gpus",
        type=float,
        metavar="N",
        help="GPUs each virtual site holds, fractions allowed: 0.25 lets four sites share one. "
        f"> 0 trains the sites on CUDA (not with --device cpu) (default {ENGINE.site_gpus:g})",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig the flags describe, validated; with --dp distributed, planned: its
    dp-max-sample-rate (from the partition unless given) and its one noise multiplier."""
    sites = _sites(args)
    # Checked and made before anything (the partition's decoded data) is written there.
    run_dir = new_run_dir(Path(args.out or default_run_dir()).resolve())

    def partition_rate(cfg: RunConfig) -> float:
        check_sites(cfg, sites)  # before the data is read for the rate
        return max_sample_rate(cfg, sites)

    cfg = build(
        Layer({**given(args), "run-dir": str(run_dir)}, "the command line"),
        sites=sites,
        min_sites=1,
        sample_rate=partition_rate,
    )
    check_sites(cfg, sites)
    return cfg


def _sites(args: argparse.Namespace) -> int:
    sites = DEFAULT_SITES if args.sites is None else int(args.sites)
    if sites < 1:
        raise ConfigError(f"`--sites` must be >= 1. Found {sites}.")
    return sites


def check_sites(cfg: RunConfig, sites: int) -> None:
    """Refuse a run whose rounds need more sites than the simulation has."""
    if cfg.min_sites > sites:
        what = "--dp-min-sites" if cfg.distributed else "--min-sites"
        raise ConfigError(
            f"`{what}` is {max(cfg.min_sites, cfg.dp_min_sites)} but the simulation has "
            f"{sites} site(s); no round could complete. Lower it or raise --sites."
        )


def run(args: argparse.Namespace) -> int:
    metrics_at = exporter.address(args)
    if args.resume_dir:
        cfg, recorded = resume_from_args(args)
        args.sites, engine, hostile = recorded.sites, recorded.engine, recorded.hostile
        policies = None  # the sites' own, already at the head of their ledgers
    else:
        hostile = Hostile.parse(args.hostile_sites) if args.hostile_sites else None
        cfg = config_from_args(args)
        args.sites = _sites(args)
        if hostile is not None:
            hostile.check(args.sites, distributed=cfg.distributed)
        engine = engine_from_args(args)
        policies = site_policies(args.site_max_epsilon, args.sites, cfg)
    check_engine(engine, device=cfg.device)  # before anything is loaded or printed
    err = Console(stderr=True)
    quiet_logs(args.verbose)
    sizes, task_name = preflight(cfg, args.sites)
    for line in batch_warnings(cfg.batch_size, sizes):
        err.print(line, highlight=False, soft_wrap=True)
    where = f"the Ray cluster at {engine.ray_address}" if engine.ray_address else "this machine"
    err.print(
        f"[bold]fedsilo simulate[/]: {args.sites} sites on task {task_name} "
        f"({min(sizes)}-{max(sizes)} examples each), {cfg.rounds} rounds, "
        f"target epsilon {cfg.target_epsilon:g} at delta {cfg.target_delta:g}{dp_note(cfg)}, "
        f"on {where}; run dir {cfg.run_dir}"
        + (f"; hostile: the last {hostile.count} sites ({hostile.attack})" if hostile else "")
        + (f"; aggregation {cfg.aggregation}" if cfg.aggregation != "fedavg" else ""),
        highlight=False,
    )
    if cfg.resume:
        err.print(
            resume_line(cfg.run_id, cfg.run_dir, cfg.rounds, ask_again=not cfg.distributed),
            highlight=False,
        )
    t0 = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("starting engine", total=cfg.rounds)

        def on_round(rec: RoundRecord) -> None:
            progress.update(
                task,
                advance=1,
                description=(
                    f"round {rec.round}: accuracy {rec.accuracy:.3f}, "
                    f"max epsilon {rec.max_epsilon:.2f}"
                ),
            )

        try:
            metrics = functools.partial(RunCollector, cfg.run_dir)
            with (
                exporter.serving(metrics, metrics_at),
                terminate_on_signals(),
                _engine_shutdown_unlogged(),
            ):
                summary = run_simulation(
                    cfg,
                    sites=args.sites,
                    on_round=on_round,
                    verbose=args.verbose,
                    site_policies=policies,
                    engine=engine,
                    hostile=hostile,
                )
        except (KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:  # Ray's handler
                raise
            progress.stop()
            stopped(Path(cfg.run_dir), signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 15)
    wall_seconds = round(time.monotonic() - t0, 2)
    if args.json:  # summary.json's object, and the command's own time
        sys.stdout.write(json.dumps({**summary.to_dict(), "wall_seconds": wall_seconds}) + "\n")
    else:
        Console().print(summary_table(summary))
        for line in end_of_run_lines(summary):
            Console().print(line, highlight=False)
        if engine.ray_address and summary.ray is not None:
            Console().print(placement_line(summary.ray), highlight=False)
        Console().print(
            f"run directory: {summary.run_dir}  ({wall_seconds:.1f} s); "
            f"the sites' privacy ledgers: fedsilo audit {summary.run_dir}",
            highlight=False,
        )
    return 0 if run_complete(summary) else 1


def engine_from_args(args: argparse.Namespace) -> EngineConfig:
    """Where the flags say the virtual sites run (validated with the run's device)."""
    return EngineConfig(
        ray_address=args.ray_address.strip(),
        site_cpus=ENGINE.site_cpus if args.site_cpus is None else args.site_cpus,
        site_gpus=ENGINE.site_gpus if args.site_gpus is None else args.site_gpus,
    )


def resume_from_args(args: argparse.Namespace) -> tuple[RunConfig, RecordedSimulation]:
    """The recorded config and simulation (sites, their resources, the hostile ones) of
    the run `--resume` names.

    The run may go on on another Ray cluster (`--ray-address`) and with more rounds
    where every virtual site's policy and budget allow them; any other flag must repeat
    what was recorded (run_flags.resume).
    """
    run_dir, values = resume_config(args.resume_dir, rounds=args.rounds)
    sim = recorded_simulation(run_dir, ray_address=args.ray_address.strip())
    sites, engine, hostile = sim.sites, sim.engine, sim.hostile
    recorded = RunConfig.from_flwr(values, source=f"{run_dir}/config.json")
    changed = [
        f"--{flag} {now:g} (recorded: {then:g})"
        for flag, now, then in (
            ("sites", args.sites, sites),
            ("site-cpus", args.site_cpus, engine.site_cpus),
            ("site-gpus", args.site_gpus, engine.site_gpus),
        )
        if now is not None and now != then
    ]
    if args.site_max_epsilon:
        changed.append("--site-max-epsilon (the sites' policies are in their ledgers)")
    if args.hostile_sites and str(Hostile.parse(args.hostile_sites)) != str(hostile):
        changed.append(f"--hostile-sites {args.hostile_sites} (recorded: {hostile or 'none'})")
    if changed:
        raise ConfigError(
            f"--resume continues {run_dir} with the sites it recorded; {', '.join(changed)} "
            "would change them. Drop it, or start a new run."
        )
    cfg = resume(recorded, Layer(given(args), "the command line"), run_dir=run_dir)
    if cfg.rounds > recorded.rounds:
        check_more_rounds(cfg, run_dir, sites)
    return cfg, sim


def check_more_rounds(cfg: RunConfig, run_dir: Path, sites: int) -> None:
    """Refuse more rounds than a virtual site's policy and budget allow, before any runs."""
    for site, most in rounds_allowed(run_dir, cfg.run_id, sites, cfg.rounds).items():
        if most < cfg.rounds:
            raise ConfigError(
                f"--rounds {cfg.rounds}: {site} allows this run at most {most} round(s) (its "
                "policy's allow-more-rounds and what remains of its budget at the noise it "
                f"planned); resume with --rounds {most} or less."
            )


def site_policies(text: str, sites: int, cfg: RunConfig) -> list[SitePolicy]:
    """The virtual sites' policies from `--site-max-epsilon` (budgets at the run's delta).

    With --dp distributed the virtual sites allow it at the run's own assumption, and
    they allow a resumed run more rounds within their budgets: every one of them is the
    user's, run by this command.
    """
    distributed = cfg.dp_min_sites if cfg.distributed else 0
    if not text.strip():
        return [
            SitePolicy(
                max_epsilon=cfg.target_epsilon,
                delta=cfg.target_delta,
                distributed_min_sites=distributed,
                allow_more_rounds=1,
            )
        ] * sites
    try:
        budgets = [float(v) for v in text.split(",")]
    except ValueError:
        budgets = []
    if len(budgets) not in (1, sites) or not all(math.isfinite(b) and b > 0 for b in budgets):
        raise ConfigError(
            f"`--site-max-epsilon` must be one number > 0 or {sites} comma-separated ones "
            f"(one per site). Found {text!r}."
        )
    if len(budgets) == 1:
        budgets = budgets * sites
    return [
        SitePolicy(
            max_epsilon=b,
            delta=cfg.target_delta,
            distributed_min_sites=distributed,
            allow_more_rounds=1,
        )
        for b in budgets
    ]


def stopped(run_dir: Path, signum: int) -> NoReturn:
    """Leave after Ctrl-C or SIGTERM: say how to go on, stop Ray, and exit at once.

    Flower's engine runs the ServerApp in a thread the interpreter would wait for at
    exit, and it would wait up to a round's timeout for replies no site sends any more.
    What the run wrote is complete: `--resume` goes on from its last completed round.
    """
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
    logging.disable(logging.CRITICAL)  # the engine's threads log the actors Ray stops
    err = Console(stderr=True)
    if (run_dir / "config.json").is_file():
        # soft_wrap: one line, whatever the terminal's width, to copy as it is
        err.print(
            f"stopped; resume with: fedsilo simulate --resume {run_dir}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err.print(
            f"stopped before its first round; nothing to resume in {run_dir}. Start a new run.",
            highlight=False,
            soft_wrap=True,
        )
    with contextlib.suppress(Exception):
        disconnect()  # a private Ray instance stops with it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def _engine_shutdown_unlogged() -> Iterator[None]:
    """Drop Flower's error logs while Ray is down: after Ctrl-C or SIGTERM its threads log
    every actor the shutdown stopped, and the run has already said how it stopped. (Before
    Ray starts, an error of the engine's also ends the run: it is raised, not only logged.)
    Ray installs its own SIGTERM handler when it starts (it exits; `run` catches that)."""

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        import ray  # lazy: loaded by then, and `simulate --help` does not pay for it

        return bool(ray.is_initialized())

    flwr = logging.getLogger("flwr")
    flwr.addFilter(keep)
    try:
        yield
    finally:
        flwr.removeFilter(keep)


def batch_warnings(batch_size: int, sizes: list[int]) -> list[str]:
    """One warning line when --batch-size is above some virtual sites' examples: each
    of their steps then samples every example (rate 1), one full-batch step per epoch."""
    small = [(f"site-{i}", n) for i, n in enumerate(sizes) if n < batch_size]
    if not small:
        return []
    named = ", ".join(f"{site} ({n} examples)" for site, n in small[:5])
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    return [
        f"[yellow]warning:[/] --batch-size {batch_size} is above the data of {named}{more}: "
        "each of their steps uses all of it (sampling rate 1), the most privacy a step can "
        f"cost. Lower --batch-size below {min(sizes)} to sample."
    ]
