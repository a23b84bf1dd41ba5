"""Flower internals sit behind one version check."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import flwr
import pytest
from flwr.app import Context

from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter import check_flower_version


def test_the_installed_flower_is_supported() -> None:
    check_flower_version()
    assert flwr.__version__.startswith("1.39.")


@pytest.mark.parametrize("version", ["1.40.0", "1.38.2", "2.0.0"])
def test_another_flower_fails_in_one_place_with_a_clear_message(version: str) -> None:
    with pytest.raises(ConfigError, match=f"found flwr {version}") as err:
        check_flower_version(version)
    assert "flwr_adapter/" in str(err.value) and "<1.40" in str(err.value)


def test_the_warm_supernode_waits_briefly_where_flower_sleeps_3_s() -> None:
    import time

    from fedsilo.flwr_adapter import POLL_S
    from fedsilo.flwr_adapter.site_runtime import _CappedTime

    capped = _CappedTime()
    t0 = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - t0 < POLL_S + 0.2
    assert capped.monotonic is time.monotonic  # everything else is the real module


def test_polls_wait_a_tenth_of_the_wait_so_far_between_100_ms_and_1_s() -> None:
    from fedsilo.flwr_adapter import poll_wait

    assert [poll_wait(t) for t in (0, 0.5, 1, 2.5, 5, 10, 20, 3600)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.25, 0.5, 1.0, 1.0, 1.0]
    )
    # a 20 s wait (a dead site being noticed) takes ~40 polls instead of 200 at 0.1 s
    t, polls = 0.0, 0
    while t < 20:
        t += poll_wait(t)
        polls += 1
    assert 35 <= polls <= 45, polls


def test_a_simulation_polls_its_in_memory_state_from_5_ms_within_its_look_cost() -> None:
    """In a simulation both sides of an exchange look at memory in one process: the
    ServerApp pulls from SIM_POLL_S and the engine sweeps from SWEEP_MIN_S, a tenth of
    the time at most spent looking, never slower than Flower's 0.1 s."""
    from fedsilo.flwr_adapter import SIM_POLL_S, poll_wait
    from fedsilo.flwr_adapter.engine import SWEEP_S, sweep_wait

    assert poll_wait(0.0, SIM_POLL_S) == SIM_POLL_S == 0.005
    assert poll_wait(0.5, SIM_POLL_S) == pytest.approx(0.05)
    assert poll_wait(3600, SIM_POLL_S) == 1.0
    assert sweep_wait(1e-6) == 0.005  # an empty store: look again in 5 ms
    assert sweep_wait(0.004) == pytest.approx(0.04)  # 10,000 messages: 10x the look
    assert sweep_wait(0.5) == SWEEP_S == 0.1


def test_an_idle_supernode_asks_the_superlink_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idle pulls wait a tenth of the time since the last message (at least 0.1 s, at
    most 1 s). A site's own-state waits stay short either way."""

    from fedsilo.flwr_adapter import site_runtime as rt

    slept: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(rt.time, "sleep", slept.append)
    monkeypatch.setattr(rt.time, "monotonic", lambda: clock[0])
    capped = rt._CappedTime()
    capped.sleep(3)  # just started: as busy
    clock[0] += 5
    capped.sleep(3)  # idle 5 s
    clock[0] += 25
    capped.sleep(3)  # idle 30 s
    capped.sleep(0.5)  # waiting on its own ClientApp's reply
    assert capped.pulled(None) is None  # a pull that found nothing changes nothing
    capped.sleep(3)
    assert capped.pulled(42) == 42  # a message: busy again
    capped.sleep(3)
    assert slept == pytest.approx([0.1, 0.5, 1.0, 0.1, 1.0, 0.1])


def test_the_superexec_poll_interval_is_the_one_flower_reads() -> None:
    """site_runtime sets it to IDLE_PULL_S (the clock's backoff branch) and replaces the
    loop's `time` with the clock that a launched task makes busy again."""
    from flwr.supercore.superexec import run_superexec as rs

    from fedsilo.flwr_adapter import site_runtime as rt

    assert rs._TASK_POLL_INTERVAL_ENV == "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
    assert rs.time is __import__("time") and rt.IDLE_PULL_S >= 1.0


