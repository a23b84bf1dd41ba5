"""Run a federation of virtual sites on Flower's simulation engine (Ray backend).

The ServerApp and ClientApp are the deployment ones, unchanged: each virtual
site gets Flower's `partition-id`/`num-partitions` node config and loads its
share of the dataset; the run config reaches server and sites the same way it
does under `flwr run`. Each virtual site's policy and privacy ledger live in
RUN_DIR/ledgers/ (fedsilo.simulations.ledgers), written here before the engine
starts. Progress is read from RUN_DIR/metrics.jsonl, the same record a deployed
server writes.
"""

from __future__ import annotations

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

log = logging.getLogger("fedsilo.simulation")
APP_DIR = Path(__file__).resolve().parent.parent  # the fedsilo package: holds pyproject.toml
ProgressFn = Callable[[dict[str, Any]], None]
# Each virtual site is a Ray actor holding one CPU and running torch on one thread.
# Without this torch gives every actor as many threads as the machine has cores, and
# on 2 cores two actors x 2 threads ran the CNN's DP step ~4x slower than 2 x 1
# (bench/federation_overhead.py; OpenMP threads spin-waiting on each other).
SITE_THREADS = 1
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SIMULATION_FILE = "simulation.json"  # {"sites": N}: what --resume needs beyond config.json


def run_simulation(
    cfg: RunConfig,
    *,
    sites: int,
    on_round: ProgressFn | None = None,
    verbose: bool = False,
    site_policies: Sequence[SitePolicy] | None = None,
) -> dict[str, Any]:
    """Simulate `sites` virtual sites for `cfg.rounds` rounds; return summary.json's object.

    `site_policies[i]` is virtual site i's own policy (default: a budget of the run's
    target epsilon at its delta). Ledgers already in RUN_DIR/ledgers keep their spend.
    """
    from fedsilo import flwr_adapter
    from fedsilo.clients.client_app import build_client_app
    from fedsilo.server.run_dir import write_site_names
    from fedsilo.server.server_app import app as server_app
    from fedsilo.simulations.ledgers import write_site_policies
    from fedsilo.simulations.sites import SimulatedSites, simulated_cache_dir
    from fedsilo.task.features import drop_cache

    flwr_adapter.check_flower_version()
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:  # a resumed run's sites keep the policies their ledgers hold
        if site_policies is None:
            default = SitePolicy(max_epsilon=cfg.target_epsilon, delta=cfg.target_delta)
            site_policies = [default] * sites
        if len(site_policies) != sites:
            raise ConfigError(f"{len(site_policies)} site policies for {sites} sites.")
        write_site_policies(run_dir, site_policies)
        (run_dir / SIMULATION_FILE).write_text(json.dumps({"sites": sites}) + "\n", "utf-8")

    def name_sites(partitions: dict[int, int]) -> None:
        # A virtual site's name is its partition's, as the engine assigned it: the
        # ServerApp reads it from here, never from what a site's messages say.
        write_site_names(run_dir, {node: f"site-{pid}" for node, pid in partitions.items()})

    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": SITE_THREADS, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray tip
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir, on_round, stop), daemon=True)
    watcher.start()
    # Ray's workers inherit the driver's environment; torch reads these at import.
    # The driver's own thread count is pinned first, so only the actors change.
    import torch

    torch.set_num_threads(torch.get_num_threads())
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(SITE_THREADS) for k in THREAD_VARS})
    try:
        with flwr_adapter.node_partitions(name_sites):
            flwr_adapter.run_simulation(
                # The deployed ClientApp's code, with virtual sites: only this runner makes one.
                client_app=build_client_app(SimulatedSites(str(run_dir))),
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
    return summary


def recorded_sites(run_dir: Path) -> int:
    """How many virtual sites the simulation in `run_dir` had."""
    try:
        sites = int(json.loads((run_dir / SIMULATION_FILE).read_text("utf-8"))["sites"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{run_dir} is not a run directory of `fedsilo simulate` (no {SIMULATION_FILE}); "
            "a deployed run resumes with `fedsilo server start --resume`."
        ) from None
    return sites


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
    test splits, partitions them and calibrates the noise for the smallest site, so a
    bad task, bad data, impossible splits and unreachable budgets fail fast.
    """
    from fedsilo.clients.dp_train import plan_run
    from fedsilo.server.evaluate import load_eval_data
    from fedsilo.simulations.partition import partition_indices
    from fedsilo.task.builtin import task_for
    from fedsilo.task.train import check_trainable, resolve_device

    resolve_device(cfg.device)
    task = task_for(cfg)
    check_trainable(task, seed=cfg.seed)
    train = task.public("train", cfg.data_dir)
    load_eval_data(cfg, cfg.eval_data)
    parts = partition_indices(train.y.numpy(), sites, cfg.partition_spec, seed=cfg.seed)
    sizes = [len(p) for p in parts]
    plan_run(cfg, min(sizes), prior=[])
    return sizes, task.name
