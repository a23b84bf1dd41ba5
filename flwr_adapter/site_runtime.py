"""A deployed site's warm runtime (Flower internals; see the package).

`python -m fedsilo.flwr_adapter.site_runtime supernode [--preload MODULE]... ARGS...` is
what `fedsilo client start` runs instead of `flower-supernode ARGS...`, with --preload
naming the app's ClientApp module (this package imports nothing of fedsilo's apps: the
clients layer names it, fedsilo.clients.launcher). Stock Flower 1.39 spends about 9 s
of a round outside training: the SuperNode sleeps 3 s whenever a pull finds no message
(`supernode/start_client_internal.py`), its SuperExec polls for tasks every second and
starts a fresh `flwr-clientapp` process for every message, which imports torch, opacus
and flwr again (about 4.5 s), and every object pull waits 1 s after a miss. Here:
- the SuperNode's idle pull waits `poll_wait` of the time since its last message (0.1 s
  while a run's next stage is near, up to 1 s when idle) instead of 3 s (its module's
  `time` is replaced by one whose `sleep` is capped, told of each pull that found a
  message; nothing else in Flower is touched), and so does its SuperExec's task poll
  (Flower: every second) since its last task;
- object pulls retry quickly (`fedsilo.flwr_adapter.fast_object_pulls`) in the
  SuperNode, the SuperExec and every ClientApp;
- the SuperNode announces a heartbeat interval of HEARTBEAT_S (Flower: 30 s), so the
  SuperLink notices a dead site after at most 20 s instead of 60 s, and retries a lost
  server at most RETRY_CAP_S apart (Flower: 20 s), so it finds a restarted one soon;
- the SuperNode starts this module's SuperExec instead of `flower-superexec`: Flower's
  own `run_superexec`, whose executor hands each task to a
  *zygote*: a process forked once, after torch, opacus, flwr and the --preload modules
  were imported and before any thread or connection exists, which forks one child per
  message to run Flower's `flwr-clientapp` main. Each message still gets a fresh
  process (no state carries between rounds: the ledger is the site's only memory),
  without paying for the imports again. Before each fork the zygote runs the
  `zygote_warm()` of every --preload module that has one: pure caches its children
  inherit (fedsilo's: the RDP curves of the site's ledger, which each round's budget
  check needs: ~0.2 s a round otherwise);
- the SuperExec, the zygote and each ClientApp die with their parent (Linux's parent-
  death signal): a SuperNode stopped or killed leaves nothing running, however long
  Flower's own clean-up of a lost parent would take on a loaded machine.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter import (
    POLL_S,
    check_flower_version,
    disable_telemetry,
    fast_object_pulls,
    poll_wait,
)

# A dead site is noticed after 2 x 10 s (Flower: 2 x 30 s); it beats every 4 s. 10 s is
# the smallest interval the SuperLink accepts (message_handler: HEARTBEAT_MIN_INTERVAL).
HEARTBEAT_S = 10
IDLE_PULL_S = 3.0  # what Flower's SuperNode sleeps after a pull that found nothing
RETRY_CAP_S = 2.0  # the SuperNode's longest wait between tries of a lost server (Flower: 20 s)
# What the zygote imports once, with the --preload modules (the app's ClientApp: 55-67 ms
# a message): everything else a ClientApp child imported that its zygote had not (listed
# from sys.modules in a child). Among them Flower's flwr-clientapp
# entry point took ~1 s, torch._dynamo (imported by torch on the first optimizer built)
# 0.5-0.9 s, and httpcore (the HTTP client the ClientApp talks to its SuperNode with)
# 0.15 s; encodings.cp437 reads the app's FAB (a zip file).
SELF = "fedsilo.flwr_adapter.site_runtime"  # `python -m SELF supernode|superexec ARGS`
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
)
PRELOAD_FLAG = "--preload"  # MODULE: also imported once by the zygote (before Flower's flags)
WARM_HOOK = "zygote_warm"  # a --preload module's function the zygote runs before each fork


def split_preload(argv: list[str]) -> tuple[list[str], list[str]]:
    """The modules of the leading `--preload MODULE` pairs of `argv`, and the rest."""
    preload = []
    while len(argv) >= 2 and argv[0] == PRELOAD_FLAG:
        preload.append(argv[1])
        argv = argv[2:]
    return preload, argv


def superexec_command(preload: list[str], flower_args: list[str]) -> list[str]:
    """The command that starts this module's SuperExec where Flower starts its own."""
    flags = [arg for name in preload for arg in (PRELOAD_FLAG, name)]
    return [sys.executable, "-m", SELF, "superexec", *flags, *flower_args]


class _CappedTime:
    """A `time` module for the SuperNode's loop (and its SuperExec's, told of each task
    it launches). Its sleep(3) after a pull that found no message waits `poll_wait` of
    the time since the last one: POLL_S while a run's next
    round or stage is near, up to once a second for an idle site (each pull is a TLS RPC
    the SuperLink serves: 2 idle sites cost it 10% of a core at POLL_S). Its other sleeps
    (waits on the site's own state) are capped at POLL_S."""

    def __init__(self) -> None:
        self.busy_at = time.monotonic()  # the last pull that found a message (or the start)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < IDLE_PULL_S:
            time.sleep(min(seconds, POLL_S))
            return
        time.sleep(poll_wait(time.monotonic() - self.busy_at))

    def pulled(self, found: Any) -> Any:
        """Note a pull's outcome (a run id when it found a message) and return it."""
        if found is not None:
            self.busy_at = time.monotonic()
        return found