ZYGOTE_SCRIPT = """
import json, os, sys, time
from fedsilo.flwr_adapter import site_runtime

out = sys.argv[1]

def fake_clientapp(args):  # stands in for Flower's flwr-clientapp main, in the child
    with open(os.path.join(out, args[-1]), "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "args": args,
                   "torch_loaded": "torch" in sys.modules}, f)
    os._exit(0)

import torch  # preloaded before the fork, as superexec_main does
site_runtime._run_clientapp = fake_clientapp
zygote = site_runtime._Zygote.start()
for name in ("one", "two"):
    zygote.run(["flwr-clientapp", "--token", name])
deadline = time.time() + 30
while len(os.listdir(out)) < 2 and time.time() < deadline:
    time.sleep(0.05)
print(json.dumps({"self": os.getpid(), "zygote": zygote.pid}))
os.close(zygote.write_fd)  # the SuperExec ends: the zygote must end too
os.waitpid(zygote.pid, 0)
"""


def test_each_clientapp_is_a_fresh_child_of_a_preloaded_zygote(tmp_path: Path) -> None:
    """One forked child per message (no state carries between rounds), each started
    from a process that already imported torch; the zygote ends with its SuperExec."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", ZYGOTE_SCRIPT, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    ids = json.loads(res.stdout)
    runs = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert sorted(runs) == ["one", "two"]
    assert runs["one"]["args"] == ["flwr-clientapp", "--token", "one"]
    assert all(r["ppid"] == ids["zygote"] and r["torch_loaded"] for r in runs.values())
    assert len({r["pid"] for r in runs.values()} | {ids["zygote"], ids["self"]}) == 4


WARM_SCRIPT = """
import json, os, sys, time
from fedsilo.flwr_adapter import site_runtime

out = sys.argv[1]
warmed = []  # the zygote's state: what its hooks did before each fork

def warm():
    warmed.append(os.getpid())

def broken():
    raise RuntimeError("a cache that cannot be built")

def fake_clientapp(args):
    with open(os.path.join(out, args[-1]), "w") as f:
        json.dump({"warmed": warmed, "ppid": os.getppid()}, f)
    os._exit(0)

site_runtime._run_clientapp = fake_clientapp
zygote = site_runtime._Zygote.start([broken, warm])
for name in ("one", "two"):
    zygote.run(["flwr-clientapp", "--token", name])
    deadline = time.time() + 30
    while name not in os.listdir(out) and time.time() < deadline:
        time.sleep(0.05)
