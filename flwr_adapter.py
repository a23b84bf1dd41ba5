"""Every Flower internal fedsilo depends on, in one place, behind a version check.

fedsilo uses Flower's public API everywhere else. What it needs beyond that is here:
the in-process simulation entry point (`_run_simulation`, which starts the engine
with ClientApp and ServerApp objects built by fedsilo and a Run it describes), the
task identity a ServerApp process sets, and the simulation engine's mapping of node
ids to partitions (fedsilo names a virtual site by its partition, never by what its
messages say). These are private to Flower and may change in any release, so
`check_flower_version` refuses any Flower but the one they were read in, with a
message that says so, before anything else runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from fedsilo.errors import ConfigError

SUPPORTED = "1.39."  # the release whose internals this module was written against


def check_flower_version(version: str | None = None) -> None:
    """Raise ConfigError unless the installed (or given) Flower is the supported release."""
    if version is None:
        import flwr

        version = flwr.__version__
    if not version.startswith(SUPPORTED):
        raise ConfigError(
            f"fedsilo needs Flower {SUPPORTED}x (it depends on internals of that release, "
            f"fedsilo/flwr_adapter.py); found flwr {version}. Install a supported one: "
            "pip install 'flwr[simulation]>=1.39,<1.40'."
        )


@contextlib.contextmanager
def node_partitions(on_register: Callable[[dict[int, int]], None]) -> Iterator[None]:
    """Call `on_register({node id: partition id})` when the simulation engine makes its nodes."""
    from flwr.server.superlink.fleet.vce import vce_api

    check_flower_version()
    real = vce_api._register_nodes

    def register(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping: dict[int, int] = real(*args, **kwargs)
        on_register(dict(mapping))
        return mapping

    vce_api._register_nodes = register
    try:
        yield
    finally:
        vce_api._register_nodes = real


def run_simulation(
    *,
    client_app: Any,
    server_app: Any,
    sites: int,
    run_config: dict[str, Any],
    backend_config: dict[str, Any],
    app_dir: str,
    verbose: bool,
) -> None:
    """Run a ServerApp and ClientApp on Flower's simulation engine, in this process.

    Does what flwr 1.39's own `run_simulation` does for the in-process engine, plus
    what `flwr run` does for an app: the run config reaches sites fused with the
    manifest in `app_dir` (without `is_app` they would get none).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    check_flower_version()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.override_config = dict(run_config)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    _run_simulation(
        num_supernodes=sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=app_dir,
        run=run,
        is_app=True,
        verbose_logging=verbose,
    )
