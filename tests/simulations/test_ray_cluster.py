"""`fedsilo simulate --ray-address` on a real two-node Ray cluster started on this machine.

The cluster (`ray.cluster_utils.Cluster`: a head and a second node, one CPU each) lives
for this module; its processes, and every Ray process a run here starts, carry the
module's RAY_TMPDIR, which also keeps the cluster's address file away from any other
`ray.init()` on the machine. Teardown stops the cluster and fails on any survivor.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.federation import end_leftovers, fedsilo, leftovers

pytestmark = pytest.mark.slow
FEDSILO = (sys.executable, "-m", "fedsilo")
RAY_EXIT_GRACE_S = 60.0
SETTINGS = ("--sites", "4", "--rounds", "2", "--seed", "3", "--local-epochs", "1")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    # Short: Ray's socket paths under it must fit in 107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-ray-", dir="/tmp"))
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(tmp)
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        # A Ray worker exits on its own once it sees its raylet gone; on a fully loaded
        # machine (the whole suite on two cores) one ClientAppActor once took over 15 s.
        # A worker still alive after a minute is a leak, and fails the module.
        left = leftovers(tmp, grace_s=RAY_EXIT_GRACE_S)
        end_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"alive {RAY_EXIT_GRACE_S:.0f} s after the cluster stopped: {left}"


def simulate(tmp: Path, name: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsilo", "simulate", "--json", "--out", str(tmp / name), *args],
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary: dict[str, Any] = json.loads(out)
    return summary


def test_sites_run_on_both_nodes_and_compute_what_a_local_run_does(
    ray_cluster: Any, tmp_path: Path
) -> None:
    """Where a site runs changes nothing it computes: each site's data, noise and thread
    count come from the seed and --site-cpus, and the server aggregates replies in site
    order, so the two runs are bit-identical. (This is also the suite's check that one
    seed gives one result: a run that was not reproducible would fail here.)"""
    import torch

    # Both at once: each run mostly waits on its engine, and 2 CPUs is enough for both.
    local = simulate(tmp_path, "local", *SETTINGS)
    remote = simulate(tmp_path, "cluster", *SETTINGS, "--ray-address", ray_cluster.address)
    here, there = result(local), result(remote)

    assert there["ray"]["address"] == ray_cluster.address
    assert there["ray"]["nodes"] == 2
    per_node = there["ray"]["sites_per_node"]
    assert len(per_node) == 2 and all(n >= 1 for n in per_node.values()), per_node
    assert sorted(there["ray"]["site_nodes"]) == ["site-0", "site-1", "site-2", "site-3"]
    assert here["ray"]["address"] == "local" and here["ray"]["nodes"] == 1
    # The same numbers, to the last bit (ledger heads hash when each spend was written).
    assert there["rounds"] == here["rounds"] and there["final"] == here["final"]
    for out in (here, there):
        for site in out["sites"]:
            assert len(site.pop("ledger_head")) == 64
    assert there["sites"] == here["sites"]
    assert there["final"]["accuracy"] >= 0.5  # digits, epsilon 8, 2 short rounds
    models = [torch.load(Path(o["run_dir"]) / "final_model.pt") for o in (here, there)]
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])

    run_dir = Path(there["run_dir"])
    assert json.loads((run_dir / "simulation.json").read_text()) == {
        "schema": 1,
        "sites": 4,
        "site-cpus": 1.0,
        "site-gpus": 0.0,
    }
    assert json.loads((run_dir / "summary.json").read_text())["ray"] == there["ray"]
    assert not (run_dir / ".fedsilo-node-check").exists()
    audit = fedsilo("audit", str(run_dir), "--json", cwd=tmp_path)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # fedsilo left the cluster it joined, without stopping it.
    assert ray_cluster.head_node.remaining_processes_alive()
    assert all(node.remaining_processes_alive() for node in ray_cluster.worker_nodes)


def test_a_node_that_cannot_see_run_dir_stops_the_run_and_is_named(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both nodes here share /tmp, so the second node is made to look elsewhere: its
    check reads the marker at a path it does not have, as a node would whose RUN_DIR
    is a local folder of the same name."""
    import ray

    from fedsilo.config import RunConfig
    from fedsilo.errors import ConfigError
    from fedsilo.flwr_adapter.engine import actor_pool_size
    from fedsilo.simulations import cluster
    from fedsilo.simulations.engine import EngineConfig

    real = cluster._node_probe
    engine = EngineConfig(ray_address=ray_cluster.address)
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cluster.connect(engine, verbose=False)
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        head = next(i for i, n in nodes.items() if "node:__internal_head__" in n["Resources"])
        (other,) = set(nodes) - {head}
        assert set(cluster.check_nodes(Path(cfg.run_dir), cfg)) == {head, other}

        def unshared() -> Any:
            probe = real()

            def on_node(marker: str, *rest: Any) -> Any:
                import ray

                if ray.get_runtime_context().get_node_id() == other:
                    marker += ".on-a-disk-of-its-own"
                return probe(marker, *rest)

            return on_node

        monkeypatch.setattr(cluster, "_node_probe", unshared)
        with pytest.raises(ConfigError) as err:
            cluster.check_nodes(Path(cfg.run_dir), cfg)
        # What a one-CPU-per-node cluster says to two CPUs a site.
        big = EngineConfig(ray_address=ray_cluster.address, site_cpus=2)
        workers = actor_pool_size(big.client_resources())
        with pytest.raises(ConfigError) as too_big:
            cluster.check_cluster_capacity(big, workers, cluster.node_labels())
        assert actor_pool_size(engine.client_resources()) == 2
    finally:
        cluster.disconnect()
    message = str(err.value)
    assert message.startswith(f"Ray node {nodes[other]['NodeManagerAddress']}/{other[:8]}: ")
    assert "cannot read" in message and head[:8] not in message and "\n" not in message
    assert "--out /shared/runs/x" in message
    assert not (tmp_path / "run" / cluster.MARKER_FILE).exists()
    assert workers == 0 and "--site-cpus 2 and --site-gpus 0" in str(too_big.value)
    assert "1 CPU, 0 GPU" in str(too_big.value)