print(json.dumps({"zygote": zygote.pid}))
os.close(zygote.write_fd)
os.waitpid(zygote.pid, 0)
"""


def test_the_zygote_warms_its_caches_before_each_fork_and_its_children_inherit_them(
    tmp_path: Path,
) -> None:
    """The warm hooks (a --preload module's `zygote_warm`) run in the zygote at its start
    and again before each fork; each child sees all of it; a hook that fails is reported
    and the messages are still answered."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", WARM_SCRIPT, str(out)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    zygote = json.loads(res.stdout)["zygote"]
    runs = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert runs["one"] == {"warmed": [zygote, zygote], "ppid": zygote}  # start, fork 1
    assert runs["two"] == {"warmed": [zygote] * 3, "ppid": zygote}  # and fork 2
    assert res.stderr.count("a cache that cannot be built") == 3


def test_fedsilos_clientapp_module_offers_the_zygote_its_warm_hook() -> None:
    """`fedsilo client start` preloads fedsilo.clients.client_app; the zygote finds its
    hook by the name it looks for."""
    from fedsilo.clients import client_app, launcher
    from fedsilo.flwr_adapter import site_runtime

    assert callable(getattr(client_app, site_runtime.WARM_HOOK))
    assert client_app.__name__ == launcher.CLIENT_APP_MODULE


def test_the_server_pulls_replies_until_all_came_or_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pulls come POLL_S apart while replies are near (not Flower's 3 s), stop once all
    came, and a silent site ends the exchange at its timeout with what did come. The
    exchange runs on a fake clock: measured on the wall clock, a loaded machine's slow
    pulls (each spaces the next by POLL_COST_RATIO times its cost) failed a bound once."""
    from types import SimpleNamespace

    from fedsilo.flwr_adapter import POLL_S
    from fedsilo.server import server_app
    from fedsilo.server.server_app import exchange

    clock = SimpleNamespace(now=100.0, sleeps=[])

    def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(
        server_app, "time", SimpleNamespace(monotonic=lambda: clock.now, sleep=sleep)
    )

    def reply(to: str) -> object:
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))

    class Grid:
        def __init__(self, batches: list[list[str]]) -> None:
            self.batches, self.pulls = batches, 0

        def push_messages(self, messages: object) -> list[str]:
            return ["m1", "m2"]

        def pull_messages(self, ids: set[str]) -> list[object]:
            self.pulls += 1
            batch = self.batches.pop(0) if self.batches else []
            return [reply(i) for i in batch if i in ids]

        def get_nodes(self) -> list[object]:
            return []

    grid = Grid([[], ["m2"], [], ["m1"]])
    got = exchange(grid, [], timeout=30)  # type: ignore[arg-type]
    assert [m.metadata.reply_to_message_id for m in got] == ["m2", "m1"]
    assert grid.pulls == 4 and clock.sleeps == pytest.approx([POLL_S] * 3)
    clock.sleeps.clear()
    slow = Grid([["m1"]])
    assert len(exchange(slow, [], timeout=0.3)) == 1  # type: ignore[arg-type]
    assert sum(clock.sleeps) == pytest.approx(0.3)  # m2 never replies: partial, on time


def test_pulls_wait_10x_what_asking_costs_not_what_downloading_a_reply_took() -> None:
    """A pull is spaced at least POLL_COST_RATIO times what asking costs (10,000 pending
    simulated replies make each ask ~0.1 s), but a deployed pull that brought a reply
    spent its time downloading it: the wait after it must not grow 10x (two digits sites:
    the second reply was waited for ~1.4 s after the first came)."""
    import time
    from types import SimpleNamespace

    from fedsilo.server.server_app import POLL_COST_RATIO, exchange

    def reply(to: str) -> object:
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))

    class Grid:  # deployed (not Flower's in-memory grid): m1 at the first pull (the
        # clock starts there, after the server's imports), m2 0.3 s later, or never
        def __init__(self, ask_s: float, download_s: float, m2: bool = True) -> None:
            self.ask_s, self.download_s, self.pulls = ask_s, download_s, 0
            self.t0, self.m2 = 0.0, m2

        def push_messages(self, messages: object) -> list[str]:
            return ["m1", "m2"]

        def pull_messages(self, ids: set[str]) -> list[object]:
            self.pulls += 1
            self.t0 = self.t0 or time.monotonic()
            later = self.m2 and time.monotonic() - self.t0 > 0.3
            ready = {"m1"} | ({"m2"} if later else set())
            got = sorted(ids & ready)
            time.sleep(self.download_s if got else self.ask_s)
            return [reply(i) for i in got]

        def get_nodes(self) -> list[object]:
            return []

    grid = Grid(ask_s=0.0, download_s=0.2)
    assert len(exchange(grid, [], timeout=30)) == 2  # type: ignore[arg-type]
    assert time.monotonic() - grid.t0 < POLL_COST_RATIO * 0.2  # ~0.6 s; was 0.2 + 2.0 + 0.2
    costly = Grid(ask_s=0.1, download_s=0.0, m2=False)  # an empty ask costs 0.1 s
    assert len(exchange(costly, [], timeout=2.5)) == 1  # type: ignore[arg-type]
    assert costly.pulls <= 5, costly.pulls  # ~1.1 s apart; at 0.1 s apart: ~12


def test_flower_telemetry_is_off_here_and_in_every_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Flower posts usage events to its service unless told not to: fedsilo tells it."""
    import flwr.supercore.telemetry as telemetry

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))  # where Flower keeps its machine id

    from fedsilo.processes import child_env

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # even when the user's shell says 1
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "1")
    assert child_env(FLWR_HOME="x")["FLWR_TELEMETRY_ENABLED"] == "0"
    from fedsilo import flwr_adapter

    flwr_adapter.disable_telemetry()
    assert telemetry.FLWR_TELEMETRY_ENABLED == "0"
    assert telemetry.create_event(telemetry.EventType.PING, {}) == "disabled"  # nothing sent


