"""Run a site: Flower's SuperNode with the site's CA, auth key, data and privacy policy.

`start_client`:
  1. reads the site kit (CA valid, key an OpenSSH ECDSA key with mode 0600) and
     checks the data file;
  2. waits for the server with backoff, checking on each attempt that it speaks
     TLS with a certificate the federation CA signed for the address dialled
     (a wrong CA or a plaintext server stops at once, with the reason);
  3. starts `flower-supernode` (node config: data path, site name, ledger path, the
     site's policy and, when the kit has a site.crt, its identity files; runtime
     dependency installation off), and waits for it;
  4. stops it, and every ClientApp it started, on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsilo.clients.dp_train import feature_cache_dir
from fedsilo.clients.site_env import (
    BUILTIN,
    CA_CERT_KEY,
    DATA_KEY,
    DEVICE_KEY,
    KEEP_CACHE_KEY,
    LEDGER_ENV,
    NAME_KEY,
    SITE_CERT_KEY,
    SITE_KEY_KEY,
    TASK_KEY,
)
from fedsilo.errors import ConfigError, DataError, FedsiloError
from fedsilo.flwr_adapter.site_runtime import HEARTBEAT_S
from fedsilo.privacy.policy import LEDGER_KEY
from fedsilo.privacy.provision import SiteKit
from fedsilo.processes import (
    TLSError,
    Unreachable,
    child_env,
    free_port,
    probe_tls,
    server_speaks_tls,
    spawn,
    stop,
    wait_with_backoff,
)
from fedsilo.task.api import load_task
from fedsilo.task.builtin import TASKS
from fedsilo.task.data import load_npz
from fedsilo.task.features import drop_cache
from fedsilo.task.train import check_trainable

log = logging.getLogger("fedsilo.client")
# The module the manifest's clientapp lives in: each ClientApp process forks from a zygote
# that imported it once (55-67 ms less a message; fedsilo.flwr_adapter.site_runtime).
CLIENT_APP_MODULE = "fedsilo.clients.client_app"
# Flower's SuperNode with fedsilo's warm runtime: then the same flags as flower-supernode.
WARM_SUPERNODE = (
    *(sys.executable, "-m", "fedsilo.flwr_adapter.site_runtime", "supernode"),
    *("--preload", CLIENT_APP_MODULE),
)
# A restarted site is refused while the server still counts its previous session online:
# until it misses two heartbeats (fedsilo.flwr_adapter.site_runtime.HEARTBEAT_S), then some slack.
REJOIN_WINDOW_S = 2 * HEARTBEAT_S + 15
REJOIN_RETRY_S = 5.0  # after a refusal; after a clean exit: RECONNECT_S
# A SuperNode that said it terminated exits ~5 s later (Flower's force-exit timer);
# one still there after EXIT_GRACE_S is hung and is stopped.
EXIT_GRACE_S = 15.0
# While its SuperNode runs, a site probes the server (one TLS handshake) this often. A
# server unreachable for two probes in a row that then answers again has restarted: a
# SuperNode that neither exits nor says it reconnected within EXIT_GRACE_S is stuck on
# the old session (Flower 1.39 can lose its connection to a CANCELLED RPC and wait for
# ever), and is stopped so the site rejoins.
PROBE_EVERY_S = 5.0
RECONNECT_S = 1.0  # then check_server waits for the server, probing with backoff
NODE_AUTH_REFUSED = 305  # flower-supernode: SUPERNODE_CONNECTION_ERROR (key not allow-listed)
EventFn = Callable[[str], None]


class SiteRefused(FedsiloError):
    """The server did not admit this site."""


@dataclass(frozen=True)
class ClientOptions:
    server: str  # host:port of the Fleet API
    data: Path
    device: str = "auto"
    connect_timeout_s: float = 600.0  # keep retrying a server that is not up this long
    insecure: bool = False
    threads: int = 0  # torch CPU threads per ClientApp; 0 = torch's default (all cores)
    keep_feature_cache: bool = False  # features of private data are deleted when the site stops
    task: str = BUILTIN  # the only task this site trains: builtin, or PACKAGE.MODULE:OBJECT


def node_config(kit: SiteKit, opts: ClientOptions) -> dict[str, str | float]:
    """The node config the ClientApp reads: data, name, ledger, policy and identity.

    The identity files (for secure aggregation) only when the kit holds a site.crt: a
    kit made before site certificates still trains with local DP.
    """
    values: dict[str, str | float] = {
        DATA_KEY: str(opts.data.resolve()),
        NAME_KEY: kit.name,
        LEDGER_KEY: str(kit.ledger.resolve()),
        KEEP_CACHE_KEY: "true" if opts.keep_feature_cache else "false",
        TASK_KEY: opts.task,
        DEVICE_KEY: opts.device,
        **kit.policy.node_config(),
    }
    if kit.cert.exists():
        values[SITE_KEY_KEY] = str(kit.key.resolve())
        values[SITE_CERT_KEY] = str(kit.cert.resolve())
        values[CA_CERT_KEY] = str(kit.ca.resolve())
    return values


def format_node_config(values: Mapping[str, str | float]) -> str:
    """`key="value" key=1.0 ...` as flower-supernode's --node-config parses it."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if '"' in value or "\n" in value:
                raise ConfigError(f"`{key}` may not contain a double quote: {value!r}.")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={float(value)!r}")
    return " ".join(parts)