def test_a_node_without_fedsilo_can_run_the_check_and_says_so(tmp_path: Path) -> None:
    """Ray ships the check by value: it must run where `import fedsilo` fails."""
    import ray.cloudpickle as cloudpickle

    from fedsilo.simulations.cluster import _node_probe

    (tmp_path / "probe.pkl").write_bytes(cloudpickle.dumps(_node_probe()))
    (tmp_path / "marker").write_text("token")
    script = (
        "import json, pickle, sys\n"
        "sys.modules['fedsilo'] = None  # not installed on this node\n"
        "probe = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "print(json.dumps(probe(sys.argv[2], 'token', sys.argv[3], ['no_such_task_pkg'])))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, *(str(tmp_path / n) for n in ("probe.pkl", "marker", ""))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout)
    assert "error" in facts["modules"]["fedsilo"] and facts["modules"]["flwr"]["version"]
    assert facts["marker"] == "ok" and facts["no_access"] == []
    assert "ModuleNotFoundError" in facts["modules"]["no_such_task_pkg"]["error"]


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return " ".join(res.stderr.split())


def test_an_unreachable_address_fails_at_once_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    res = subprocess.run(
        [
            *FEDSILO,
            "simulate",
            "--out",
            str(tmp_path / "run"),
            "--ray-address",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - t0 < 30
    text = one_line_error(res)
    assert f"No Ray cluster answers at `--ray-address` 127.0.0.1:{port}" in text
    assert "ray start --head" in text
    assert not (tmp_path / "r").exists()  # nothing was loaded or written


def test_a_port_that_is_not_a_ray_head_fails_within_the_time_limit(tmp_path: Path) -> None:
    """Ray itself retries such a port for about 10 minutes."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts connections, never answers
        port = server.getsockname()[1]
        script = (
            "import sys\n"
            "from fedsilo.simulations import cluster\n"
            "from fedsilo.simulations.engine import EngineConfig\n"
            "try:\n"
            "    cluster.connect(EngineConfig(ray_address=sys.argv[1]), verbose=False,"
            " timeout_s=3)\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n"
        )
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-c", script, f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - t0
    assert res.stdout.startswith("ConfigError "), res.stdout + res.stderr[-2000:]
    assert "accepts connections, but no Ray cluster answered within 3 s" in res.stdout
    assert res.returncode == 0 and took < 30, took