def test_an_object_not_there_yet_is_pulled_again_after_50_ms_not_1_s() -> None:
    """A message's content is uploaded just after the message: Flower's first retry of
    a missing object waits 1 s (then 2, 4, ... 10), at each of three hops a round."""
    import time

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from fedsilo import flwr_adapter

    pulls = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    kwdefaults = {fn: dict(fn.__kwdefaults__) for fn in pulls}
    try:
        flwr_adapter.fast_object_pulls()
        tries: list[float] = []

        def pull(object_id: str) -> bytes:
            tries.append(time.monotonic())
            if len(tries) < 3:  # not uploaded yet, twice
                raise ObjectUnavailableError(object_id)
            return b"content"

        t0 = time.monotonic()
        assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"content"}
        assert time.monotonic() - t0 < 0.5  # stock Flower: about 3 s (1 s, then 2 s)
        assert tries[1] - tries[0] >= 0.8 * flwr_adapter.PULL_BACKOFF_S
    finally:
        for fn, saved in kwdefaults.items():
            fn.__kwdefaults__.clear()
            fn.__kwdefaults__.update(saved)


def test_control_api_calls_fail_with_a_reason_not_an_exit(tmp_path: Path) -> None:
    """In-process Control API calls (what `flwr supernode ls/register` do in a process of
    their own) never exit this process: a bad key is a ValueError, no answer is None."""
    from fedsilo.flwr_adapter.control import list_nodes, register_node

    bad = tmp_path / "bad.pub"
    bad.write_text("ecdsa-sha2-nistp384 not-a-key\n")
    with pytest.raises(ValueError, match="not a NIST elliptic-curve public key"):
        register_node(tmp_path, "fedsilo", bad, "a")
    assert list_nodes(tmp_path / "no-config", "fedsilo") is None


