"""Distributed DP's faults in a real federation: sites killed in each stage of a round.

Six sites over TLS run `--dp distributed` with M = 3 (`--dp-min-sites 3`, and each
site's policy `distributed-min-sites = 3`). Each round one site dies at a failpoint
(fedsilo.clients.failpoint: it stops there, then the test kills its launcher, SuperNode
and ClientApps by PID, as a machine dying there would), and the server notices it by
its missed heartbeats:

  round 1  f, after its spend, before masking: left out of the sum, its masks removed
  round 2  e, after sending its masked vector: its input stays in the sum
  round 3  d, during unmasking (it signed the view): its input stays in the sum
  round 4  c, after its spend, before masking: a and b are left, fewer than M; the round
           releases nothing and the run stops cleanly

Every site's ledger says what it spent (each spend before anything left the site), the
run record says whose inputs each released sum holds, and the audit passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedsilo.cli import main
from tests.e2e.federation import (
    client,
    end_leftovers,
    fedsilo,
    free_port,
    leftovers,
    rounds,
    scrape,
    server,
    terminate_all,
    wait_for,
)

pytestmark = pytest.mark.slow
SITES = "abcdef"
# The site that dies in each round, and where (a failpoint: fedsilo.clients.failpoint).
KILLS = {
    "f": ("masked-input", 1),
    "e": ("consistency", 2),
    "d": ("unmask", 3),
    "c": ("masked-input", 4),
}


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Six provisioned sites whose policies allow distributed DP with M = 3."""
    monkeypatch.chdir(tmp_path)
    hosts = ["--server-host", "127.0.0.1"]
    assert main(["provision", "--out", "fed", *hosts, "--sites", ",".join(SITES)]) == 0
    assert main(["data", "split", "--dataset", "digits", "--sites", "6", "--out", "data"]) == 0
    for name in SITES:
        toml = tmp_path / "fed" / "sites" / name / "site.toml"
        text = toml.read_text()
        toml.write_text(text.replace("distributed-min-sites = 0", "distributed-min-sites = 3"))
    yield tmp_path
    left = leftovers(tmp_path, grace_s=10)
    end_leftovers(tmp_path)
    assert not left, f"processes left behind: {left}"