def supernode_command(kit: SiteKit, opts: ClientOptions, port: int) -> list[str]:
    cmd = [
        *WARM_SUPERNODE,
        "--superlink",
        opts.server,
        "--node-config",
        format_node_config(node_config(kit, opts)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]  # runtime dependency installation is off by default on a SuperNode: keep it off
    if opts.insecure:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--root-certificates",
        str(kit.ca.resolve()),
        "--auth-supernode-private-key",
        str(kit.key.resolve()),
    ]


def check_server(kit: SiteKit, opts: ClientOptions) -> None:
    """One connection attempt: Unreachable to retry, a FedsiloError to stop."""
    if not opts.insecure:
        probe_tls(opts.server, kit.ca)
    elif server_speaks_tls(opts.server):
        raise TLSError(
            f"The server at {opts.server} speaks TLS but this site was started with "
            "--insecure. Drop --insecure: the federation is secure."
        )


def check_site_file(path: Path, task_ref: str = BUILTIN) -> None:
    """Refuse a site data file its task could not train on (read, shape, labels).

    With the built-in tasks, the file must fit one of them; with the site's own task,
    the task is imported and checked (a forward pass) and reads the file.
    """
    if task_ref != BUILTIN:
        task = load_task(task_ref)
        check_trainable(task)
        task.site_data(path)
        return
    data = load_npz(path)
    shape = tuple(data.x.shape[1:])
    shapes = {t.input_shape: t.name for t in TASKS.values()}
    if shape not in shapes and math.prod(shape) not in {math.prod(s) for s in shapes}:
        known = ", ".join(f"{name}: {'x'.join(map(str, s))}" for s, name in shapes.items())
        raise DataError(
            f"{path}: examples of shape {'x'.join(map(str, shape))} fit no built-in task "
            f"({known}). Bring your own task (--task; README, 'Your own model and data') or "
            "convert the data."
        )


def start_client(kit: SiteKit, opts: ClientOptions, *, on_event: EventFn) -> int:
    """Serve the federation until stopped (Ctrl-C, SIGTERM); reconnect when the server goes.

    A SuperNode that ends on its own (the server stopped or restarted) is started again
    once the server is back. A refusal right after this site's previous session ended
    (Flower still counts that session online until it misses two heartbeats) is retried
    for REJOIN_WINDOW_S before it is reported as a key the server does not know.
    """

    check_site_file(opts.data, opts.task)  # a bad task or file fails here, not at round 1
    home = kit.path / "flwr-home"
    env = child_env(FLWR_HOME=str(home.resolve()))
    env[LEDGER_ENV] = str(kit.ledger.resolve())  # its zygote warms from it (client_app)
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if opts.threads > 0:  # inherited by every flwr-clientapp process the SuperNode starts
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(opts.threads)
    log_file = kit.path / "supernode.log"
    refused_since: float | None = None

    def reachable() -> bool:
        try:
            check_server(kit, opts)
        except Unreachable:
            return False
        except FedsiloError:
            return True  # it answers (a TLS problem is the SuperNode's to report)
        return True

    try:
        while True:
            wait_with_backoff(
                lambda: check_server(kit, opts),
                deadline_s=opts.connect_timeout_s,
                what=f"the federation server {opts.server}",
                on_retry=on_event,
                cap=5.0,  # a TLS handshake every 5 s at most: a restarted server is found soon
            )
            on_event(f"server {opts.server} is up" + ("" if opts.insecure else " (TLS verified)"))
            offset = log_file.stat().st_size if log_file.exists() else 0
            proc = spawn(supernode_command(kit, opts, free_port()), log_file=log_file, env=env)
            on_event(f"site {kit.name} started (pid {proc.pid}); log {log_file}")
            try:
                code = watch(proc, log_file, on_event, offset=offset, probe=reachable)
            except SiteRefused:
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > REJOIN_WINDOW_S:
                    raise
                on_event(
                    "the server did not admit this site yet: it may still count this site's "
                    f"previous session as online (up to {2 * HEARTBEAT_S} s); retrying in "
                    f"{REJOIN_RETRY_S:.0f} s"
                )
                time.sleep(REJOIN_RETRY_S)
                continue
            finally:
                stop(proc)
            refused_since = None
            on_event(
                f"the site's connection ended (SuperNode exit code {code}: the server stopped "
                f"or restarted); reconnecting in {RECONNECT_S:.0f} s"
            )
            time.sleep(RECONNECT_S)
    finally:
        if not opts.keep_feature_cache:  # a run cut short leaves no copy of private data
            drop_cache(feature_cache_dir(kit.ledger))


