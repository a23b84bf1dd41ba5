"""Flower's simulation engine, as fedsilo drives it (Flower internals; see the package).

`run_simulation` starts the in-process engine with ClientApp and ServerApp objects
built by fedsilo and a Run it describes, and sets the task identity a ServerApp
process sets. It reports the engine's mapping of node ids to partitions (fedsilo
names a virtual site by its partition, never by what its messages say), and starts
the ServerApp's work only once every node is registered; the engine looks for new
messages in one pass over them (`add_messages_to_queue`). `actor_pool_size` and
`site_nodes` read the Ray backend's actor pool: how many actors it makes on a
cluster, and which actor, so which Ray node, ran each virtual site. Flower's Ray
backend calls `ray.init` only when this process is not connected yet, and ends a run
with `ray.shutdown()`: a cluster fedsilo joined (`fedsilo simulate --ray-address`) is
left running, only disconnected.

This module imports Flower's simulation engine and Ray (about 0.8 s): the simulation
runner imports it only when it runs one, after `check_flower_version` (another Flower
would fail these imports without saying why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from queue import Queue
from typing import Any

import ray
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, pool_size_from_resources
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from fedsilo.flwr_adapter import check_flower_version

SWEEP_S = 0.1  # the engine's longest pause between two looks for new messages (Flower's)
# Its shortest: a look at an empty or small store costs microseconds, so the engine looks
# every SWEEP_MIN_S, or SWEEP_COST_RATIO times what the last look cost when that is more
# (10,000 pending messages: ~10 ms a look), never over SWEEP_S. Flower's fixed 0.1 s made
# each of a distributed-DP round's five exchanges wait 0.05 s on average before a site saw
# its message (a quarter of a simulated round, with the server's pull below).
SWEEP_MIN_S = 0.005
SWEEP_COST_RATIO = 10.0


def add_messages_to_queue(
    state: Any, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """flwr 1.39's `vce_api.add_messages_to_queue`, one pass over the messages a sweep.

    Flower's asks the link state for each node's next message in turn
    (`get_message_ins(node_id, limit=1)`), and each ask walks every stored message and
    checks its expiry: a sweep costs nodes x messages checks, a million at 1,000 sites
    (60% of the simulation driver's CPU there, py-spy) and 10^8 at 10,000. This walks
    the store once a sweep: every message checked once, as Flower checks it (expired
    ones are dropped), then each node's first undelivered message queued and marked
    delivered, in the nodes' order, as Flower's does. Other link states (none under
    `fedsilo simulate`) get Flower's own.
    """
    if not isinstance(state, InMemoryLinkState):
        vce_api_add_messages_to_queue(state, queue, nodes_mapping, f_stop)
        return
    order = list(nodes_mapping)
    while not f_stop.is_set():
        t0 = time.monotonic()
        for msg in next_messages(state, order):
            queue.put(msg)
        f_stop.wait(sweep_wait(time.monotonic() - t0))


def sweep_wait(look_s: float) -> float:
    """The engine's pause after a look for new messages that took `look_s`."""
    return min(SWEEP_S, max(SWEEP_MIN_S, SWEEP_COST_RATIO * look_s))


def next_messages(state: InMemoryLinkState, nodes: Iterable[int]) -> list[Message]:
    """Each of `nodes`' first undelivered message in `state`, marked delivered."""
    first: dict[int, Message] = {}
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))  # drops expired ones
        for msg in state.message_ins_store.values():
            meta = msg.metadata
            if meta.delivered_at == "" and meta.dst_node_id not in first:
                first[meta.dst_node_id] = msg
        found = [first[node] for node in nodes if node in first]
        delivered_at = now().isoformat()
        for msg in found:
            msg.metadata.delivered_at = delivered_at
    return found


vce_api_add_messages_to_queue = vce_api.add_messages_to_queue  # Flower's own


def actor_pool_size(client_resources: dict[str, float]) -> int:
    """How many site actors Flower's Ray backend will make on the connected cluster.

    Flower sizes its pool from every alive node's total CPUs and GPUs over
    `client_resources`, node by node (`ray_actor.pool_size_from_resources`); 0 when no
    node can hold one (Flower then stops the run with a ValueError of its own).
    """
    check_flower_version()
    try:
        return int(pool_size_from_resources(dict(client_resources)))
    except ValueError:
        return 0


@dataclasses.dataclass
class SiteNodes:
    """Where the engine ran each virtual site: filled in by the time the engine returns."""

    sites: dict[int, set[str]] = dataclasses.field(default_factory=dict)  # partition -> node ids
    addresses: dict[str, str] = dataclasses.field(default_factory=dict)  # node id -> its IP