def kill_site(fed: Path, name: str) -> None:
    """SIGKILL for everything site `name` runs: launcher, SuperNode, ClientApps."""
    for pid, _ in leftovers(fed / "fed" / "sites" / name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sites_killed_in_each_stage_of_a_distributed_round(fed: Path) -> None:
    from fedsilo.privacy import ledger

    fleet = free_port()
    address = f"127.0.0.1:{fleet}"
    smallest = min(len(np.load(fed / f"data/site-{i}.npz")["y"]) for i in range(1, 7))
    srv = server(
        fed,
        fleet,
        *("--rounds", "5", "--min-sites", "3", "--wait-sites", "6", "--out", "run"),
        *("--dp", "distributed", "--dp-min-sites", "3", "--batch-size", "32"),
        *("--dp-max-sample-rate", f"{32 / smallest:.4f}", "--target-epsilon", "8"),
        *("--metrics-port", str(server_metrics := free_port())),
        *("--log-format", "json"),
    )
    markers = {name: fed / f"failpoint-{name}" for name in KILLS}
    site_metrics = free_port()
    sites = {
        name: client(
            fed,
            name,
            i,
            address,
            *(("--metrics-port", str(site_metrics)) if name == "a" else ()),
            *(("--log-format", "json") if name == "b" else ()),
            env={"FEDSILO_FAILPOINT": f"{KILLS[name][0]}:{KILLS[name][1]}:{markers[name]}"}
            if name in KILLS
            else None,
        )
        for i, name in enumerate(SITES, start=1)
    }
    try:
        for name in ("f", "e", "d", "c"):  # in round order
            wait_for(markers[name].exists, 400, f"site {name}'s failpoint", [srv, sites[name]])
            if name == "e":  # round 2 waits on e's signature: what Prometheus sees
                watch_round_2(server_metrics, site_metrics, fed)
            sites[name].kill_group()
            kill_site(fed, name)
        code = srv.wait(timeout=300)
        assert code != 0, srv.text()[-3000:]
    finally:
        terminate_all([sites["a"], sites["b"]])

    # The run record: whose inputs each released sum holds, who dropped where.
    done = rounds(fed / "run")
    assert [r["round"] for r in done] == [1, 2, 3]
    assert [r["sites"] for r in done] == [list("abcde"), list("abcde"), list("abcd")]
    assert [r["failed"] for r in done] == [["f"], ["e"], ["d"]]
    reasons = [r["reasons"][site] for r, site in zip(done, "fed", strict=True)]
    assert reasons[0].startswith("masked-input stage: "), reasons
    assert reasons[1].startswith("consistency stage, after its masked input arrived: "), reasons
    assert reasons[2].startswith("unmask stage, after its masked input arrived: "), reasons
    summary = json.loads((fed / "run" / "summary.json").read_text())
    assert summary["completed_rounds"] == 3, summary
    assert summary["stopped"], summary
    round4 = [(f["site"], f["reason"]) for f in summary["failures"] if f["round"] == 4]
    assert [s for s, _ in round4] == ["c"], round4
    assert round4[0][1].startswith("masked-input stage: "), round4
    assert "nothing was released" in summary["stopped"], summary

    # --log-format json: the server's and site b's stderr, one event object per line.
    events = [json.loads(line) for line in srv.text().splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["message", "registered", "listening"] and kinds[-1] == "end", kinds
    assert events[0]["message"].startswith("fedsilo server: 6 authorised site(s)")
    assert [e["round"] for e in events if e["event"] == "round_start"] == [1, 2, 3, 4]
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2, 3]
    failures = [(e["round"], e["site"], e["reason"]) for e in events if e["event"] == "failure"]
    assert [(r, s) for r, s, _ in failures] == [(1, "f"), (2, "e"), (3, "d"), (4, "c")]
    assert failures[1][2] == reasons[1] and failures[3][2] == round4[0][1]
    assert len([e for e in events if e["event"] == "reply"]) == 5 + 5 + 4
    end = events[-1]
    assert end["completed_rounds"] == 3 and end["stopped"] == summary["stopped"]
    assert "2 site(s) left after the masked-input stage, fewer than 3" in end["stopped"]
    site_b = [json.loads(line) for line in sites["b"].text().splitlines() if line.strip()]
    spends = [e for e in site_b if e["event"] == "spend"]
    assert [(e["site"], e["round"], e["mode"]) for e in spends] == [
        ("b", r, "distributed") for r in (1, 2, 3, 4)
    ]
    totals = [e["epsilon_total"] for e in spends]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    assert any(e["event"] == "status" and "stopped" in e["message"] for e in site_b)

    # Each ledger: a spend for every round the site reached its masked input in, each
    # under the run's assumption of M = 3; the audit recomputes and passes them all.
    run_id = json.loads((fed / "run" / "config.json").read_text())["run-id"]
    spent = {"a": 4, "b": 4, "c": 4, "d": 3, "e": 2, "f": 1}
    paths = []
    for name in SITES:
        path = fed / "fed" / "sites" / name / "ledger.jsonl"
        spends = [s for s in ledger.read(path).spends if s.run == run_id]
        assert [s.round for s in spends] == list(range(1, spent[name] + 1)), name
        assert {(s.mode, s.min_sites) for s in spends} == {("distributed", 3)}, name
        paths.append(str(path))
    res = fedsilo("audit", "run", *paths, "--json", cwd=fed)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {row["site"]: row for row in json.loads(res.stdout)["sites"]}
    assert {n: rows[n]["distributed_events"] for n in SITES} == spent
    assert all(rows[n]["status"] == "ok" for n in SITES), rows


def watch_round_2(server_port: int, site_port: int, fed: Path) -> None:
    """Round 1 is done without f; every live site spent round 2; e stands at its failpoint."""
    from fedsilo.privacy.audit import audit

    got = scrape(server_port)
    assert got["fedsilo_server_round", ()] == 1 and got["fedsilo_server_round_started", ()] == 2
    assert got["fedsilo_server_sites_online", ()] == 5  # f's death was noticed in round 1
    from fedsilo.server.run_dir import read_online  # what the dashboard shows

    online = read_online(fed / "run")
    assert online is not None and online[0] == 5, online
    assert got["fedsilo_server_replies_total", (("outcome", "failed"), ("site", "f"))] == 1
    for name in "abcde":
        assert got["fedsilo_server_replies_total", (("outcome", "accepted"), ("site", name))] == 1
    first = rounds(fed / "run")[0]
    assert got["fedsilo_server_accuracy", ()] == first["accuracy"]
    site = scrape(site_port)  # site a's own ledger: its total spend, which stays on site a
    found = audit(fed / "fed" / "sites" / "a" / "ledger.jsonl")
    assert site["fedsilo_site_rounds_trained_total", ()] == found.events == 2
    assert site["fedsilo_site_epsilon", (("accountant", "budget"),)] == found.epsilon
    assert site["fedsilo_site_budget_left_epsilon", ()] == found.remaining
    assert site["fedsilo_site_ledger_ok", ()] == 1
