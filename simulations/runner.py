"""Run a federation of virtual sites on Flower's simulation engine (Ray backend).

The ServerApp and ClientApp are the deployment ones, unchanged: each virtual
site gets Flower's `partition-id`/`num-partitions` node config and loads its
share of the dataset; the run config reaches server and sites the same way it
does under `flwr run`. Each virtual site's policy and privacy ledger live in
RUN_DIR/ledgers/ (fedsilo.simulations.ledgers), written here before the engine
starts; with `--dp distributed`, so do their identities for secure aggregation
(RUN_DIR/identities, fedsilo.simulations.identities). Progress is read from
RUN_DIR/metrics.jsonl, the same record a deployed server writes.

The engine runs on a private Ray instance started for the run, or on a running Ray
cluster (`EngineConfig.ray_address`, fedsilo.simulations.cluster): then the sites'
ledgers are written from the nodes that run them, into RUN_DIR on a filesystem they
all share, which is checked before the engine starts. summary.json's `ray` entry
says which node(s) each site ran on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedsilo import flwr_adapter
from fedsilo.clients.dp_train import plan_run
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, FedsiloError
from fedsilo.privacy.policy import SitePolicy
from fedsilo.server.evaluate import load_eval_data
from fedsilo.server.records import SCHEMA, SCHEMA_KEY, RoundRecord, Summary, check_schema
from fedsilo.server.run_dir import (
    METRICS_FILE,
    RunDir,
    read_metrics,
    read_summary,
    write_online,
    write_site_names,
)
from fedsilo.simulations import cluster
from fedsilo.simulations.attacks import HOSTILE_KEY, Hostile
from fedsilo.simulations.engine import THREAD_VARS, EngineConfig, check_engine
from fedsilo.simulations.identities import write_simulated_site_identities
from fedsilo.simulations.ledgers import write_site_policies
from fedsilo.simulations.partition import partition_indices
from fedsilo.simulations.sites import SimulatedSites, simulated_cache_dir
from fedsilo.task.builtin import task_for
from fedsilo.task.features import drop_cache
from fedsilo.task.train import check_trainable, resolve_device, sample_rate

log = logging.getLogger("fedsilo.simulation")
APP_DIR = Path(__file__).resolve().parent.parent  # the fedsilo package: holds pyproject.toml
ProgressFn = Callable[[RoundRecord], None]
# {"schema": 1, "sites": N, "site-cpus": C, "site-gpus": G}: what --resume needs beyond
# config.json (versioned as the run directory's records: fedsilo.server.records)
SIMULATION_FILE = "simulation.json"


def run_simulation(
    cfg: RunConfig,
    *,
    sites: int,
    on_round: ProgressFn | None = None,
    verbose: bool = False,
    site_policies: Sequence[SitePolicy] | None = None,
    engine: EngineConfig | None = None,
    hostile: Hostile | None = None,
) -> Summary:
    """Simulate `sites` virtual sites for `cfg.rounds` rounds; return summary.json's record.

    `site_policies[i]` is virtual site i's own policy (default: a budget of the run's
    target epsilon at its delta). Ledgers already in RUN_DIR/ledgers keep their spend.
    `engine` says where the sites run (default: a private Ray instance, one CPU each);
    `hostile`, which of them attack (fedsilo.simulations.attacks; a new run records it).
    """
    flwr_adapter.check_flower_version()
    engine = engine or EngineConfig()
    if not cfg.resume and site_policies is not None and len(site_policies) != sites:
        raise ConfigError(f"{len(site_policies)} site policies for {sites} sites.")
    check_engine(engine, device=cfg.device)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray tip
    # SIGTERM stops a run (`simulate` says how to resume): no C stack dump from Ray's handler.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if engine.ray_address:
        # Workers on other machines find RUN_DIR by its path, not by this cwd.
        cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
        cluster.connect(engine, verbose=verbose)
    try:
        return _run_engine(cfg, engine, sites, on_round, verbose, site_policies, hostile)
    finally:
        if engine.ray_address:
            cluster.disconnect()  # Flower's engine already did, unless it never started


def _run_engine(
    cfg: RunConfig,
    engine: EngineConfig,
    sites: int,
    on_round: ProgressFn | None,
    verbose: bool,
    site_policies: Sequence[SitePolicy] | None,
    hostile: Hostile | None,
) -> Summary:
    # lazy: Flower's engine, Ray and the apps take 0.8 s, and `fedsilo --help` imports
    # this module (fedsilo.simulations.command)
    from fedsilo.clients.client_app import build_client_app
    from fedsilo.flwr_adapter import engine as engine_internals
    from fedsilo.server.server_app import app as server_app

    run_dir = Path(cfg.run_dir)
    prepare_sites(cfg, engine, sites, site_policies, hostile)
    if engine.ray_address:
        labels = cluster.check_nodes(run_dir, cfg)
        workers = engine_internals.actor_pool_size(engine.client_resources())
        cluster.check_cluster_capacity(engine, workers, labels)

    def name_sites(partitions: dict[int, int]) -> None:
        # A virtual site's name is its partition's, as the engine assigned it: the
        # ServerApp reads it from here, never from what a site's messages say.
        write_site_names(run_dir, {node: f"site-{pid}" for node, pid in partitions.items()})
        write_online(run_dir, len(partitions))  # every virtual site, for the whole run

    try:
        with (
            watching(run_dir, on_round),
            _worker_env(engine),
            _surface_fedsilo_errors(),
            engine_internals.site_nodes() as where,
        ):
            engine_internals.run_simulation(
                # The deployed ClientApp's code, with virtual sites: only this runner makes one.
                client_app=build_client_app(
                    SimulatedSites(str(run_dir), device=engine.site_device, hostile=hostile)
                ),
                server_app=server_app,
                sites=sites,
                run_config=cfg.to_flwr(),
                backend_config=_backend_config(engine, verbose=verbose),
                app_dir=str(APP_DIR),
                verbose=verbose,
                on_register=name_sites,
            )
    finally:
        # The virtual sites' cached features and decoded data shares are derived from a
        # public dataset the run can re-read: drop them rather than leave ~100 MB a site.
        drop_cache(simulated_cache_dir(run_dir))
    summary = read_summary(run_dir)
    if summary is None:
        raise FedsiloError(
            f"The simulation ended without a summary; see the log above and {run_dir}."
        )
    ray = cluster.placement_summary(engine, where.sites, where.addresses)
    summary = dataclasses.replace(
        summary, ray=ray, hostile=hostile.by_site(sites) if hostile else None
    )
    RunDir(run_dir).write_summary(summary)
    return summary


def prepare_sites(
    cfg: RunConfig,
    engine: EngineConfig,
    sites: int,
    site_policies: Sequence[SitePolicy] | None,
    hostile: Hostile | None = None,
) -> None:
    """Write what the virtual sites and `--resume` read from RUN_DIR before the engine
    starts: the sites' policies and simulation.json (a new run), and with distributed
    DP the sites' identities (a resumed run keeps its own)."""
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:  # a resumed run's sites keep the policies their ledgers hold
        if site_policies is None:
            default = SitePolicy(max_epsilon=cfg.target_epsilon, delta=cfg.target_delta)
            site_policies = [default] * sites
        write_site_policies(run_dir, site_policies)
        record: dict[str, object] = {SCHEMA_KEY: SCHEMA, "sites": sites, **engine.record()}
        if hostile is not None:
            record[HOSTILE_KEY] = str(hostile)
        (run_dir / SIMULATION_FILE).write_text(json.dumps(record) + "\n", "utf-8")
    if cfg.distributed:  # a resumed run keeps its sites' identities (and CA)
        write_simulated_site_identities(run_dir, sites)