# A parent that starts a child which asks to die with it, then sleeps; the child's pid
# is printed for the test.
ORPHAN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "from fedsilo.flwr_adapter.site_runtime import die_with_parent; import time; "
    "die_with_parent(); print('armed', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_site_runtime_process_dies_with_its_parent() -> None:
    """A SuperNode killed outright leaves no SuperExec, zygote or ClientApp behind
    (Linux's parent-death signal: these machines and the sites' servers)."""
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(child):
            time.sleep(0.05)
        assert not alive(child), "the child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_serverapp_starts_once_every_simulated_node_is_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower starts the ServerApp's thread before it registers the nodes: a round that
    sampled then would leave sites out (FedAvg sized its sample from the nodes it saw)."""
    # Prepare: the engine registers its 3 nodes 1 s late, as a loaded machine might.
    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.serverapp import Grid, ServerApp

    from fedsilo.flwr_adapter import engine
    from fedsilo.simulations.engine import EngineConfig
    from fedsilo.simulations.runner import APP_DIR, _backend_config

    real = vce_api._register_nodes

    def late(*args: Any, **kwargs: Any) -> dict[int, int]:
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(vce_api, "_register_nodes", late)
    seen: list[list[int]] = []
    reported: list[dict[int, int]] = []
    server = ServerApp()

    @server.main()
    def first_look(grid: Grid, context: Context) -> None:
        seen.append(sorted(grid.get_node_ids()))

    # Execute
    engine.run_simulation(
        client_app=ClientApp(),
        server_app=server,
        sites=3,
        run_config={},
        backend_config=_backend_config(EngineConfig(), verbose=False),
        app_dir=str(APP_DIR),
        verbose=False,
        on_register=reported.append,
    )
    # Assert: the ServerApp's first look found every node, after they were reported.
    assert len(reported) == 1 and sorted(reported[0].values()) == [0, 1, 2]
    assert seen == [sorted(reported[0])]
    assert vce_api._register_nodes is late  # the engine's own is back


def test_the_superlink_keeps_contents_in_memory_and_its_link_state_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models and updates never go through SQLite; registered sites stay in --database
    (the staging SuperLink's registrations are reopened by the real one)."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.superlink import config_loader
    from flwr.superlink.federation import NoOpFederationManager

    from fedsilo.flwr_adapter.superlink import in_memory_object_store

    monkeypatch.setattr(config_loader, "ObjectStoreFactory", config_loader.ObjectStoreFactory)
    in_memory_object_store()
    db = tmp_path / "superlink.db"
    objects, links = config_loader.get_objectstore_linkstate_factories(
        str(db), NoOpFederationManager()
    )
    assert isinstance(objects.store(), InMemoryObjectStore)
    assert isinstance(links.state(), SqlLinkState) and db.exists()


def test_the_superlink_checks_a_running_run_and_sweeps_expired_tasks_at_most_twice_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's real SQL link state: a site's object push checks the run's status (and
    first sweeps expired tasks) in SQL each time; here a run found running is taken as
    running for STATE_CHECK_S, a stopped run is seen stopped at most that much later,
    and from then on at every request."""
    from flwr.common.constant import Status
    from flwr.server.superlink.fleet.message_handler import message_handler
    from flwr.supercore.constant import TaskType
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.superlink import config_loader
    from flwr.superlink.federation import NoOpFederationManager
    from sqlalchemy import event

    from fedsilo.flwr_adapter.superlink import STATE_CHECK_S, fewer_state_checks

    sweep = SqlCoreState._cleanup_expired_task_tokens
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", sweep)  # undone after
    monkeypatch.setattr(message_handler, "check_abort", message_handler.check_abort)
    clock = [100.0]
    fewer_state_checks(clock=lambda: clock[0])
    _, links = config_loader.get_objectstore_linkstate_factories(
        str(tmp_path / "superlink.db"), NoOpFederationManager()
    )
    state = links.state()
    run_id = state.create_run(None, None, None, {}, "default", None, None, TaskType.SERVER_APP)
    (run,) = state.get_run_info(run_ids=[run_id])
    assert state.claim_task(run.primary_task_id) and state.activate_task(run.primary_task_id)
    statements = [0]
    event.listen(
        state._engine,
        "before_cursor_execute",
        lambda *_: statements.__setitem__(0, statements[0] + 1),
    )

    def check() -> tuple[str | None, int]:  # what a site's object push asks, its SQL
        before = statements[0]
        aborts = [Status.PENDING, Status.STARTING, Status.FINISHED]
        return message_handler.check_abort(run_id, aborts, state), statements[0] - before

    clock[0] += STATE_CHECK_S  # the set-up swept: the next sweep is due
    verdict, sql = check()
    assert verdict is None and sql >= 3  # the sweep's two UPDATEs, the status's SELECT
    assert check() == (None, 0)  # running, STATE_CHECK_S ago or less
    assert state.stop_run(run_id)  # `flwr stop`
    clock[0] += STATE_CHECK_S * 0.9
    assert check() == (None, 0)  # at most STATE_CHECK_S stale ...
    clock[0] += STATE_CHECK_S * 0.1
    for _ in range(2):  # ... then seen at once, and never remembered
        verdict, sql = check()
        assert verdict is not None and "finished" in verdict and sql > 0


def test_a_models_arrays_cross_the_wire_in_chunks_of_at_most_5_mb() -> None:
    """Flower 1.39 sends every array as 5 MB objects, pushed and pulled one by one: no
    message or gRPC limit caps a model's size (a 2.2 GB tensor made 420 such objects)."""
    import torch
    from flwr.app import ArrayRecord
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    record = ArrayRecord({"w": torch.rand(3_300_000)})  # 13.2 MB
    sizes = [len(obj.deflate()) for obj in get_all_nested_objects(record).values()]
    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE == 5 * 2**20
    assert len(sizes) == 5  # three chunks, the array, the record
    assert max(sizes) <= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 64  # a chunk and its header