def supernode_main(argv: list[str]) -> None:
    """Flower's `flower-supernode` with short idle waits, starting the warm SuperExec."""
    # lazy, here and below: each of the three processes imports only the Flower entry point
    # it runs, and `fedsilo client start` imports this module (0.3-0.6 s each)
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat
    from flwr.supercore.retry import grpc_retry
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    check_flower_version()
    fast_object_pulls()
    clock = _CappedTime()
    vars(sci)["time"] = clock
    pull = getattr(sci, "_pull_and_store_message", None)
    if pull is None:
        raise ConfigError(
            "flwr's SuperNode has no _pull_and_store_message; flwr_adapter needs updating."
        )
    vars(sci)["_pull_and_store_message"] = lambda *a, **k: clock.pulled(pull(*a, **k))
    # The interval the SuperNode announces (the SuperLink declares it dead after 2 of
    # them) and the one its heartbeat thread keeps: 30 s in Flower, a dead site found
    # after about 60 s. The thread beats every (interval - 5 s) x 0.8, whatever the site
    # is computing, so a slow but live site is never taken for dead.
    vars(connection)["HEARTBEAT_DEFAULT_INTERVAL"] = HEARTBEAT_S
    vars(heartbeat)["HEARTBEAT_DEFAULT_INTERVAL"] = HEARTBEAT_S
    # A lost server is retried at most RETRY_CAP_S apart (Flower: up to 20 s): a
    # restarted one is found, and the site rejoins it, seconds after it is back.
    if not hasattr(grpc_retry, "MAX_RETRY_DELAY"):
        raise ConfigError("flwr's grpc_retry has no MAX_RETRY_DELAY; flwr_adapter needs updating.")
    vars(grpc_retry)["MAX_RETRY_DELAY"] = RETRY_CAP_S

    preload, flower_args = split_preload(argv)
    real_popen = subprocess.Popen

    class Popen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            if isinstance(args, list) and args and args[0] == "flower-superexec":
                args = superexec_command(preload, args[1:])
            super().__init__(args, *rest, **kwargs)

    vars(sci)["subprocess"] = _Namespace(subprocess, Popen=Popen)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


class _Namespace:
    """A module stand-in: `overrides` first, then the module's own attributes."""

    def __init__(self, module: Any, **overrides: Any) -> None:
        self._module, self._overrides = module, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._module, name)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere,
    nothing). The parent here is the process (and thread) that forked this one: the
    SuperNode's main thread, the SuperExec's, or the single-threaded zygote."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused: Flower's own parent checks remain
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def superexec_main(argv: list[str]) -> None:
    """Flower's `flower-superexec`, polling every POLL_S, launching ClientApps from a zygote."""
    die_with_parent()
    check_flower_version()
    preload, flower_args = split_preload(argv)
    warm = []
    for name in (*PRELOAD, *preload):  # before the fork: the zygote's children inherit them
        module = importlib.import_module(name)
        if name in preload and callable(hook := getattr(module, WARM_HOOK, None)):
            warm.append(hook)
    fast_object_pulls()  # the ClientApps' pulls from the SuperNode
    zygote = _Zygote.start(warm)

    # lazy: after the fork, so the zygote holds only what a ClientApp needs
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    clock = _CappedTime()  # Flower's loop sleeps its task poll interval between polls

    class ZygoteExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with the process forked from the zygote."""

        def launch(self, spec: Any) -> Any:
            clock.pulled(spec)  # a task: the next ones (the run's next stages) are near
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
    if not hasattr(rs, "time"):
        raise ConfigError("flwr's run_superexec has no `time`; flwr_adapter needs updating.")
    vars(rs)["time"] = clock
    # Flower sleeps this (1 s by default) between task polls; the clock shortens it
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(IDLE_PULL_S)
    sys.argv = ["flower-superexec", *flower_args]
    flower_superexec()


class _Zygote:
    """A forked copy of this process that forks one child per ClientApp command."""

    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid, self.write_fd = pid, write_fd

    @staticmethod
    def start(warm: Sequence[Callable[[], None]] = ()) -> _Zygote:
        """Fork the zygote; it runs each of `warm` at its start and before each fork."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the zygote: single-threaded, holding the imports
            die_with_parent()
            os.close(write_fd)
            _zygote_loop(read_fd, warm)
            os._exit(0)
        os.close(read_fd)
        return _Zygote(pid, write_fd)

    def run(self, args: list[str]) -> None:
        os.write(self.write_fd, (json.dumps(args) + "\n").encode())


def _zygote_loop(read_fd: int, warm: Sequence[Callable[[], None]] = ()) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    _warm(warm)  # while the site waits for its first message
    with os.fdopen(read_fd, "r") as requests:
        while line := requests.readline():  # EOF: the SuperExec is gone, and so is the zygote
            args = json.loads(line)
            _warm(warm)  # what the last child added (a new run's plan): once, then memoised
            if os.fork() == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                die_with_parent()
                _run_clientapp(args)


def _warm(hooks: Sequence[Callable[[], None]]) -> None:
    """Run each warm hook; one that fails is reported and skipped: a cache is never
    worth a message unanswered (the child computes without it)."""
    for hook in hooks:
        try:
            hook()
        except Exception:
            traceback.print_exc()


def _run_clientapp(args: list[str]) -> None:
    """In a zygote's child: Flower's `flwr-clientapp` main with `args`, then exit."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    code = 0
    sys.argv = ["flwr-clientapp", *args[1:]]
    try:
        flwr_clientapp()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child must never return into the zygote
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    disable_telemetry()
    commands = {"supernode": supernode_main, "superexec": superexec_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m {SELF} {{supernode,superexec}} [--preload MODULE]... ARGS...")
    commands[sys.argv[1]](sys.argv[2:])