def _backend_config(engine: EngineConfig, *, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend config: each site's resources and, without a cluster, the
    private Ray instance to start."""
    backend_config: dict[str, Any] = {"client_resources": engine.client_resources()}
    if not engine.ray_address:  # connected already otherwise: Flower then starts no Ray
        backend_config["init_args"] = {
            "address": "local",  # a private instance, even where RAY_ADDRESS names a cluster
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        }
    return backend_config


@contextmanager
def watching(run_dir: Path, on_round: ProgressFn | None, *, seen: int = 0) -> Iterator[None]:
    """Report each round's metrics record after the first `seen` while the block runs
    (and the last ones after)."""
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir, on_round, stop, seen), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


@contextmanager
def _worker_env(engine: EngineConfig) -> Iterator[None]:
    """The sites' thread counts in the environment while the engine runs, then the driver's.

    A private Ray's workers inherit the driver's environment; torch reads these at
    import (a cluster's workers get them from connect()). The driver's own thread
    count is pinned first, so only the actors change.
    """
    torch.set_num_threads(torch.get_num_threads())
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(engine.worker_env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _surface_fedsilo_errors() -> Iterator[None]:
    """Re-raise the FedsiloError behind an engine error (the engine wraps ServerApp errors)."""
    try:
        yield
    except FedsiloError:
        raise
    except Exception as exc:
        cause = _fedsilo_cause(exc)
        if cause is not None:
            raise cause from None
        raise


@dataclasses.dataclass(frozen=True)
class RecordedSimulation:
    """What simulation.json recorded of a run: its virtual sites, their resources, and
    which of them attack (`--hostile-sites`), all that `--resume` must keep."""

    sites: int
    engine: EngineConfig
    hostile: Hostile | None = None


def recorded_simulation(run_dir: Path, *, ray_address: str = "") -> RecordedSimulation:
    """The simulation `run_dir` recorded (simulation.json, read once).

    A resumed run keeps the sites' resources, but may run on another Ray cluster
    (`ray_address`, "" for a private instance).
    """
    file = run_dir / SIMULATION_FILE
    try:
        record = json.loads(file.read_text("utf-8"))
        check_schema(record, file)
        sites = int(record["sites"])
        engine = EngineConfig.from_record(record, ray_address=ray_address)
        hostile = record.get(HOSTILE_KEY)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"{run_dir} is not a run directory of `fedsilo simulate` (no {SIMULATION_FILE}); "
            "a deployed run resumes with `fedsilo server start --resume`."
        ) from None
    return RecordedSimulation(sites, engine, Hostile.parse(str(hostile)) if hostile else None)


def _watch(run_dir: Path, on_round: ProgressFn | None, stop: threading.Event, seen: int) -> None:
    size = -1  # metrics.jsonl is read again only once it has grown (a line per round, each
    # naming every site: re-parsing it twice a second was 13% of a 10,000-site driver)
    while True:
        done = stop.wait(0.5)
        now = _size(run_dir / METRICS_FILE)
        if on_round is not None and now != size:
            size = now
            for record in read_metrics(run_dir)[seen:]:
                on_round(record)
                seen += 1
        if done:
            return


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _fedsilo_cause(exc: BaseException) -> FedsiloError | None:
    while exc is not None:
        if isinstance(exc, FedsiloError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def preflight(cfg: RunConfig, sites: int) -> tuple[list[int], str]:
    """Check everything a simulation needs before any engine starts.

    Returns the sites' sizes and the task's name.

    Imports and checks the task (a forward pass of its model), loads its train and
    test splits, partitions them and plans the noise for the smallest site (local DP
    calibrates it; distributed DP checks the run's), so a bad task, bad data,
    impossible splits and unreachable budgets fail fast.
    """
    resolve_device(cfg.device)
    task = task_for(cfg)
    check_trainable(task, seed=cfg.seed)
    load_eval_data(cfg, cfg.eval_data)
    sizes = partition_sizes(cfg, sites)
    plan_run(cfg, min(sizes), prior=[])
    return sizes, task.name


def partition_sizes(cfg: RunConfig, sites: int) -> list[int]:
    """The examples each of `sites` virtual sites holds, partitioned as the sites will
    partition the task's training data (decoded once into RUN_DIR, for every site)."""
    train = SimulatedSites(cfg.run_dir).pool(task_for(cfg), cfg.data_dir)
    parts = partition_indices(train.y.numpy(), sites, cfg.partition_spec, seed=cfg.seed)
    return [len(p) for p in parts]


def max_sample_rate(cfg: RunConfig, sites: int) -> float:
    """Distributed DP's dp-max-sample-rate for the simulated sites: the largest
    min(1, batch-size / examples) over them (the smallest site's)."""
    return max(sample_rate(n, cfg.batch_size) for n in partition_sizes(cfg, sites))
