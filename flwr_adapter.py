"""Every Flower internal fedsilo depends on, in one place, behind a version check.

fedsilo uses Flower's public API everywhere else. What it needs beyond that is here:
the in-process simulation entry point (`_run_simulation`, which starts the engine
with ClientApp and ServerApp objects built by fedsilo and a Run it describes), the
task identity a ServerApp process sets, the simulation engine's mapping of node
ids to partitions (fedsilo names a virtual site by its partition, never by what its
messages say), and a deployed site's warm runtime (below). These are private to
Flower and may change in any release, so `check_flower_version` refuses any Flower
but the one they were read in, with a message that says so, before anything else runs.

A deployed site's warm runtime (`python -m fedsilo.flwr_adapter supernode ARGS...`,
what `fedsilo client start` runs instead of `flower-supernode ARGS...`). Stock Flower
1.39 spends about 9 s of a round outside training: the SuperNode sleeps 3 s whenever
a pull finds no message (`supernode/start_client_internal.py`), its SuperExec polls
for tasks every second and starts a fresh `flwr-clientapp` process for every message,
which imports torch, opacus and flwr again (about 4.5 s). Here:
- the SuperNode's idle pull waits POLL_S instead of 3 s (its module's `time` is
  replaced by one whose `sleep` is capped; nothing else in Flower is touched);
- every object pull (the SuperNode's of a message from the SuperLink, the ClientApp's
  from its SuperNode, the ServerApp's of a reply) retries an object that is not there
  yet after PULL_BACKOFF_S, doubling to PULL_BACKOFF_CAP_S, instead of after 1 s
  doubling to 10 s: a message's content is uploaded just after the message, so the
  first try often misses it and stock Flower then waits a whole second (measured:
  0.9-1.2 s of a pull of 12 objects that otherwise takes 0.2 s), at each of the three;
- the SuperNode announces a heartbeat interval of HEARTBEAT_S (Flower: 30 s), so the
  SuperLink notices a dead site after at most 20 s instead of 60 s;
- the SuperNode starts this module's SuperExec instead of `flower-superexec`: Flower's
  own `run_superexec`, polling every POLL_S, whose executor hands each task to a
  *zygote*: a process forked once, after torch, opacus, flwr and fedsilo's ClientApp
  were imported and before any thread or connection exists, which forks one child per
  message to run Flower's `flwr-clientapp` main. Each message still gets a fresh
  process (no state carries between rounds: the ledger is the site's only memory),
  without paying for the imports again.
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
    import os
    import sys

    os.environ.update(TELEMETRY_OFF)
    loaded = sys.modules.get("flwr.supercore.telemetry")
    if loaded is not None:
        vars(loaded)["FLWR_TELEMETRY_ENABLED"] = "0"


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


# ---------------------------------------------------------------- warm site runtime
POLL_S = 0.1  # the SuperNode's idle pull and the SuperExec's task poll, instead of 3 s and 1 s
# A dead site is noticed after 2 x 10 s (Flower: 2 x 30 s); it beats every 4 s. 10 s is
# the smallest interval the SuperLink accepts (message_handler: HEARTBEAT_MIN_INTERVAL).
HEARTBEAT_S = 10
# What the zygote imports once: everything a ClientApp child imported that its zygote
# had not (listed from sys.modules in a child). Among them Flower's flwr-clientapp
# entry point took ~1 s, torch._dynamo (imported by torch on the first optimizer built)
# 0.5-0.9 s, and httpcore (the HTTP client the ClientApp talks to its SuperNode with)
# 0.15 s; encodings.cp437 reads the app's FAB (a zip file).
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.profiler",
    "opacus",
    "flwr.clientapp",
    "flwr.supernode.cli.flwr_clientapp",
    "httpcore",
    "h11",
    "encodings.cp437",
    "fedsilo.clients.client_app",
)


PULL_BACKOFF_S = 0.05  # an object pull's first retry (Flower: 1 s) ...
PULL_BACKOFF_CAP_S = 0.5  # ... and its longest wait between retries (Flower: 10 s)


def fast_object_pulls() -> None:
    """Make this process's object pulls retry after PULL_BACKOFF_S, not 1 s (see above).

    Flower binds the backoff as keyword defaults of its two pull functions, which
    every caller uses; the pull's overall time limit and tries are unchanged.
    """
    from flwr.supercore.inflatable import inflatable_utils

    check_flower_version()
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if not defaults or not {"initial_backoff", "backoff_cap"} <= set(defaults):
            raise ConfigError(  # Flower changed: fail here, not with slow rounds
                f"flwr {SUPPORTED}x's {fn.__name__} has no initial_backoff/backoff_cap "
                "keyword defaults; fedsilo/flwr_adapter.py needs updating."
            )
        defaults.update(initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)


class _CappedTime:
    """A `time` module whose sleep() is at most POLL_S (the SuperNode's idle waits)."""

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        import time

        time.sleep(min(seconds, POLL_S))


def supernode_main(argv: list[str]) -> None:
    """Flower's `flower-supernode` with short idle waits, starting the warm SuperExec."""
    import subprocess
    import sys

    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    check_flower_version()
    fast_object_pulls()
    vars(sci)["time"] = _CappedTime()
    # The interval the SuperNode announces (the SuperLink declares it dead after 2 of
    # them) and the one its heartbeat thread keeps: 30 s in Flower, a dead site found
    # after about 60 s. The thread beats every (interval - 5 s) x 0.8, whatever the site
    # is computing, so a slow but live site is never taken for dead.
    vars(connection)["HEARTBEAT_DEFAULT_INTERVAL"] = HEARTBEAT_S
    vars(heartbeat)["HEARTBEAT_DEFAULT_INTERVAL"] = HEARTBEAT_S

    real_popen = subprocess.Popen

    class Popen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            if isinstance(args, list) and args and args[0] == "flower-superexec":
                args = [sys.executable, "-m", "fedsilo.flwr_adapter", "superexec", *args[1:]]
            super().__init__(args, *rest, **kwargs)

    vars(sci)["subprocess"] = _Namespace(subprocess, Popen=Popen)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


class _Namespace:
    """A module stand-in: `overrides` first, then the module's own attributes."""

    def __init__(self, module: Any, **overrides: Any) -> None:
        self._module, self._overrides = module, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._module, name)