def watch(
    proc: subprocess.Popen[bytes],
    log_file: Path,
    on_event: EventFn,
    *,
    offset: int = 0,
    probe: Callable[[], bool] | None = None,
) -> int:
    """Follow the SuperNode (its log from `offset`) until it exits; translate failures.
    With `probe` (is the server reachable?), a SuperNode stuck across a server restart
    is stopped (PROBE_EVERY_S); 0 means: reconnect."""
    start = offset
    joined = False
    ended_at: float | None = None  # when the SuperNode said it terminated
    server = _ServerWatch(probe)
    while True:
        code = proc.poll()
        text = _read_from(log_file, offset)
        offset += len(text.encode())
        if not joined and "SuperNode ID:" in text:
            on_event("admitted by the server; waiting for rounds")
            joined = True
        if ended_at is None and "SuperNode terminated gracefully" in text:
            ended_at = time.monotonic()
        if code is not None:
            break
        if ended_at is not None and time.monotonic() - ended_at > EXIT_GRACE_S:
            # Flower 1.39 can hang here: a heartbeat thread that gave up at the same
            # time makes its clean-up raise, and the process waits on its threads.
            stop(proc)
            return 0
        if server.stuck(text):
            on_event(
                "the server restarted but this site's SuperNode neither reconnected nor "
                f"exited in {EXIT_GRACE_S:.0f} s; restarting it"
            )
            stop(proc)
            return 0
        time.sleep(0.5)
    if code == NODE_AUTH_REFUSED or "Failed to activate SuperNode" in _read_from(log_file, start):
        raise SiteRefused(
            "The server refused this site: its key is not on the federation's allow-list "
            "(not provisioned for this server, or removed). Ask the operator to run "
            "`fedsilo provision add-site` and restart the server; no model was received."
        )
    if code not in (0, -15):
        raise FedsiloError(
            f"flower-supernode exited with code {code}; see {log_file}:\n"
            + "\n".join(_read_from(log_file, start).splitlines()[-10:])
        )
    return code


class _ServerWatch:
    """Whether a live SuperNode missed a server restart: the server unreachable for two
    probes in a row, then reachable, and EXIT_GRACE_S later the SuperNode neither exited
    nor logged, since the server was lost, that it reconnected (Flower's retry:
    "Connection successful after ...")."""

    def __init__(self, probe: Callable[[], bool] | None) -> None:
        self.probe = probe
        self.last = time.monotonic()
        self.misses = 0
        self.lost_at: float | None = None  # the first failed probe of this outage
        self.back_at: float | None = None  # when the lost server answered again
        self.reconnected_at = -math.inf  # the SuperNode's last "Connection successful"

    def stuck(self, new_log: str) -> bool:
        now = time.monotonic()
        if "Connection successful" in new_log:
            self.reconnected_at = now
        if self.probe is not None and now - self.last >= PROBE_EVERY_S:
            self.last = now
            if not self.probe():
                if self.misses == 0 and self.back_at is None:
                    self.lost_at = now
                self.misses += 1
            elif self.misses >= 2:
                self.back_at = now
                self.misses = 0
            else:
                self.misses = 0
        if self.back_at is None or self.lost_at is None:
            return False
        if self.reconnected_at >= self.lost_at:  # it found the server by itself
            self.back_at = self.lost_at = None
            return False
        return now - self.back_at > EXIT_GRACE_S


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


__all__ = ["ClientOptions", "SiteRefused", "Unreachable", "start_client"]