def test_a_flwr_run_serverapp_counts_the_nodes_once_the_engine_registered_them() -> None:
    """Under `flwr run` the engine registers its nodes after the ServerApp has started:
    the count is taken once it is above 0 and holds still."""
    from fedsilo.flwr_adapter import settled_node_ids

    class Registering:  # nodes appear one at a time, as vce_api._register_nodes makes them
        def __init__(self) -> None:
            self.calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return list(range(min(max(self.calls - 3, 0), 4)))

    assert settled_node_ids(Registering(), settle_s=0.2) == [0, 1, 2, 3]

    class Empty:
        def get_node_ids(self) -> list[int]:
            return []

    with pytest.raises(TimeoutError, match="registered no node"):
        settled_node_ids(Empty(), settle_s=0.1, timeout_s=0.3)


def test_a_flwr_run_serverapp_waits_for_ray_to_start_and_never_imports_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its work begins once Flower's backend has initialised Ray in the process."""
    import types

    from fedsilo.flwr_adapter import wait_for_simulation_engine

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert wait_for_simulation_engine(timeout_s=0.2) is False  # no engine in this process
    assert "ray" not in sys.modules

    calls = []
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: calls.append(1) or len(calls) > 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert wait_for_simulation_engine(timeout_s=5) is True
    assert len(calls) == 4  # it waited while Ray was starting


def test_a_site_that_restarts_mid_round_is_reported_at_once_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Site b's machine died after pulling the round's message and its operator started
    it again: the SuperLink sees it online again (a new session), never answers the
    message for it, and may never have seen it offline. The server notices the new
    session within RESTART_CHECK_S and records b's failure, not an hour-long wait."""
    import time
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsilo.server import server_app
    from fedsilo.server.replies import ReplyBook

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    monkeypatch.setattr(server_app, "RESTART_CHECK_S", 0.2)

    def sent_to(node: int, message_id: str) -> Message:
        msg = Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
        )
        msg.metadata.__dict__["_message_id"] = message_id
        return msg

    class Grid:  # a answers at once; node 12 (b) starts a new session 0.5 s after the
        # server first asks for the nodes' sessions (its clock starts there, not at
        # construction: the server's first look may come after a slow first import)
        def __init__(self) -> None:
            self.t0: float | None = None

        def push_messages(self, messages: list[Message]) -> list[str]:
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids: set[str]) -> list[Message]:
            return [
                Message(RecordDict(), reply_to=a)
                for a in sent
                if a.metadata.message_id in ids and a.metadata.dst_node_id == 11
            ]

        def get_nodes(self) -> list[object]:
            if self.t0 is None:
                self.t0 = time.monotonic()
            b = "t1" if time.monotonic() - self.t0 > 0.5 else "t0"
            return [
                SimpleNamespace(node_id=11, last_activated_at="t0"),
                SimpleNamespace(node_id=12, last_activated_at=b),
            ]

    sent = [sent_to(11, "ma"), sent_to(12, "mb")]
    t0 = time.monotonic()
    replies = server_app.exchange(Grid(), sent, timeout=60)  # a round's timeout is far
    # longer; a regression then fails here in a minute, not an hour
    assert time.monotonic() - t0 < 3
    book = ReplyBook(lambda: {11: "a", 12: "b"})
    book.train_replies(2, sent, replies, {})
    (failure,) = [f for f in book.failures if f.site == "b"]
    assert failure.round == 2 and "restarted during the round" in failure.reason


