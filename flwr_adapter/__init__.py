"""Every Flower internal fedsilo depends on, in one package, behind a version check.

fedsilo uses Flower's public API everywhere else. What it needs beyond that lives here,
and nowhere else:
- this module: the version check (`check_flower_version` refuses any Flower but the
  one these internals were read in, with a message that says so, before anything
  else runs), Flower's telemetry switched off, and faster object pulls (below);
- `engine`: the in-process simulation engine (`_run_simulation` started with fedsilo's
  ClientApp and ServerApp objects and a Run it describes), its node-to-partition map
  and its Ray actor pool;
- `site_runtime`: a deployed site's warm runtime (`python -m
  fedsilo.flwr_adapter.site_runtime supernode ARGS...`, what `fedsilo client start`
  runs instead of `flower-supernode ARGS...`);
- `superlink`: the server's SuperLink with message contents in memory, its link state
  in `--database`, and that state's run status and expired-task sweep asked at most
  twice a second (`python -m fedsilo.flwr_adapter.superlink ARGS...`, what `fedsilo
  server start` runs instead of `flower-superlink ARGS...`);
- `control`: the SuperLink's node list asked in-process through the Control API (what
  `flwr supernode ls` does in a new process each time);
- `arrays`: a record's arrays read in place from the .npy bytes Flower keeps them in
  (`tensor_views`: the server's global model and aggregate, the model a site receives).

These are private to Flower and may change in any release. The package imports nothing
of fedsilo but `errors`, so every layer may use it (tests/test_layers.py).

Object pulls: every object pull (the SuperNode's of a message from the SuperLink, the
ClientApp's from its SuperNode, the ServerApp's of a reply) retries an object that is
not there yet after PULL_BACKOFF_S, doubling to PULL_BACKOFF_CAP_S, instead of after
1 s doubling to 10 s: a message's content is uploaded just after the message, so the
first try often misses it and stock Flower then waits a whole second (measured:
0.9-1.2 s of a pull of 12 objects that otherwise takes 0.2 s), at each of the three.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError

SUPPORTED = "1.39."  # the release whose internals this module was written against


def check_flower_version(version: str | None = None) -> None:
    """Raise ConfigError unless the installed (or given) Flower is the supported release."""
    if version is None:
        import flwr  # lazy: `fedsilo --help` imports this package; flwr takes 0.1 s of it

        version = flwr.__version__
    if not version.startswith(SUPPORTED):
        raise ConfigError(
            f"fedsilo needs Flower {SUPPORTED}x (it depends on internals of that release, "
            f"fedsilo/flwr_adapter/); found flwr {version}. Install a supported one: "
            "pip install 'flwr[simulation]>=1.39,<1.40'."
        )


TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0"}


def disable_telemetry() -> None:
    """Turn Flower's telemetry off in this process and every process it starts.

    Flower posts usage events (a persistent machine id, the OS, Python and CPU count,
    and each run's start and end) to its telemetry service from every SuperLink,
    SuperNode, ServerApp and ClientApp unless FLWR_TELEMETRY_ENABLED=0. A site must not
    talk to anyone but its federation, so fedsilo sets it in its own process (read by
    Flower when its telemetry module is first imported, or patched if it already was)
    and `fedsilo.processes.child_env` passes it to every child.
    """
    os.environ.update(TELEMETRY_OFF)
    loaded = sys.modules.get("flwr.supercore.telemetry")
    if loaded is not None:
        vars(loaded)["FLWR_TELEMETRY_ENABLED"] = "0"


# Polls for what another process will send (a SuperNode's pulls of its next message, its
# SuperExec's of a task, the ServerApp's of replies): a tenth of the time waited so far
# since something last came, between POLL_S and POLL_CAP_S. What comes is noticed at
# most 10% (and at most 1 s) late, and a wait of t seconds costs about 10 + 10 ln(t/1 s)
# polls instead of 10 t: a site waiting 20 s for a dead one to be noticed asks ~40 times,
# not 200 (each ask is an RPC that costs the asker and the SuperLink a few ms of CPU).
POLL_S = 0.1
POLL_CAP_S = 1.0
# A simulation's ServerApp pulls from the engine's in-memory link state in its own
# process, not over an RPC: microseconds while few replies are pending, so it polls from
# SIM_POLL_S (the caller keeps a pull's cost under a tenth of the wait).
SIM_POLL_S = 0.005


def poll_wait(waited_s: float, floor_s: float = POLL_S) -> float:
    """Seconds to wait before the next poll, `waited_s` after something last came;
    at least `floor_s` (POLL_S across processes, SIM_POLL_S in a simulation)."""
    return min(POLL_CAP_S, max(floor_s, 0.1 * waited_s))


PULL_BACKOFF_S = 0.05  # an object pull's first retry (Flower: 1 s) ...
PULL_BACKOFF_CAP_S = 0.5  # ... and its longest wait between retries (Flower: 10 s)


def fast_object_pulls() -> None:
    """Make this process's object pulls retry after PULL_BACKOFF_S, not 1 s (see above).

    Flower binds the backoff as keyword defaults of its two pull functions, which
    every caller uses; the pull's overall time limit and tries are unchanged.
    """
    from flwr.supercore.inflatable import inflatable_utils  # lazy: as flwr above (0.08 s)

    check_flower_version()
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if not defaults or not {"initial_backoff", "backoff_cap"} <= set(defaults):
            raise ConfigError(  # Flower changed: fail here, not with slow rounds
                f"flwr {SUPPORTED}x's {fn.__name__} has no initial_backoff/backoff_cap "
                "keyword defaults; fedsilo/flwr_adapter/ needs updating."
            )
        defaults.update(initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)


def in_simulation_actor() -> bool:
    """Whether this process is a Ray actor of Flower's simulation engine: where `flwr run`
    (and `fedsilo simulate`) run ClientApps. A deployed SuperNode's `flwr-clientapp`
    never is: it does not start Ray."""
    ray = sys.modules.get("ray")  # never imported here: only a Ray worker has it loaded
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # another Ray, or none usable: not an actor we know
        return False


def flwr_home() -> Path:
    """Flower's user folder: $FLWR_HOME, else ~/.flwr (as flwr.supercore.utils says)."""
    home = os.environ.get("FLWR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".flwr"


def is_simulation_grid(grid: object) -> bool:
    """Whether a ServerApp's grid is the simulation engine's (in memory), not a
    deployed SuperLink's."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    check_flower_version()
    return isinstance(grid, InMemoryGrid)


def node_sessions(grid: Any) -> dict[int, str]:
    """When each node's current session began, by node id: the SuperLink's
    `last_activated_at` of every node it knows (`Grid.get_nodes`, flwr 1.39's NodeInfo).

    A node whose value changed was restarted. Flower never delivers a message again, so
    a message its previous session pulled is never answered, and the SuperLink reports
    it unavailable only while the node is offline, which a quick restart may end before
    the next pull.
    """
    check_flower_version()
    return {int(node.node_id): str(node.last_activated_at) for node in grid.get_nodes()}


ENGINE_START_S = 120.0  # the longest a `flwr run` ServerApp waits for Ray to start


def wait_for_simulation_engine(timeout_s: float = ENGINE_START_S) -> bool:
    """Wait until this process's simulation engine is up (Ray initialised); False when
    it is not within `timeout_s`, or this process runs none.

    flwr 1.39's `flwr-simulation` starts the ServerApp's thread, then registers the
    nodes, then starts Ray on its main thread: `ray.init` forks its daemons with Python
    code run in each child before its exec (Ray's `preexec_fn`). A ServerApp that loaded
    data, wrote files and calibrated noise meanwhile hung once (CI, 2026-12-07: `flwr
    run .` stuck before its first round, between writing its data cache and its sites'
    policies; the cause was not pinned down). That began when its work moved into
    Ray's start (it used to run first); its work now waits until Ray is up. Ray is never
    imported here: Flower's backend imports it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        ray = sys.modules.get("ray")
        is_initialized = getattr(ray, "is_initialized", None)
        if is_initialized is not None and is_initialized():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


SETTLE_S = 0.5  # how long a simulation's node count must hold still to be taken as final


def settled_node_ids(
    grid: Any, *, settle_s: float = SETTLE_S, timeout_s: float = 60.0
) -> list[int]:
    """A simulation grid's node ids once the engine has registered them all.

    flwr 1.39 starts the ServerApp's thread before its simulation engine registers the
    nodes (`_main_loop`: the thread, then `vce_api._register_nodes`, one node at a
    time), so a ServerApp that counts the nodes first may see fewer, or none. Under
    `fedsilo simulate` the ServerApp starts only after the registration
    (fedsilo.flwr_adapter.engine); under `flwr run`, which fedsilo does not start, this
    waits until the count is above 0 and unchanged for `settle_s` (the registration is
    one loop, done in milliseconds). Raises TimeoutError after `timeout_s` with no nodes.
    """
    deadline = time.monotonic() + timeout_s
    seen = sorted(grid.get_node_ids())
    since = time.monotonic()
    while True:
        time.sleep(0.05)
        now_seen = sorted(grid.get_node_ids())
        now = time.monotonic()
        if now_seen != seen:
            seen, since = now_seen, now
        elif seen and now - since >= settle_s:
            return seen
        if now > deadline:
            raise TimeoutError(f"the simulation engine registered no node in {timeout_s:.0f} s")
