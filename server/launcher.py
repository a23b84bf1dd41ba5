"""Run the federation server: Flower's SuperLink over TLS with SuperNode authentication.

`start_server` does, in order:
  1. check the kit (certificates valid, CA-signed, SANs) and that the ports are free;
  2. start `flower-superlink` (TLS on the Fleet, Control and Runtime APIs,
     `--enable-supernode-auth`, runtime dependency installation off; message
     contents kept in memory: fedsilo.flwr_adapter.superlink);
  3. allow-list every site public key of the kit (`flwr supernode register`);
  4. wait until `wait_sites` sites are online;
  5. start the run (`flwr run APP fedsilo --stream`) of the same ServerApp that
     `fedsilo simulate` runs, and report each round from RUN_DIR/metrics.jsonl;
  6. stop every child process, whatever happened.

The Flower app submitted is a directory holding only fedsilo's app manifest
(pyproject.toml): sites and server import the fedsilo they installed; no code
travels with a run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedsilo
from fedsilo import exporter
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, FedsiloError
from fedsilo.flwr_adapter.control import list_nodes, register_node
from fedsilo.privacy.pki import write_public
from fedsilo.privacy.provision import ServerKit
from fedsilo.processes import (
    CONTROL_PORT,
    check_port_free,
    flower_bin,
    free_port,
    server_env,
    spawn,
    stop,
)
from fedsilo.server.prometheus import RunCollector
from fedsilo.server.records import RoundRecord, Summary
from fedsilo.server.run_dir import (
    FEDERATION_CA,
    new_run_dir,
    read_metrics,
    read_progress,
    read_summary,
    write_online,
    write_site_names,
)

log = logging.getLogger("fedsilo.server")
CONNECTION = "fedsilo"  # the SuperLink connection name in the private FLWR_HOME
STARTUP_TIMEOUT_S = 60.0
ONLINE_EVERY_S = 2.0  # how often a running server asks the SuperLink who is online
# What a run reports as it goes: ("round", its metrics record) or a step of starting it
# ("superlink", "registered", "sites") with what the console shows of it.
Event = dict[str, Any] | RoundRecord
ProgressFn = Callable[[str, Event], None]


class RunFailed(FedsiloError):
    """The federated run ended without completing its rounds."""

    exit_code = 1


class RunStopped(RunFailed):
    """An operator stopped the run with Flower's `flwr stop`: resumable, nothing lost."""

    exit_code = 130  # as Ctrl-C or SIGTERM stop it


@dataclass(frozen=True)
class ServerOptions:
    """How the SuperLink listens and whom it waits for."""

    listen: str = "0.0.0.0"  # the Fleet API faces the sites
    fleet_port: int = 9092
    control_port: int = CONTROL_PORT
    wait_sites: int = 1  # start the run once this many sites are online
    metrics: tuple[str, int] | None = None  # (host, port) serving Prometheus metrics
    wait_timeout_s: float = 3600.0  # ... or give up after this long
    insecure: bool = False


def manifest() -> Path:
    """The installed fedsilo's Flower app manifest."""
    return Path(fedsilo.__file__).resolve().parent / "pyproject.toml"


# What a deployed federation runs. The package's own manifest names the apps of `flwr
# run .` (fedsilo.simulations.flwr_run: the same apps with virtual sites); the FAB this
# server sends names these instead.
DEPLOYED_APPS = {
    "serverapp": "fedsilo.server.server_app:app",
    "clientapp": "fedsilo.clients.client_app:app",
}


def write_app_dir(root: Path) -> Path:
    """A Flower app directory holding only the manifest, naming the deployed apps: the
    FAB carries no code."""
    app = root / "fedsilo"
    app.mkdir(parents=True, exist_ok=True)
    text = manifest().read_text("utf-8")
    # `flwr run .`'s file list: this directory has the manifest alone (Flower refuses a
    # pattern that matches nothing).
    text = re.sub(r"^fab-include = .*\n", "", text, flags=re.M)
    for key, value in DEPLOYED_APPS.items():
        line = re.compile(rf'^{key} = "[^"]*"$', flags=re.M)
        text, found = line.subn(f'{key} = "{value}"', text, count=1)
        if not found:
            raise ConfigError(f"The installed fedsilo's manifest ({manifest()}) names no {key}.")
    (app / "pyproject.toml").write_text(text, "utf-8")
    return app


