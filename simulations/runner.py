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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, FedsiloError
from fedsilo.privacy.policy import SitePolicy
from fedsilo.server.run_dir import read_metrics
from fedsilo.simulations.engine import THREAD_VARS, EngineConfig, check_engine

log = logging.getLogger("fedsilo.simulation")
APP_DIR = Path(__file__).resolve().parent.parent  # the fedsilo package: holds pyproject.toml
ProgressFn = Callable[[dict[str, Any]], None]
# {"sites": N, "site-cpus": C, "site-gpus": G}: what --resume needs beyond config.json
SIMULATION_FILE = "simulation.json"


def run_simulation(
    cfg: RunConfig,
    *,
    sites: int,
    on_round: ProgressFn | None = None,
    verbose: bool = False,
    site_policies: Sequence[SitePolicy] | None = None,
    engine: EngineConfig | None = None,
) -> dict[str, Any]:
    """Simulate `sites` virtual sites for `cfg.rounds` rounds; return summary.json's object.

    `site_policies[i]` is virtual site i's own policy (default: a budget of the run's
    target epsilon at its delta). Ledgers already in RUN_DIR/ledgers keep their spend.
    `engine` says where the sites run (default: a private Ray instance, one CPU each).
    """
    from fedsilo import flwr_adapter
    from fedsilo.simulations import cluster

    flwr_adapter.check_flower_version()
    engine = engine or EngineConfig()
    if not cfg.resume and site_policies is not None and len(site_policies) != sites:
        raise ConfigError(f"{len(site_policies)} site policies for {sites} sites.")
    check_engine(engine, device=cfg.device)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray tip
    if engine.ray_address:
        # Workers on other machines find RUN_DIR by its path, not by this cwd.
        cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
        cluster.connect(engine, verbose=verbose)
    try:
        return _run_engine(cfg, engine, sites, on_round, verbose, site_policies)
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
) -> dict[str, Any]:
    from fedsilo.clients.client_app import build_client_app
    from fedsilo.flwr_adapter import engine as engine_internals
    from fedsilo.server.run_dir import RunDir, write_site_names
    from fedsilo.server.server_app import app as server_app
    from fedsilo.simulations import cluster
    from fedsilo.simulations.identities import write_simulated_site_identities
    from fedsilo.simulations.ledgers import write_site_policies
    from fedsilo.simulations.sites import SimulatedSites, simulated_cache_dir
    from fedsilo.task.features import drop_cache

    run_dir = Path(cfg.run_dir)
    if not cfg.resume:  # a resumed run's sites keep the policies their ledgers hold
        if site_policies is None:
            default = SitePolicy(max_epsilon=cfg.target_epsilon, delta=cfg.target_delta)
            site_policies = [default] * sites
        write_site_policies(run_dir, site_policies)
        record = {"sites": sites, **engine.record()}
        (run_dir / SIMULATION_FILE).write_text(json.dumps(record) + "\n", "utf-8")
    if cfg.distributed:  # a resumed run keeps its sites' identities (and CA)
        write_simulated_site_identities(run_dir, sites)
    if engine.ray_address:
        labels = cluster.check_nodes(run_dir, cfg)
        workers = engine_internals.actor_pool_size(engine.client_resources())
        cluster.check_cluster_capacity(engine, workers, labels)

    def name_sites(partitions: dict[int, int]) -> None:
        # A virtual site's name is its partition's, as the engine assigned it: the
        # ServerApp reads it from here, never from what a site's messages say.
        write_site_names(run_dir, {node: f"site-{pid}" for node, pid in partitions.items()})

    backend_config: dict[str, Any] = {"client_resources": engine.client_resources()}
    if not engine.ray_address:  # connected already otherwise: Flower then starts no Ray
        backend_config["init_args"] = {
            "address": "local",  # a private instance, even where RAY_ADDRESS names a cluster
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        }
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir, on_round, stop), daemon=True)
    watcher.start()
    # A private Ray's workers inherit the driver's environment; torch reads these at
    # import (a cluster's workers get them from connect()). The driver's own thread
    # count is pinned first, so only the actors change.
    import torch

    torch.set_num_threads(torch.get_num_threads())
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(engine.worker_env())
    try:
        with engine_internals.node_partitions(name_sites), engine_internals.site_nodes() as where:
            engine_internals.run_simulation(
                # The deployed ClientApp's code, with virtual sites: only this runner makes one.
                client_app=build_client_app(
                    SimulatedSites(str(run_dir), device=engine.site_device)
                ),
                server_app=server_app,
                sites=sites,
                run_config=cfg.to_flwr(),
                backend_config=backend_config,
                app_dir=str(APP_DIR),
                verbose=verbose,
            )
    except FedsiloError:
        raise
    except Exception as exc:  # the engine wraps ServerApp errors; surface ours
        cause = _fedsilo_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop.set()
        watcher.join()
        # The virtual sites' cached features and decoded data shares are derived from a
        # public dataset the run can re-read: drop them rather than leave ~100 MB a site.
        drop_cache(simulated_cache_dir(run_dir))
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise FedsiloError(
            f"The simulation ended without a summary; see the log above and {run_dir}."
        )
    summary: dict[str, Any] = json.loads(summary_file.read_text(encoding="utf-8"))
    summary["ray"] = cluster.placement_summary(engine, where.sites, where.addresses)
    RunDir(run_dir).write_summary(summary)
    return summary


def recorded_simulation(run_dir: Path, *, ray_address: str = "") -> tuple[int, EngineConfig]:
    """How many virtual sites the simulation in `run_dir` had, and the engine it used.

    A resumed run keeps the sites' resources, but may run on another Ray cluster
    (`ray_address`, "" for a private instance).
    """
    try:
        record = json.loads((run_dir / SIMULATION_FILE).read_text("utf-8"))
        sites = int(record["sites"])
        engine = EngineConfig.from_record(record, ray_address=ray_address)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"{run_dir} is not a run directory of `fedsilo simulate` (no {SIMULATION_FILE}); "
            "a deployed run resumes with `fedsilo server start --resume`."
        ) from None
    return sites, engine


def _watch(run_dir: Path, on_round: ProgressFn | None, stop: threading.Event) -> None:
    seen = 0
    while True:
        done = stop.wait(0.5)
        if on_round is not None:
            for record in read_metrics(run_dir)[seen:]:
                on_round(record)
                seen += 1
        if done:
            return


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
    from fedsilo.clients.dp_train import plan_run
    from fedsilo.server.evaluate import load_eval_data
    from fedsilo.task.builtin import task_for
    from fedsilo.task.train import check_trainable, resolve_device

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
    from fedsilo.simulations.partition import partition_indices
    from fedsilo.simulations.sites import SimulatedSites
    from fedsilo.task.builtin import task_for

    train = SimulatedSites(cfg.run_dir).pool(task_for(cfg), cfg.data_dir)
    parts = partition_indices(train.y.numpy(), sites, cfg.partition_spec, seed=cfg.seed)
    return [len(p) for p in parts]


def max_sample_rate(cfg: RunConfig, sites: int) -> float:
    """Distributed DP's dp-max-sample-rate for the simulated sites: the largest
    min(1, batch-size / examples) over them (the smallest site's)."""
    from fedsilo.task.train import sample_rate

    return max(sample_rate(n, cfg.batch_size) for n in partition_sizes(cfg, sites))
