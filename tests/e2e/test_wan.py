"""A federation over a wide-area path: server and two sites in network namespaces of
their own, 100 Mbit/s links and 25 ms each way between every site and the server
(tests/e2e/wan.py), TLS and site authentication on, as on a real WAN."""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.cli import main
from tests.e2e import wan
from tests.e2e.federation import Proc, end_leftovers, free_port, leftovers, terminate_all

pytestmark = pytest.mark.slow


@pytest.fixture
def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[wan.Wan]:
    why = wan.available()
    if why:
        pytest.skip(f"no WAN on this machine: {why}")
    monkeypatch.chdir(tmp_path)
    with wan.Wan(2) as network:
        yield network
    left = leftovers(tmp_path, grace_s=10)
    end_leftovers(tmp_path)
    assert not left, f"processes left behind: {left}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in network.namespaces)  # removed


def test_two_sites_over_a_25ms_100mbit_wan(net: wan.Wan, tmp_path: Path) -> None:
    # The path is what it claims: shaped links, 25 ms each way through the relay.
    for ns in (net.server_ns, net.middle_ns, *net.site_ns):
        assert "tbf" in net.qdiscs(ns) and "rate 100Mbit" in net.qdiscs(ns)
    # (Ports are free in a fresh namespace; free_port() just keeps them apart.)
    probe, probe_relay, fleet, relay = (free_port() for _ in range(4))
    prober = subprocess.Popen([*net.exec_prefix(net.server_ns), *wan.probe_command(probe)])
    try:
        net.start_relay(probe_relay, probe, tmp_path / "relay.log")
        site1 = net.exec_prefix(net.site_ns[0])
        rtt = wan.round_trip_ms(net.relay_ips[0], probe_relay, site1)
        assert 2 * wan.DELAY_MS <= rtt < 2 * wan.DELAY_MS + 40, rtt
        seconds = wan.bulk_seconds(net.relay_ips[0], probe_relay, site1, 5_000_000)
        assert seconds >= 5_000_000 * 8 / 100e6, seconds  # no faster than 100 Mbit/s
    finally:
        prober.kill()
        prober.wait()

    hosts = [a for ip_ in net.relay_ips for a in ("--server-host", ip_)]
    assert main(["provision", "--out", "fed", *hosts, "--sites", "a,b"]) == 0
    assert main(["data", "split", "--dataset", "digits", "--sites", "2", "--out", "data"]) == 0
    net.start_relay(relay, fleet, tmp_path / "relay.log")
    srv = Proc(
        tmp_path, "server", "server", "start", "--kit", "fed/server",
        "--listen", net.server_ip, "--fleet-port", str(fleet), "--rounds", "3",
        "--eval-data", "data/server-eval.npz", "--out", "run",
        prefix=net.exec_prefix(net.server_ns),
    )  # fmt: skip
    site_args = ("--device", "cpu", "--threads", "1")
    sites = [
        Proc(
            tmp_path,
            f"client-{name}",
            *("client", "start", "--kit", f"fed/sites/{name}", "--data", f"data/site-{i + 1}.npz"),
            *("--server", f"{net.relay_ips[i]}:{relay}", *site_args),
            prefix=net.exec_prefix(net.site_ns[i]),
        )
        for i, name in enumerate(("a", "b"))
    ]
    try:
        assert srv.wait(timeout=400) == 0, srv.text()[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["sites"] for r in records] == [["a", "b"]] * 3
        assert summary["final"]["accuracy"] > 0.7
        later = statistics.median(r["seconds"] for r in records[1:])
        # A round is at least a model down and an update up: 2 x 25 ms of path alone.
        assert later >= 2 * wan.DELAY_MS / 1000
        print(f"WAN round time: round 1 {records[0]['seconds']:.2f} s, later {later:.2f} s")
    finally:
        terminate_all(sites)
