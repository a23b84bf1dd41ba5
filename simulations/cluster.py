"""`fedsilo simulate --ray-address`: join a running Ray cluster and check its nodes.

On a cluster (`--ray-address HOST:PORT`, what `ray start --head` prints) each
virtual site reads its policy and appends to its ledger under RUN_DIR/ledgers from
whichever node runs it. Before the engine starts, `check_nodes` runs one tiny task on
every alive node (NodeAffinitySchedulingStrategy) that reads a marker the driver
just wrote in RUN_DIR and imports fedsilo, so a RUN_DIR that is not on a shared
filesystem, or a node without fedsilo or the task's package, stops the run with one
line that names the node and the fix, instead of sites failing later. The dataset
itself is needed only here: preflight decodes the training pool once into RUN_DIR,
and every site maps it from there (fedsilo.simulations.sites).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import fedsilo
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.flwr_adapter import TELEMETRY_OFF
from fedsilo.privacy import provision
from fedsilo.simulations.engine import EngineConfig, parse_address
from fedsilo.simulations.ledgers import LEDGER_DIR

# ray.init against a port that accepts connections but is no Ray head retries for
# about 10 minutes (20 tries of ~35 s in Ray 2.55); a healthy cluster answers in ~1 s.
RAY_INIT_TIMEOUT_S = 60.0
NODE_CHECK_TIMEOUT_S = 120.0  # the first task on a node starts a Python worker there
MARKER_FILE = ".fedsilo-node-check"
SHARED_FIX = (
    "put RUN_DIR on a filesystem every node mounts at the same path, e.g. --out /shared/runs/x"
)


def connect(engine: EngineConfig, *, verbose: bool, timeout_s: float = RAY_INIT_TIMEOUT_S) -> None:
    """Connect this process to the Ray cluster at `engine.ray_address`; ConfigError if none.

    Call `check_engine` first: it fails fast where nothing listens at the address.

    Flower's engine then uses this connection: it starts Ray itself only when none is
    open, and ends the run with `ray.shutdown()`, which disconnects a driver from a
    cluster it joined without stopping the cluster.
    """
    import ray  # lazy, here and below: `fedsilo --help` imports this module; ray takes 0.19 s

    address = engine.ray_address
    hostport = parse_address(address)
    if hostport is not None and not _speaks_grpc(hostport, timeout_s):
        raise _no_ray_answered(address, timeout_s)
    # Workers on other machines do not inherit this process's environment: send it.
    env = {**engine.worker_env(), **TELEMETRY_OFF}
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(
                address=address,
                runtime_env={"env_vars": env},
                logging_level=logging.INFO if verbose else logging.ERROR,
                log_to_driver=verbose,
            )
            outcome.append(None)
        except BaseException as exc:  # reported by the caller's thread
            outcome.append(exc)

    # Ray's own connect has no time limit we can set: wait for it in a daemon thread.
    thread = threading.Thread(target=init, name="fedsilo-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _no_ray_answered(address, timeout_s)
    failed = outcome[0]
    if failed is not None:
        if address == "auto" and isinstance(failed, ConnectionError):
            raise ConfigError(
                "`--ray-address auto` found no Ray cluster started on this machine. Start one "
                "with `ray start --head`, or give the head's HOST:PORT."
            ) from None
        raise ConfigError(
            f"Could not join the Ray cluster at `--ray-address` {address}: {one_line(failed)}"
        ) from None


def _speaks_grpc(hostport: tuple[str, int], timeout_s: float) -> bool:
    """Whether the server at `hostport` completes a gRPC (HTTP/2) handshake in time.

    A Ray head's GCS port does at once. Anything else (a web server, a port that accepts
    connections and never answers) is found here, before ray.init, whose own retries
    would leave a thread inside Ray's C++ client when this process exits (seen to end
    the process with SIGSEGV). With Ray's own TLS on (RAY_USE_TLS), a plaintext
    handshake cannot tell: ray.init alone decides.
    """
    import grpc  # lazy: see connect

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    channel = grpc.insecure_channel(provision.address(*hostport))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def _no_ray_answered(address: str, timeout_s: float) -> ConfigError:
    return ConfigError(
        f"`--ray-address` {address} accepts connections, but no Ray cluster answered within "
        f"{timeout_s:g} s. Give the port of the head's GCS (`ray start --head` prints it; "
        "6379 by default)."
    )


def disconnect() -> None:
    """Leave the cluster (the cluster itself keeps running)."""
    import ray  # lazy: see connect

    if ray.is_initialized():
        ray.shutdown()


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------- node check
def _node_probe() -> Callable[..., dict[str, Any]]:
    """The check each node runs. A nested function: Ray ships it by value, so a node
    without fedsilo can still run it and say so."""

    def probe(marker: str, token: str, ledgers: str, modules: list[str]) -> Any:
        import importlib  # inside: shipped by value to nodes that may lack fedsilo
        import os

        facts: dict[str, Any] = {"modules": {}}
        try:
            with open(marker, encoding="utf-8") as f:
                facts["marker"] = "ok" if f.read() == token else "another run's marker"
        except OSError as exc:
            facts["marker"] = type(exc).__name__
        # The sites append to their ledgers and share the decoded pool and features in
        # ledgers/feature-cache (owner-only): the user running Ray here needs all of it.
        names = os.listdir(ledgers) if os.path.isdir(ledgers) else []
        paths = [ledgers, *(os.path.join(ledgers, n) for n in sorted(names))]
        rw = os.R_OK | os.W_OK
        facts["no_access"] = [p for p in paths if not os.access(p, rw)]
        for name in ("fedsilo", "flwr", *modules):
            try:
                module = importlib.import_module(name)
                facts["modules"][name] = {"version": str(getattr(module, "__version__", ""))}
            except Exception as exc:
                facts["modules"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        return facts

    return probe


def node_label(node_id: str, address: str) -> str:
    """How summaries and errors name a Ray node: its IP and the first 8 hex of its id."""
    return f"{address}/{node_id[:8]}"


def node_labels() -> dict[str, str]:
    """{node id: label} of the connected cluster's alive nodes."""
    import ray  # lazy: see connect

    return {
        n["NodeID"]: node_label(n["NodeID"], n["NodeManagerAddress"])
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n.get("Alive")
    }