def write_flwr_home(home: Path, kit: ServerKit, opts: ServerOptions) -> None:
    """A private FLWR_HOME whose config.toml points `flwr` at this SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "127.0.0.1:{opts.control_port}"',
    ]
    if opts.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{kit.ca.resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_run_config(path: Path, cfg: RunConfig) -> None:
    """The run config as a TOML file for `flwr run --run-config`."""
    lines = []
    for key, value in cfg.to_flwr().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a valid TOML basic string
        else:
            text = repr(value)
        lines.append(f'"{key}" = {text}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# flower-superlink with message contents in memory, link state in --database
# (fedsilo.flwr_adapter.superlink)
SUPERLINK = (sys.executable, "-m", "fedsilo.flwr_adapter.superlink")


def superlink_command(
    kit: ServerKit, opts: ServerOptions, *, fleet: str, database: Path
) -> list[str]:
    cmd = [
        *SUPERLINK,
        "--fleet-api-address",
        fleet,
        "--database",
        str(database),
        "--host",
        "127.0.0.1",
        "--port",
        str(opts.control_port),
        "--disable-runtime-dependency-installation",
    ]
    if opts.insecure:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(kit.ca.resolve()),
        "--ssl-certfile",
        str(kit.cert.resolve()),
        "--ssl-keyfile",
        str(kit.key.resolve()),
        "--enable-supernode-auth",
    ]


class Server:
    """The SuperLink and the `flwr` commands that drive it, for one run."""

    def __init__(self, kit: ServerKit, cfg: RunConfig, opts: ServerOptions) -> None:
        self.kit, self.cfg, self.opts = kit, cfg, opts
        self.run_dir = Path(cfg.run_dir)
        self.home = self.run_dir / "flwr-home"
        self.database = self.run_dir / "flwr-home" / "superlink.db"  # registered sites
        self.env = server_env(FLWR_HOME=str(self.home))
        self.children: list[subprocess.Popen[bytes]] = []
        self.superlink: subprocess.Popen[bytes] | None = None

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flower_bin("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start_superlink(self, fleet: str) -> subprocess.Popen[bytes]:
        """Start the SuperLink with its Fleet API on `fleet`; return once it answers."""
        proc = spawn(
            superlink_command(self.kit, self.opts, fleet=fleet, database=self.database),
            log_file=self.run_dir / "superlink.log",
            env=self.env,
            cwd=self.run_dir,
        )
        self.children.append(proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ConfigError(
                    f"flower-superlink exited with code {proc.returncode} at start:\n"
                    + tail(self.run_dir / "superlink.log")
                )
            if self._nodes() is not None:
                return proc
            time.sleep(0.5)
        raise ConfigError(
            f"flower-superlink did not answer within {STARTUP_TIMEOUT_S:.0f} s; see "
            f"{self.run_dir / 'superlink.log'}."
        )

    def start(self) -> dict[str, str]:
        """Allow-list the kit's sites, then open the Fleet API; return site -> node id.

        Sites are registered on a SuperLink whose Fleet API listens on a private
        loopback port, which is then restarted on the real port with the same state:
        a site that connects early is never refused for a key not yet registered.
        """
        check_port_free(self.opts.listen, self.opts.fleet_port, flag="--fleet-port")
        check_port_free("127.0.0.1", self.opts.control_port, flag="--control-port")
        write_flwr_home(self.home, self.kit, self.opts)
        ids: dict[str, str] = {}
        if not self.opts.insecure:
            staging = self.start_superlink(f"127.0.0.1:{free_port()}")
            ids = self.register_sites()
            stop(staging)
            self.children.remove(staging)
        self.superlink = self.start_superlink(f"{self.opts.listen}:{self.opts.fleet_port}")
        return ids

    def _nodes(self) -> list[dict[str, Any]] | None:
        """The SuperLink's nodes, or None while its Control API does not answer (asked in
        this process: `flwr supernode ls` cost 1.5 s of CPU a call)."""
        return list_nodes(self.home, CONNECTION)

    def online(self) -> int | None:
        """Sites connected now, or None while the SuperLink does not answer."""
        nodes = self._nodes()
        return None if nodes is None else sum(n.get("status") == "online" for n in nodes)

    def register_sites(self) -> dict[str, str]:
        """Allow-list every site key of the kit; return site name -> node id (asked in this
        process: `flwr supernode register` cost 1.5 s of CPU a site)."""
        ids = {}
        for name, pub in self.kit.sites.items():
            try:
                ids[name] = str(register_node(self.home, CONNECTION, pub.resolve(), name))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"Registering site {name!r} ({pub}) failed: {exc}") from None
        return ids

    def wait_for_sites(self, on_event: ProgressFn) -> None:
        deadline = time.monotonic() + self.opts.wait_timeout_s
        last = -1
        while True:
            self._check_superlink()
            online = self.online() or 0
            if online != last:
                on_event("sites", {"online": online, "wanted": self.opts.wait_sites})
                write_online(self.run_dir, last := online)
            if online >= self.opts.wait_sites:
                return
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"Only {online} of the {self.opts.wait_sites} sites needed came online "
                    f"within {self.opts.wait_timeout_s:.0f} s; no run was started."
                )
            time.sleep(1.0)

    def _check_superlink(self) -> None:
        proc = self.superlink
        if proc is not None and proc.poll() is not None:
            raise RunFailed(
                f"flower-superlink exited with code {proc.returncode}:\n"
                + tail(self.run_dir / "superlink.log")
            )

    def run(self, on_event: ProgressFn) -> Summary:
        """Submit the run, report its rounds, return summary.json's object."""
        app = write_app_dir(self.run_dir / "app")
        run_config = self.run_dir / "run-config.toml"
        write_run_config(run_config, self.cfg)
        # The CA the ServerApp checks the sites' signed secure-aggregation keys against.
        write_public(self.run_dir / FEDERATION_CA, self.kit.ca.read_bytes())
        proc = spawn(
            [
                *(flower_bin("flwr"), "run", str(app), CONNECTION),
                *("--run-config", str(run_config), "--stream"),
            ],
            log_file=self.run_dir / "run.log",
            env=self.env,
            cwd=self.run_dir,
        )
        self.children.append(proc)
        seen = len(read_metrics(self.run_dir)) if self.cfg.resume else 0
        started = read_progress(self.run_dir).started
        online, asked = -1, 0.0
        while True:
            done = proc.poll() is not None
            if time.monotonic() - asked >= ONLINE_EVERY_S:  # for the dashboard
                asked, now_online = time.monotonic(), self.online()
                if now_online is not None and now_online != online:
                    write_online(self.run_dir, online := now_online)
            now = read_progress(self.run_dir).started
            if now > started:  # progress.json is written before a round is sent
                on_event("round_start", {"round": now})
                started = now
            for record in read_metrics(self.run_dir)[seen:]:
                on_event("round", record)
                seen += 1
            if done:
                break
            self._check_superlink()
            time.sleep(0.5)
        summary = read_summary(self.run_dir)
        if summary is None and (flower_run := self.stopped_run()) is not None:
            completed = len(read_metrics(self.run_dir))
            raise RunStopped(
                f"The run was stopped (`flwr stop {flower_run}`) after round {completed} of "
                f"{self.cfg.rounds}; nothing is lost. Go on with `fedsilo server start --kit "
                f"{self.kit.path} --resume {self.run_dir}`."
            )
        if summary is None:
            raise RunFailed(
                f"The run ended without a summary (flwr run exit code {proc.returncode}):\n"
                + tail(self.run_dir / "run.log")
            )
        return summary

    def stopped_run(self) -> str | None:
        """The Flower run id of this run when Flower says it was stopped (`flwr stop`),
        else None: asked once, when `flwr run` ended without a summary."""
        try:
            with open(self.run_dir / "run.log", encoding="utf-8", errors="replace") as log:
                head = log.read(20_000)  # `flwr run` says it first
        except OSError:
            return None
        found = re.search(r"Successfully started run (\d+)", head)
        if found is None:
            return None
        res = self.flwr("ls", "--run-id", found[1], "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout)["runs"]
        except (ValueError, KeyError, TypeError):
            return None
        status = " ".join(str(run.get("status", "")) for run in runs if isinstance(run, dict))
        return found[1] if "stopped" in status else None

    def stop_all(self) -> None:
        for proc in reversed(self.children):
            stop(proc)


def start_server(
    kit: ServerKit, cfg: RunConfig, opts: ServerOptions, *, on_event: ProgressFn
) -> Summary:
    """Start the SuperLink, admit the kit's sites, run the federation; stop everything."""
    if not Path(cfg.run_dir).is_absolute():
        raise ConfigError(f"`run-dir` must be absolute for a deployed run. Found {cfg.run_dir!r}.")
    server = Server(kit, cfg, opts)
    if cfg.resume:  # the stopped SuperLink's state (its nodes, its Flower run) is not reused
        shutil.rmtree(server.home, ignore_errors=True)
        (server.run_dir / "summary.json").unlink(missing_ok=True)
    else:
        new_run_dir(server.run_dir)  # refuses a directory that holds a run
    server.run_dir.mkdir(parents=True, exist_ok=True)
    stop_metrics = (
        None
        if opts.metrics is None
        else exporter.serve(RunCollector(server.run_dir), *opts.metrics)
    )
    try:
        ids = server.start()
        # Who each authenticated node is: the ServerApp names sites from this, never
        # from their messages (with --insecure nothing is registered: node-<id>).
        write_site_names(server.run_dir, {int(node): site for site, node in ids.items()})
        if ids:
            on_event("registered", {"sites": sorted(ids)})
        on_event("superlink", {"fleet": f"{opts.listen}:{opts.fleet_port}"})
        server.wait_for_sites(on_event)
        return server.run(on_event)
    finally:
        server.stop_all()
        if stop_metrics is not None:
            stop_metrics()


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
