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
  fedsilo simulate --ray-address 10.0.0.5:6379 --site-gpus 0.25 --sites 16 \
      --out /shared/runs/x                           # on a Ray cluster; RUN_DIR shared
  fedsilo simulate --resume /shared/runs/x --ray-address 10.0.0.9:6379  # resume elsewhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsilo.config import RunConfig, new_run_id
from fedsilo.console import dp_note, end_of_run_lines, quiet_logs, resume_line, summary_table
from fedsilo.privacy.policy import SitePolicy
from fedsilo.server.run_dir import default_run_dir, run_complete
from fedsilo.simulations.engine import EngineConfig

DEFAULTS = RunConfig()
ENGINE = EngineConfig()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="run a federation of virtual sites on this machine or a Ray cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sites", type=int, default=3, help="number of virtual sites (default 3)")
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        default=DEFAULTS.task,
        metavar="PACKAGE.MODULE:OBJECT",
        help="your own model and data: an installed fedsilo.task.Task, e.g. "
        "breast_cancer.task:task (README, 'Your own model and data'); default: the built-in "
        "task --dataset and --model name",
    )
    g.add_argument(
        "--dataset",
        default=DEFAULTS.dataset,
        help="built-in task: digits (embedded), fashion-mnist or mnist (IDX files)",
    )
    g.add_argument(
        "--data-dir",
        default=DEFAULTS.data_dir,
        help="directory of IDX files (default: /usr/share/datasets/<dataset>)",
    )
    g.add_argument(
        "--model",
        default=DEFAULTS.model,
        help="built-in task's model: auto (scatnet for 28x28 images, mlp for digits), mlp, "
        "cnn or scatnet",
    )
    g.add_argument(
        "--partition",
        default=DEFAULTS.partition,
        help="iid, dirichlet:ALPHA (non-IID labels) or shards:K",
    )
    g.add_argument("--rounds", type=int, default=DEFAULTS.rounds)
    g.add_argument("--local-epochs", type=int, default=DEFAULTS.local_epochs)
    g.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help="expected Poisson batch size per step",
    )
    g.add_argument("--lr", type=float, default=DEFAULTS.lr)
    g.add_argument("--momentum", type=float, default=DEFAULTS.momentum)
    d = p.add_argument_group("differential privacy (per site, for the whole run)")
    d.add_argument("--target-epsilon", type=float, default=DEFAULTS.target_epsilon)
    d.add_argument("--target-delta", type=float, default=DEFAULTS.target_delta)
    d.add_argument(
        "--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, help="per-sample clip norm C"
    )
    d.add_argument("--accountant", default=DEFAULTS.accountant, help="prv (tight) or rdp")
    d.add_argument(
        "--dp",
        default=DEFAULTS.dp,
        choices=("local", "distributed"),
        help="local (default): each site adds all the noise its guarantee needs and trusts no "
        "one. distributed: secure aggregation (SecAgg+) and a noise share per site: the "
        "server sees only the sum, which carries central DP-SGD's noise if at least "
        "--dp-min-sites sites take part and none colludes with the server; one DP-SGD step "
        "per round (--local-epochs unused), so use many rounds and a large --batch-size",
    )
    d.add_argument(
        "--dp-min-sites",
        type=int,
        default=DEFAULTS.dp_min_sites,
        metavar="M",
        help="with --dp distributed: the honest sites whose noise shares every sum must hold; "
        "each site adds 1/M of the noise variance (default: --sites)",
    )
    d.add_argument(
        "--dp-max-sample-rate",
        type=float,
        default=DEFAULTS.dp_max_sample_rate,
        metavar="Q",
        help="with --dp distributed: the largest Poisson sampling rate any site uses. The "
        "sum carries one noise multiplier, the same for every site, so it is calibrated "
        "once for this rate; a site whose own rate (batch-size / its examples) is larger "
        "samples at Q instead (default 0: batch-size / the smallest simulated site's "
        "examples, from the partition)",
    )
    d.add_argument(
        "--min-sites",
        type=int,
        default=None,
        metavar="N",
        help="the run stops when fewer sites reply in a round (default 1; with --dp "
        "distributed, --dp-min-sites: a smaller sum would not carry the assumed noise)",
    )
    d.add_argument(
        "--site-max-epsilon",
        default="",
        metavar="EPS[,EPS...]",
        help="each virtual site's own budget (its policy, kept in RUN_DIR/ledgers): one value "
        "for all sites or one per site (default: the target epsilon)",
    )
    o = p.add_argument_group("run")
    o.add_argument("--seed", type=int, default=DEFAULTS.seed)
    o.add_argument("--device", default=DEFAULTS.device, help="auto, cpu or cuda")
    o.add_argument("--out", default="", help="run directory (default runs/<timestamp>)")
    o.add_argument(
        "--resume",
        dest="resume_dir",
        metavar="RUN_DIR",
        default="",
        help="continue a run that was stopped (crash, kill, Ctrl-C) from its last completed "
        "round, with its recorded settings, sites and ledgers; a round in progress when it "
        "stopped is lost (its sites spent it)",
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
        default=ENGINE.site_cpus,
        metavar="N",
        help="CPUs each virtual site holds, fractions allowed; torch runs that many threads "
        "per site, at least one (default 1)",
    )
    e.add_argument(
        "--site-gpus",
        type=float,
        default=ENGINE.site_gpus,
        metavar="N",
        help="GPUs each virtual site holds, fractions allowed: 0.25 lets four sites share one. "
        "> 0 trains the sites on CUDA (not with --device cpu) (default 0)",
    )
    o.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)"
    )
    o.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig the flags describe (validated); with --dp distributed, planned: its
    dp-max-sample-rate (from the partition unless given) and its one noise multiplier."""
    from fedsilo.privacy.distributed import planned
    from fedsilo.simulations.runner import max_sample_rate

    values: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    if values.get("dp") == "distributed":
        values["dp_min_sites"] = values["dp_min_sites"] or args.sites
    if values.get("min_sites") is None:
        values["min_sites"] = values["dp_min_sites"] if values.get("dp") == "distributed" else 1
    values["run_dir"] = args.out or str(default_run_dir())
    values["run_id"] = new_run_id()
    cfg = RunConfig(**values)
    if cfg.distributed and not cfg.dp_max_sample_rate:
        # Everything else is checked before the data is read for the rate.
        dataclasses.replace(cfg, dp_max_sample_rate=1.0).validate(source="the command line")
        check_sites(cfg, args.sites)
        cfg = dataclasses.replace(cfg, dp_max_sample_rate=max_sample_rate(cfg, args.sites))
    cfg.validate(source="the command line")
    check_sites(cfg, args.sites)
    return planned(cfg)


def check_sites(cfg: RunConfig, sites: int) -> None:
    """Refuse a run whose rounds need more sites than the simulation has."""
    if cfg.min_sites > sites:
        from fedsilo.errors import ConfigError

        what = "--dp-min-sites" if cfg.distributed else "--min-sites"
        raise ConfigError(
            f"`{what}` is {max(cfg.min_sites, cfg.dp_min_sites)} but the simulation has "
            f"{sites} site(s); no round could complete. Lower it or raise --sites."
        )


def run(args: argparse.Namespace) -> int:
    from fedsilo.errors import ConfigError
    from fedsilo.simulations.cluster import placement_line
    from fedsilo.simulations.engine import check_engine
    from fedsilo.simulations.runner import preflight, run_simulation

    if args.resume_dir:
        cfg, args.sites, engine = resume_from_args(args)
        policies = None  # the sites' own, already at the head of their ledgers
    else:
        if args.sites < 1:
            raise ConfigError(f"`--sites` must be >= 1. Found {args.sites}.")
        cfg = config_from_args(args)
        engine = engine_from_args(args)
        policies = site_policies(args.site_max_epsilon, args.sites, cfg)
    check_engine(engine, device=cfg.device)  # before anything is loaded or printed
    err = Console(stderr=True)
    quiet_logs(args.verbose)
    sizes, task_name = preflight(cfg, args.sites)
    where = f"the Ray cluster at {engine.ray_address}" if engine.ray_address else "this machine"
    err.print(
        f"[bold]fedsilo simulate[/]: {args.sites} sites on task {task_name} "
        f"({min(sizes)}-{max(sizes)} examples each), {cfg.rounds} rounds, "
        f"target epsilon {cfg.target_epsilon:g} at delta {cfg.target_delta:g}{dp_note(cfg)}, "
        f"on {where}; run dir {cfg.run_dir}",
        highlight=False,
    )
    if cfg.resume:
        err.print(resume_line(cfg.run_id, cfg.run_dir, cfg.rounds), highlight=False)
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

        def on_round(rec: dict[str, Any]) -> None:
            progress.update(
                task,
                advance=1,
                description=(
                    f"round {rec['round']}: accuracy {rec['accuracy']:.3f}, "
                    f"max epsilon {rec['max_epsilon']:.2f}"
                ),
            )

        summary = run_simulation(
            cfg,
            sites=args.sites,
            on_round=on_round,
            verbose=args.verbose,
            site_policies=policies,
            engine=engine,
        )
    summary["wall_seconds"] = round(time.monotonic() - t0, 2)
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        Console().print(summary_table(summary))
        for line in end_of_run_lines(summary):
            Console().print(line, highlight=False)
        if engine.ray_address:
            Console().print(placement_line(summary["ray"]), highlight=False)
        Console().print(
            f"run directory: {summary['run_dir']}  ({summary['wall_seconds']:.1f} s); "
            f"the sites' privacy ledgers: fedsilo audit {summary['run_dir']}",
            highlight=False,
        )
    return 0 if run_complete(summary) else 1


def engine_from_args(args: argparse.Namespace) -> EngineConfig:
    """Where the flags say the virtual sites run (validated with the run's device)."""
    return EngineConfig(
        ray_address=args.ray_address.strip(), site_cpus=args.site_cpus, site_gpus=args.site_gpus
    )


def resume_from_args(args: argparse.Namespace) -> tuple[RunConfig, int, EngineConfig]:
    """The recorded config, site count and site resources of the run `--resume` names,
    checked; the run may go on on another Ray cluster (`--ray-address`)."""
    from fedsilo.errors import ConfigError
    from fedsilo.server.run_dir import resume_config
    from fedsilo.simulations.runner import recorded_simulation

    changed = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(RunConfig)
        if hasattr(args, f.name) and getattr(args, f.name) not in (None, getattr(DEFAULTS, f.name))
    ]
    changed += [f for f, on in (("--sites", args.sites != 3), ("--out", bool(args.out))) if on]
    changed += ["--site-max-epsilon"] if args.site_max_epsilon else []
    resources = (
        ("--site-cpus", args.site_cpus != ENGINE.site_cpus),
        ("--site-gpus", args.site_gpus != ENGINE.site_gpus),
    )
    changed += [f for f, on in resources if on]  # recorded in simulation.json
    if changed:
        raise ConfigError(
            f"--resume continues {args.resume_dir} with the settings it recorded; drop "
            f"{', '.join(changed)}."
        )
    run_dir, values = resume_config(args.resume_dir)
    sites, engine = recorded_simulation(run_dir, ray_address=args.ray_address.strip())
    return RunConfig.from_flwr(values, source=f"{run_dir}/config.json"), sites, engine


def site_policies(text: str, sites: int, cfg: RunConfig) -> list[SitePolicy]:
    """The virtual sites' policies from `--site-max-epsilon` (budgets at the run's delta).

    With --dp distributed the virtual sites allow it at the run's own assumption: every
    one of them is the user's, run by this command.
    """
    from fedsilo.errors import ConfigError

    distributed = cfg.dp_min_sites if cfg.distributed else 0
    if not text.strip():
        return [
            SitePolicy(
                max_epsilon=cfg.target_epsilon,
                delta=cfg.target_delta,
                distributed_min_sites=distributed,
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
        SitePolicy(max_epsilon=b, delta=cfg.target_delta, distributed_min_sites=distributed)
        for b in budgets
    ]