def check_nodes(
    run_dir: Path, cfg: RunConfig, *, timeout_s: float = NODE_CHECK_TIMEOUT_S
) -> dict[str, str]:
    """Check every alive node can run a virtual site of this run; return node_labels().

    Raises ConfigError naming the nodes that cannot read RUN_DIR (a marker written here),
    write its ledgers, import fedsilo and flwr at this machine's versions, import the
    task's package.
    """
    import flwr  # lazy: see connect (flwr: 0.1 s)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    labels = node_labels()
    ledgers = run_dir / LEDGER_DIR
    ledgers.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER_FILE
    token = secrets.token_hex(16)
    marker.write_text(token, encoding="utf-8")
    modules = [cfg.task.partition(":")[0]] if cfg.task else []
    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe())
    try:
        refs = {
            node: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(str(marker), token, str(ledgers), modules)
            for node in labels
        }
        ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for ref in late:
            ray.cancel(ref)
        answered = set(ready)
        problems: dict[str, list[str]] = {}
        for node, ref in refs.items():
            if ref not in answered:
                found = [f"did not run fedsilo's check within {timeout_s:g} s (overloaded?)"]
            else:
                try:
                    facts = ray.get(ref)
                except Exception as exc:
                    found = [f"could not run fedsilo's check ({one_line(exc)})"]
                else:
                    expect = {"fedsilo": fedsilo.__version__, "flwr": flwr.__version__}
                    found = node_problems(facts, marker=marker, ledgers=ledgers, expect=expect)
            for problem in found:
                problems.setdefault(problem, []).append(labels[node])
    finally:
        marker.unlink(missing_ok=True)
    if problems:
        raise ConfigError(
            " ".join(
                f"Ray node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}: {problem}."
                for problem, nodes in problems.items()
            )
        )
    return labels