@contextlib.contextmanager
def site_nodes(query_timeout_s: float = 30.0) -> Iterator[SiteNodes]:
    """Yield the Ray node(s) each virtual site (partition) ran on, once the engine returns.

    Flower's Ray backend gives each message to whichever actor of its pool is idle
    (`BasicActorPool.submit` pops one and calls `actor_fn(actor, ...)` with it, the
    partition id as `cid`). Here each actor is asked for its node once, when the pool
    makes it (Ray's built-in `__ray_call__`, queued before any message; Ray 2.55.1,
    pinned by flwr 1.39), `submit` notes which actor ran which partition, and the
    answers are read just before the backend terminates its actors and disconnects.
    """
    check_flower_version()
    placed = SiteNodes()
    ran: dict[int, set[Any]] = {}  # partition id -> actor handles
    asked: dict[Any, Any] = {}  # actor handle -> ObjectRef of its node id
    lock = threading.Lock()  # the engine submits from one thread per actor
    real_add, real_submit = BasicActorPool.add_actors_to_pool, BasicActorPool.submit
    real_terminate = RayBackend.terminate

    def add_actors_to_pool(self: Any, num_actors: int) -> None:
        real_add(self, num_actors)
        for actor in self.pool:
            if actor not in asked:
                asked[actor] = actor.__ray_call__.remote(_actor_node)

    def submit(self: Any, actor_fn: Any, job: Any) -> Any:
        partition = int(job[2])

        def traced(actor: Any, *args: Any) -> Any:
            with lock:
                ran.setdefault(partition, set()).add(actor)
            return actor_fn(actor, *args)

        return real_submit(self, traced, job)

    def terminate(self: Any) -> None:
        try:
            used = {actor for actors in ran.values() for actor in actors if actor in asked}
            refs = {actor: asked[actor] for actor in used}
            if refs:
                ready, _ = ray.wait(
                    list(refs.values()), num_returns=len(refs), timeout=query_timeout_s
                )
                nodes = {}
                for actor, ref in refs.items():
                    with contextlib.suppress(Exception):  # a dead actor ran nothing more
                        if ref in ready:
                            nodes[actor] = str(ray.get(ref))
                for partition, actors in ran.items():
                    placed.sites[partition] = {nodes[a] for a in actors if a in nodes}
                for node in ray.nodes():  # type: ignore[no-untyped-call]
                    placed.addresses[node["NodeID"]] = node["NodeManagerAddress"]
        except Exception as exc:  # a report only: never fail a finished run over it
            logging.getLogger("fedsilo.simulation").warning("site_nodes: %s", exc)
        finally:
            real_terminate(self)

    BasicActorPool.add_actors_to_pool = add_actors_to_pool  # type: ignore[method-assign]
    BasicActorPool.submit = submit  # type: ignore[method-assign]
    RayBackend.terminate = terminate  # type: ignore[method-assign]
    try:
        yield placed
    finally:
        BasicActorPool.add_actors_to_pool = real_add  # type: ignore[method-assign]
        BasicActorPool.submit = real_submit  # type: ignore[method-assign]
        RayBackend.terminate = real_terminate  # type: ignore[method-assign]


def _actor_node(actor: Any) -> str:
    """Run inside an actor by `__ray_call__`: the id of the Ray node it lives on."""
    return str(ray.get_runtime_context().get_node_id())


def run_simulation(
    *,
    client_app: Any,
    server_app: Any,
    sites: int,
    run_config: dict[str, Any],
    backend_config: dict[str, Any],
    app_dir: str,
    verbose: bool,
    on_register: Callable[[dict[int, int]], None] = lambda _: None,
) -> None:
    """Run a ServerApp and ClientApp on Flower's simulation engine, in this process.

    Does what flwr 1.39's own `run_simulation` does for the in-process engine, plus
    what `flwr run` does for an app: the run config reaches sites fused with the
    manifest in `app_dir` (without `is_app` they would get none). `on_register({node
    id: partition id})` is called once the engine has made its nodes, before
    `server_app` starts.

    flwr 1.39's `_main_loop` starts the ServerApp's thread first and registers the
    nodes after it (`vce_api._register_nodes` in `start_vce`). A strategy that
    sampled before then would see fewer sites for the whole round: FedAvg sizes its
    sample from the nodes it first sees (at least `min_train_nodes`), then waits
    for that many. Here the ServerApp waits for the registration to end.
    """
    check_flower_version()
    registered = threading.Event()
    made: list[dict[int, int]] = []  # the mapping, once the nodes are made and reported
    real_register = vce_api._register_nodes

    def register(*args: Any, **kwargs: Any) -> dict[int, int]:
        try:
            mapping: dict[int, int] = real_register(*args, **kwargs)
            on_register(dict(mapping))
            made.append(mapping)
            return mapping
        finally:
            registered.set()  # also on failure: the engine's error is the one to report

    gated = ServerApp()

    @gated.main()
    def _after_registration(grid: Grid, context: Context) -> None:
        registered.wait()
        if made:  # else the engine failed to make its nodes and says why
            server_app(grid=grid, context=context)

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
    vce_api._register_nodes = register
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        _run_simulation(
            num_supernodes=sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=gated,
            backend_name="ray",
            backend_config=backend_config,
            server_app_context=context,
            app_dir=app_dir,
            run=run,
            is_app=True,
            verbose_logging=verbose,
        )
    finally:
        vce_api._register_nodes = real_register
        vce_api.add_messages_to_queue = vce_api_add_messages_to_queue
        registered.set()  # a ServerApp thread still waiting (the engine never got there)
