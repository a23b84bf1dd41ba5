"""`flwr run .`: fedsilo's simulation on Flower's own local simulation runtime.

The repository's pyproject.toml is a Flower app manifest, and a Flower user's first
command in a fresh clone is `flwr run .`. Its components are the two apps here: the
deployed ServerApp (fedsilo.server.server_app) and ClientApp (fedsilo.clients.client_app)
with virtual sites, as `fedsilo simulate` runs them (fedsilo.simulations.sites). A
deployed federation never runs these: `fedsilo server start` sends sites a manifest that
names the deployment apps (fedsilo.server.launcher.write_app_dir).

- The run directory is the run config's `run-dir` (absolute: the apps run in processes
  whose working folder is the local SuperLink's), else
  $FLWR_HOME/fedsilo-runs/<Flower run id>; both apps derive it alike.
- Before round 1 the ServerApp plays each virtual site's operator, as `fedsilo
  simulate` does: a policy at the head of each site's ledger (a budget of the run's
  target epsilon at its delta), simulation.json (so `fedsilo resume` can go on), and
  with distributed DP the sites' identities. Its log names the run directory:
  `fedsilo audit RUN_DIR` verifies what each site spent.
- Site N is the node Flower gives `partition-id` N; each records its node id in
  sites.json itself (the engine's own map is not reachable from `flwr run`'s apps),
  which the ServerApp reads to name sites in its records.
- The ClientApp resolves a site only inside a Ray actor of Flower's simulation engine
  (fedsilo.flwr_adapter.in_simulation_actor): sent to a deployed SuperNode, it refuses
  (it would train on public data with randomness seeded by the run config). The
  ServerApp refuses any grid but the simulation's, with the command to use instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsilo import flwr_adapter
from fedsilo.clients.client_app import train
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.server.records import RoundRecord
from fedsilo.server.run_dir import add_site_name, read_metrics, write_online
from fedsilo.server.server_app import main as server_main
from fedsilo.simulations.engine import EngineConfig
from fedsilo.simulations.runner import preflight, prepare_sites, watching
from fedsilo.simulations.sites import SimulatedSites, simulated_cache_dir
from fedsilo.task.features import drop_cache

log = logging.getLogger("fedsilo.server")
RUNS_FOLDER = "fedsilo-runs"  # under $FLWR_HOME
NOT_DEPLOYED = (
    "`flwr run .` runs fedsilo's simulation on Flower's local simulation runtime; a "
    "deployed federation starts its runs with `fedsilo server start` (docs/operators.md)."
)


def flwr_run_dir(cfg: RunConfig, run_id: int) -> Path:
    """The run directory of a `flwr run` run: `run-dir`, else one per Flower run id."""
    if cfg.run_dir:
        path = Path(cfg.run_dir).expanduser()
        if not path.is_absolute():
            raise ConfigError(
                f"Under `flwr run`, `run-dir` must be an absolute path (got {cfg.run_dir!r}): "
                "the apps run in the local SuperLink's processes, not in your folder. "
                f"Leave it out for {flwr_adapter.flwr_home() / RUNS_FOLDER}/<run id>."
            )
        return path
    return flwr_adapter.flwr_home() / RUNS_FOLDER / str(run_id)


serverapp = ServerApp()


@serverapp.main()
def _serve(grid: Grid, context: Context) -> None:
    if not flwr_adapter.is_simulation_grid(grid):
        raise ConfigError(NOT_DEPLOYED)
    cfg = RunConfig.from_flwr(context.run_config)
    run_dir = flwr_run_dir(cfg, context.run_id)
    if not flwr_adapter.wait_for_simulation_engine():
        log.warning(
            "fedsilo: Ray had not started after %.0f s; starting anyway",
            flwr_adapter.ENGINE_START_S,
        )
    sites = len(flwr_adapter.settled_node_ids(grid))  # the engine registers them after we start
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        preflight(cfg, sites)  # a bad task, split or budget fails before any site trains
    prepare_sites(cfg, EngineConfig(), sites, None)
    write_online(run_dir, sites)  # every virtual site, for the whole run
    log.setLevel(logging.INFO)  # `flwr run --stream` and `flwr log` show fedsilo's lines
    log.info(
        "fedsilo: %d virtual sites, %d rounds; run directory %s (audit the sites' spend: "
        "`fedsilo audit %s`)", sites, cfg.rounds, run_dir, run_dir,
    )  # fmt: skip
    context.run_config["run-dir"] = str(run_dir)
    # A resumed run's earlier rounds were told before.
    with watching(run_dir, _log_round, seen=len(read_metrics(run_dir))):
        try:
            server_main(grid, context)
        finally:
            # Derived from a public dataset the run can re-read: not left behind (~100 MB
            # a site).
            drop_cache(simulated_cache_dir(run_dir))


def _log_round(record: RoundRecord) -> None:
    """One log line per round, as it lands in RUN_DIR/metrics.jsonl."""
    absent = record.failed + record.refused
    log.info(
        "fedsilo: round %d: accuracy %.4f, loss %.4f, max site epsilon %.3f, sites %s%s",
        record.round, record.accuracy, record.loss, record.max_epsilon,
        ", ".join(record.sites) or "none",
        f" (absent: {', '.join(absent)})" if absent else "",
    )  # fmt: skip


def train_virtual_site(msg: Message, context: Context) -> Message:
    """The ClientApp's train handler: the deployed one, at virtual site `partition-id`."""

    def resolve(cfg: RunConfig, node_config: Mapping[str, object]) -> SiteEnvironment:
        if not flwr_adapter.in_simulation_actor():
            raise ConfigError(
                "This ClientApp serves `flwr run .` simulations only; a deployed site runs "
                "`fedsilo client start`, whose server sends the deployment apps."
            )
        run_dir = flwr_run_dir(cfg, context.run_id)
        site = SimulatedSites(str(run_dir))(cfg, node_config)
        add_site_name(run_dir, context.node_id, site.name)
        return site

    return train(msg, context, resolve)


clientapp = ClientApp()
clientapp.train()(train_virtual_site)