def node_problems(
    facts: Mapping[str, Any], *, marker: Path, ledgers: Path, expect: Mapping[str, str]
) -> list[str]:
    """What keeps a node from running virtual sites, from its probe's facts, with the fix."""
    problems = []
    if facts["marker"] != "ok":
        problems.append(
            f"cannot read {marker} ({facts['marker']}), so its sites could not keep their "
            f"ledgers in RUN_DIR; {SHARED_FIX}"
        )
    elif facts["no_access"]:
        first, more = facts["no_access"][0], len(facts["no_access"]) - 1
        problems.append(
            f"cannot read and write {first}{f' and {more} more' if more else ''}: run Ray on "
            "every node as the user that owns RUN_DIR (here), or give that user access"
        )
    modules = facts["modules"]
    for name, want in expect.items():
        got = modules.get(name, {})
        if "error" in got:
            problems.append(
                f"cannot import {name} ({got['error']}): install {name} {want} on every node, "
                "in the Python that runs `ray start` there"
            )
        elif got.get("version") != want:
            problems.append(
                f"has {name} {got.get('version')} and this machine {want}: install the same "
                "version on every node"
            )
    for name, got in modules.items():
        if name not in expect and "error" in got:
            problems.append(
                f"cannot import {name}, the task's package ({got['error']}): install it on "
                "every node"
            )
    return problems


def check_cluster_capacity(engine: EngineConfig, workers: int, labels: Mapping[str, str]) -> None:
    """Raise ConfigError when no node of the cluster can host one site's actor."""
    if workers > 0:
        return
    import ray  # lazy: see connect

    have = "; ".join(
        f"{labels[n['NodeID']]}: {n['Resources'].get('CPU', 0):g} CPU, "
        f"{n['Resources'].get('GPU', 0):g} GPU"
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n["NodeID"] in labels
    )
    raise ConfigError(
        f"No node of the Ray cluster at {engine.ray_address} can hold a site with "
        f"--site-cpus {engine.site_cpus:g} and --site-gpus {engine.site_gpus:g} ({have}). "
        "Lower them, or add nodes with `ray start --address HEAD:PORT`."
    )


# ---------------------------------------------------------------- where sites ran
def placement_summary(
    engine: EngineConfig, site_nodes: Mapping[int, set[str]], addresses: Mapping[str, str]
) -> dict[str, Any]:
    """summary.json's `ray` entry: the engine and the node(s) each virtual site ran on.

    Flower's Ray backend hands each message to whichever of its actors is idle, so a
    site can run on several nodes over a run: `sites_per_node` counts the sites that
    ran at least one message on each node.
    """
    sites = {
        f"site-{pid}": sorted(node_label(node, addresses.get(node, "?")) for node in nodes)
        for pid, nodes in sorted(site_nodes.items())
    }
    per_node: dict[str, int] = {}
    for nodes in sites.values():
        for node in nodes:
            per_node[node] = per_node.get(node, 0) + 1
    return {
        "address": engine.ray_address or "local",
        "site_cpus": engine.site_cpus,
        "site_gpus": engine.site_gpus,
        "nodes": len(per_node),
        "sites_per_node": dict(sorted(per_node.items())),
        "site_nodes": sites,
    }


def placement_line(ray_entry: Mapping[str, Any]) -> str:
    """The console's line: how many Ray nodes the sites ran on, and how many on each."""
    nodes = int(ray_entry["nodes"])
    each = ", ".join(f"{node}: {n}" for node, n in ray_entry["sites_per_node"].items())
    where = "node" if nodes == 1 else "nodes"
    return f"sites ran on {nodes} Ray {where} of {ray_entry['address']} ({each})"
