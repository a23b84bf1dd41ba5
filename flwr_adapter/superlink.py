"""The server's SuperLink: `flower-superlink` with message contents kept in memory.

`python -m fedsilo.flwr_adapter.superlink ARGS...` is what `fedsilo server start` runs
instead of `flower-superlink ARGS...`: the same SuperLink, with one change. With a
`--database` file, flwr 1.39 keeps both its link state (registered nodes, runs,
messages) and its object store (every message's content: the model and each site's
update, in 5 MB chunks) in that SQLite file (`config_loader.
get_objectstore_linkstate_factories` builds both from `--database`). Each chunk a
process pushes was written to the file, read back when pulled and deleted: measured on
a 17 M-parameter model (68 MB, 2 sites), about 3 s of SuperLink CPU a round, on the
round's critical path.

fedsilo needs the file only for the link state: sites are registered on a staging
SuperLink whose state the real one reopens (fedsilo.server.launcher). Contents never
outlive the SuperLink: a resumed run starts a new SuperLink on a fresh database. So
here the object store is Flower's in-memory one (`InMemoryObjectStore`, the store of
a SuperLink without a database), and the link state stays in the file.

It also asks its database less often (`fewer_state_checks`). Flower checks the run's
status before every object a site pushes or pulls (a model or an update is a dozen
objects or more), and every such check first sweeps the task table for expired
heartbeats (two UPDATEs and a commit). A timeline of a deployed 2-site digits round
showed these SQL calls as half the SuperLink's time on sites' objects, on the round's
critical path. Here the sweep runs at most once every STATE_CHECK_S, and a run found
running is taken as running for STATE_CHECK_S: a run that stops is seen stopped at
most that much later. Nothing about who may push or pull changes: the task tokens'
own expiry, the push sessions' claims and the nodes' signatures are checked on every
request as before.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter import SUPPORTED, check_flower_version, disable_telemetry


def in_memory_object_store() -> None:
    """Make this process's SuperLink keep message contents in memory (see above)."""
    check_flower_version()
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import config_loader

    if not isinstance(getattr(config_loader, "ObjectStoreFactory", None), type):
        raise ConfigError(  # Flower changed: fail here, not with a slow or broken SuperLink
            f"flwr {SUPPORTED}x's superlink.config_loader builds no ObjectStoreFactory; "
            "fedsilo/flwr_adapter/superlink.py needs updating."
        )

    def in_memory(database: str) -> ObjectStoreFactory:
        return ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)

    config_loader.ObjectStoreFactory = in_memory  # type: ignore[attr-defined,assignment]


STATE_CHECK_S = 0.5  # how stale a run's "running" or the expired-heartbeat sweep may be


def fewer_state_checks(clock: Any = time.monotonic) -> None:
    """Make this process's SuperLink sweep expired tasks and re-read a running run's
    status at most once every STATE_CHECK_S (see above)."""
    check_flower_version()
    from flwr.server.superlink.fleet.message_handler import message_handler
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweep = getattr(SqlCoreState, "_cleanup_expired_task_tokens", None)
    check_abort = getattr(message_handler, "check_abort", None)
    if not (callable(sweep) and callable(check_abort)):
        raise ConfigError(  # Flower changed: fail here, not with a slow or broken SuperLink
            f"flwr {SUPPORTED}x's SqlCoreState._cleanup_expired_task_tokens or fleet "
            "message_handler.check_abort is gone; fedsilo/flwr_adapter/superlink.py "
            "needs updating."
        )
    swept: dict[int, float] = {}  # id(state) -> when it last swept

    def sweep_at_most_every(state: Any) -> None:
        now = clock()
        if now - swept.get(id(state), -STATE_CHECK_S) >= STATE_CHECK_S:
            swept[id(state)] = now
            sweep(state)

    running: dict[tuple[int, tuple[str, ...]], float] = {}  # checks found running, when

    def check_abort_at_most_every(run_id: int, abort_status_list: list[str], state: Any) -> Any:
        key, now = (run_id, tuple(abort_status_list)), clock()
        if now - running.get(key, -STATE_CHECK_S) < STATE_CHECK_S:
            return None  # running STATE_CHECK_S ago or less
        verdict = check_abort(run_id, abort_status_list, state)
        if verdict is None:
            running[key] = now
        else:  # an abort is never remembered: every request sees it
            running.pop(key, None)
        return verdict

    SqlCoreState._cleanup_expired_task_tokens = sweep_at_most_every  # type: ignore[method-assign,assignment]
    message_handler.check_abort = check_abort_at_most_every  # type: ignore[attr-defined]


def main() -> None:
    disable_telemetry()
    in_memory_object_store()
    fewer_state_checks()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