def superexec_main(argv: list[str]) -> None:
    """Flower's `flower-superexec`, polling every POLL_S, launching ClientApps from a zygote."""
    import importlib
    import os
    import sys

    check_flower_version()
    for name in PRELOAD:  # before the fork: the zygote's children inherit them
        importlib.import_module(name)
    fast_object_pulls()  # the ClientApps' pulls from the SuperNode
    zygote = _Zygote.start()

    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ZygoteExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with the process forked from the zygote."""

        def launch(self, spec: Any) -> Any:
            import subprocess

            captured: list[list[str]] = []
            real = subprocess.Popen
            subprocess.Popen = lambda args, *a, **k: captured.append(list(args))  # type: ignore[assignment,misc]
            try:
                result = super().launch(spec)  # builds the exact flwr-clientapp argv
            finally:
                subprocess.Popen = real  # type: ignore[misc]
            for args in captured:
                zygote.run(args)
            return result

    vars(rs)["get_executor"] = lambda *a, **k: ZygoteExecutor()
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(POLL_S))
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


class _Zygote:
    """A forked copy of this process that forks one child per ClientApp command."""

    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid, self.write_fd = pid, write_fd

    @staticmethod
    def start() -> _Zygote:
        import os

        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the zygote: single-threaded, holding the imports
            os.close(write_fd)
            _zygote_loop(read_fd)
            os._exit(0)
        os.close(read_fd)
        return _Zygote(pid, write_fd)

    def run(self, args: list[str]) -> None:
        import json
        import os

        os.write(self.write_fd, (json.dumps(args) + "\n").encode())


def _zygote_loop(read_fd: int) -> None:
    import json
    import os
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    with os.fdopen(read_fd, "r") as requests:
        while line := requests.readline():  # EOF: the SuperExec is gone, and so is the zygote
            args = json.loads(line)
            if os.fork() == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _run_clientapp(args)


def _run_clientapp(args: list[str]) -> None:
    """In a zygote's child: Flower's `flwr-clientapp` main with `args`, then exit."""
    import os
    import sys

    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    code = 0
    sys.argv = ["flwr-clientapp", *args[1:]]
    try:
        flwr_clientapp()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child must never return into the zygote
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    import sys

    disable_telemetry()
    commands = {"supernode": supernode_main, "superexec": superexec_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m fedsilo.flwr_adapter {supernode,superexec} ARGS...")
    commands[sys.argv[1]](sys.argv[2:])