def test_the_engine_finds_each_nodes_next_message_in_one_pass_over_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fedsilo's `add_messages_to_queue` sweep hands out what Flower's would (each
    node's first undelivered message, expired ones dropped, in the nodes' order) while
    checking each stored message once a sweep, not once per node (nodes x messages)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedsilo.flwr_adapter.engine import next_messages

    def fresh(nodes: int) -> tuple[InMemoryLinkState, list[int], list[str]]:
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        state = factory.state()
        assert isinstance(state, InMemoryLinkState)
        run = Run.create_empty(run_id=77)
        run.primary_task_id = 5
        run.federation_id = NOOP_FEDERATION_ID
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[5] = Task(task_id=5, run_id=77)  # as flwr's _main_loop does
        ids = list(vce_api._register_nodes(num_nodes=nodes, state_factory=factory))
        for attr, value in (("_task_id", 5), ("_run_id", 77), ("_node_id", 1)):  # SuperLink
            monkeypatch.setattr(TaskIdentity, attr, value)
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run)
        msgs = [  # two for the first node, then one for each other but the last
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train")
            for n in [ids[0], *ids[:-1]]
        ]
        return state, ids, list(grid.push_messages(msgs))

    theirs, their_ids, their_pushed = fresh(6)
    flower = [m for n in their_ids for m in theirs.get_message_ins(node_id=n, limit=1)]
    mine, ids, pushed = fresh(6)
    checked: list[int] = []
    real_check = mine._check_stored_messages

    def check(message_ids: set[str], *args: object) -> None:
        checked.append(len(message_ids))
        real_check(message_ids, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mine, "_check_stored_messages", check)
    found = next_messages(mine, ids)
    assert [their_pushed.index(m.metadata.message_id) for m in flower] == [0, 2, 3, 4, 5]
    assert [m.metadata.message_id for m in found] == [pushed[i] for i in (0, 2, 3, 4, 5)]
    assert checked == [6]  # every stored message once, in one call
    assert all(m.metadata.delivered_at for m in found)
    again = next_messages(mine, ids)  # node 0's second message, the next sweep
    assert [m.metadata.message_id for m in again] == [pushed[1]]
    mine.message_ins_store[pushed[1]].metadata.__dict__["_delivered_at"] = ""
    mine.message_ins_store[pushed[1]].metadata.__dict__["_ttl"] = 0.0  # now expired
    assert next_messages(mine, ids) == [] and pushed[1] not in mine.message_ins_store


def test_a_records_tensor_views_are_its_arrays_read_in_place_bit_for_bit() -> None:
    """tensor_views reads a record (the global model, the aggregate, the model a site
    receives) without copying it: each tensor is what to_torch_state_dict gives, bit for bit,
    whatever its dtype, shape or layout, and lies inside its Array's own bytes."""
    import numpy
    import torch

    from fedsilo.flwr_adapter.arrays import tensor_views

    g = torch.Generator().manual_seed(3)
    state = {
        "w": torch.randn(5, 3, generator=g),
        "t": torch.randn(4, 6, generator=g).t(),  # saved in Fortran order
        "scalar": torch.tensor(3.5),
        "n": torch.arange(7),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(3, generator=g).half(),
        "mask": torch.tensor([True, False]),
    }
    arrays = flwr.app.ArrayRecord(state)
    # Execute
    views = tensor_views(arrays)
    # Assert
    expected = arrays.to_torch_state_dict()
    assert list(views) == list(expected)
    for key, want in expected.items():
        got = views[key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert torch.equal(got, want), key
        data = numpy.frombuffer(arrays[key].data, dtype=numpy.uint8)
        start = data.ctypes.data
        if got.numel():  # the view's memory is the record's: nothing was copied
            assert start <= got.data_ptr() < start + data.size, key


def test_a_record_that_does_not_parse_is_refused_as_numpy_would_refuse_it() -> None:
    """A truncated array, or one whose header is not .npy, raises ValueError: no view
    reaches past the record's bytes."""
    import dataclasses

    import torch

    from fedsilo.flwr_adapter.arrays import tensor_views

    good = flwr.app.ArrayRecord({"w": torch.ones(4, 4)})["w"]
    for data in (good.data[:-8], b"not an npy header" + good.data):
        bad = flwr.app.ArrayRecord()
        bad["w"] = dataclasses.replace(good, data=data)
        with pytest.raises(ValueError):
            tensor_views(bad)
