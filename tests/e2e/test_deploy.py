"""A real federation on loopback: `fedsilo provision`, `fedsilo server start`, three
`fedsilo client start` processes over TLS with SuperNode authentication.

Each test starts real flower-superlink/flower-supernode processes on free ports,
each process with its own FLWR_HOME under tmp_path, and checks at the end that no
process it started (nor their flower-superexec/flwr-*app children) is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsilo.cli import main
from tests.e2e.federation import (
    Proc,
    TLSSniffer,
    client,
    end_leftovers,
    free_port,
    leftovers,
    rounds,
    server,
    terminate_all,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A provisioned federation (sites a, b, c) and digits split three ways."""
    monkeypatch.chdir(tmp_path)
    hosts = ["--server-host", "localhost", "--server-host", "127.0.0.1"]
    assert main(["provision", "--out", "fed", *hosts, "--sites", "a,b,c"]) == 0
    assert main(["data", "split", "--dataset", "digits", "--sites", "3", "--out", "data"]) == 0
    yield tmp_path
    left = leftovers(tmp_path, grace_s=10)
    end_leftovers(tmp_path)
    assert not left, f"processes left behind: {left}"


def test_three_sites_over_tls_then_one_is_lost(fed: Path) -> None:
    """Rounds 1-2: three sites over TLS. Then site c's machine dies; round 3 completes
    with a and b (min-sites 2) and the run directory records c's failure. The sites send
    their updates in int8 (--update-codec), a quarter of the model's bytes."""
    fleet = free_port()
    sniffer = TLSSniffer(fleet)  # site a dials through it: we see the bytes on the wire
    srv = server(
        fed,
        fleet,
        *("--rounds", "3", "--min-sites", "2", "--wait-sites", "3", "--out", "run"),
        *("--eval-data", "data/server-eval.npz", "--update-codec", "int8"),
    )
    sites = {
        "a": client(fed, "a", 1, f"127.0.0.1:{sniffer.port}"),
        "b": client(fed, "b", 2, f"127.0.0.1:{fleet}"),
        "c": client(fed, "c", 3, f"localhost:{fleet}"),
    }
    try:
        wait_for(lambda: len(rounds(fed / "run")) >= 2, 400, "round 2", [srv, *sites.values()])
        # No Flower process fedsilo started posts telemetry (SuperLink, SuperNodes, their
        # SuperExecs, ServerApp, ClientApps): a site talks to its federation only.
        flower = [pid for pid, cmd in leftovers(fed) if "flwr" in cmd or "flower" in cmd]
        assert len(flower) >= 4
        # The server's (SuperLink, its SuperExec, the ServerApp) hold their memory in two
        # malloc arenas (fedsilo.processes.SERVER_MALLOC); the sites' are left as they are.
        # An operator's own MALLOC_ARENA_MAX (this test's environment) is kept everywhere.
        on_sites = {pid for pid, _ in leftovers(fed / "fed" / "sites")}
        own = os.environ.get("MALLOC_ARENA_MAX")
        server_side = 0
        for pid in flower:
            with contextlib.suppress(FileNotFoundError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                assert b"FLWR_TELEMETRY_ENABLED=0" in environ, pid
                arenas = next(
                    (e.split(b"=", 1)[1].decode() for e in environ
                     if e.startswith(b"MALLOC_ARENA_MAX=")),
                    None,
                )  # fmt: skip
                assert arenas == (own if pid in on_sites else own or "2"), pid
                server_side += pid not in on_sites
        assert server_side >= 2  # the SuperLink and its ServerApp, at least
        # Site c's machine dies: SIGKILL for its launcher, SuperNode and ClientApps.
        site_c = [pid for pid, _ in leftovers(fed / "fed" / "sites" / "c")]
        assert site_c, "site c runs no process"
        sites["c"].kill_group()
        for pid in site_c:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: len(rounds(fed / "run")) >= 3, 120, "round 3", [srv])
        # Found dead by its missed heartbeats (2 x 10 s) and the round goes on: Flower's
        # own 2 x 30 s took about 60 s. 5 s of slack for a loaded 2-core machine.
        noticed = time.monotonic() - killed
        assert noticed < 25, f"site c's death took {noticed:.1f} s to notice"
        code = srv.wait(timeout=300)
        assert code == 0, srv.text()[-4000:]

        done = rounds(fed / "run")
        assert [r["round"] for r in done] == [1, 2, 3]
        assert done[0]["sites"] == done[1]["sites"] == ["a", "b", "c"]
        assert done[0]["failed"] == done[1]["failed"] == []
        assert done[2]["sites"] == ["a", "b"] and done[2]["failed"] == ["c"]
        summary = json.loads((fed / "run" / "summary.json").read_text())
        assert summary["completed_rounds"] == 3
        assert [(f["site"], f["round"]) for f in summary["failures"]] == [("c", 3)]
        assert "heartbeat" in summary["failures"][0]["reason"]
        assert summary["final"]["accuracy"] >= 0.6  # central, on the server's own file
        assert all(r["accuracy"] > 0 for r in done)
        assert sorted(s["site"] for s in summary["sites"]) == ["a", "b", "c"]
        assert all(0 < s["epsilon"] <= 8.0 for s in summary["sites"])
        assert (fed / "run" / "final_model.pt").is_file()
        # int8 updates: each site sent about a quarter of what it received (the model).
        status = json.loads((fed / "fed" / "sites" / "a" / "ledger.status.json").read_text())
        assert status["bytes_sent_total"] < status["bytes_received_total"] / 3
        assert json.loads((fed / "run" / "config.json").read_text())["eval-data"] == str(
            (fed / "data" / "server-eval.npz").resolve()
        )
        # The console says, as it happens, which site failed and why.
        assert "round 3: accuracy" in srv.text() and "c failed: " in srv.text()
        # Every connection site a opened to the Fleet API began with a TLS handshake
        # record (content type 0x16, version 0x03 0x0N): nothing went in clear text.
        assert sniffer.first_bytes, "site a never connected through the relay"
        assert all(b[:2] == b"\x16\x03" for b in sniffer.first_bytes), sniffer.first_bytes
        # No code travelled with the run: the app installed at the site is the manifest.
        (app,) = (fed / "fed" / "sites" / "a" / "flwr-home" / "apps").iterdir()
        installed = {p.name for p in app.rglob("*") if p.is_file()}
        assert "pyproject.toml" in installed and not any(n.endswith(".py") for n in installed)
    finally:
        terminate_all([sites["a"], sites["b"]])  # each a clean stop
        sniffer.close()
    for name in ("a", "b"):
        assert "stopped" in sites[name].text()


def test_only_authorised_sites_with_the_federation_ca_and_tls_get_in(fed: Path) -> None:
    # Site c was provisioned, but the server kit no longer authorises its key.
    (fed / "fed" / "server" / "sites" / "c.pub").unlink()
    # A second, unrelated federation: same site name, another CA.
    assert main(["provision", "--out", "other", "--server-host", "127.0.0.1", "--sites", "a"]) == 0
    fleet = free_port()
    srv = server(fed, fleet, "--min-sites", "1", "--out", "run")
    address = f"127.0.0.1:{fleet}"
    # Three sites that must not get in, started at once (each waits for the server).
    intruder = client(fed, "c", 3, address)
    foreign = Proc(
        fed, "client-foreign", "client", "start", "--kit", "other/sites/a",
        "--data", "data/site-1.npz", "--server", address,
    )  # fmt: skip
    plain = client(fed, "a", 1, address, "--insecure")
    try:
        assert intruder.wait(timeout=240) != 0
        out = intruder.text()
        assert "error: The server refused this site" in out and "Traceback" not in out
        assert "Receiving: train message" not in (fed / "fed/sites/c/supernode.log").read_text()
        assert not (fed / "fed" / "sites" / "c" / "flwr-home" / "apps").exists()

        assert foreign.wait(timeout=240) != 0
        assert "error: TLS: the server at" in foreign.text()
        assert "did not sign" in foreign.text()

        assert plain.wait(timeout=240) != 0
        assert "WARNING: --insecure" in plain.text()
        assert "speaks TLS but this site was started with --insecure" in plain.text()
    finally:
        assert srv.terminate() == 130, srv.text()[-3000:]  # SIGTERM stops it, and its children
    assert "interrupted" in srv.text()
    assert not (fed / "run" / "summary.json").exists()


def test_insecure_server_refuses_secure_site(fed: Path) -> None:
    fleet = free_port()
    srv = server(fed, fleet, "--insecure", "--out", "run")
    try:
        wait_for(lambda: "listening for sites" in srv.text(), 120, "the server", [srv])
        assert "WARNING: --insecure: no TLS and no site authentication" in srv.text()
        secure = client(fed, "a", 1, f"127.0.0.1:{fleet}")
        assert secure.wait(timeout=120) != 0
        assert "error: TLS: the server at" in secure.text()
        assert "does not speak TLS" in secure.text() and "--insecure" in secure.text()
    finally:
        srv.terminate()


def test_slow_but_live_sites_are_not_taken_for_dead(fed: Path) -> None:
    """A round longer than the 20 s in which a silent site is declared dead: the site's
    heartbeats go on while it trains (one thread, all of a core), so it finishes the
    round and is not failed. One site: a second would only burn the other core."""
    (fed / "slow.toml").write_text("rounds = 1\nlocal-epochs = 6000\n")
    fleet = free_port()
    srv = server(fed, fleet, "--config", "slow.toml", "--min-sites", "1", "--out", "run")
    sites = [client(fed, "a", 1, f"127.0.0.1:{fleet}")]
    try:
        assert srv.wait(timeout=400) == 0, srv.text()[-3000:]
        (done,) = rounds(fed / "run")
        assert done["seconds"] > 20, f"the round took {done['seconds']:.1f} s: not slow enough"
        assert done["sites"] == ["a"] and done["failed"] == []
    finally:
        terminate_all(sites)


def test_a_killed_site_started_again_rejoins_and_its_ledger_counts_once(fed: Path) -> None:
    """Site b's machine dies after round 1 and its operator starts it again at once,
    inside the window in which the server still counts the dead session online: the
    site retries instead of failing, rejoins, and its ledger has one spend per round it
    trained."""
    from fedsilo.privacy import ledger

    fleet = free_port()
    address = f"127.0.0.1:{fleet}"
    srv = server(
        fed, fleet, "--rounds", "15", "--min-sites", "1", "--wait-sites", "2", "--out", "run"
    )
    run_dir = fed / "run"
    site_a = client(fed, "a", 1, address)
    site_b = client(fed, "b", 2, address)
    again = None
    try:
        wait_for(lambda: len(rounds(run_dir)) >= 1, 300, "round 1", [srv, site_a, site_b])
        pids = [pid for pid, _ in leftovers(fed / "fed" / "sites" / "b")]
        site_b.kill_group()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        again = Proc(
            fed, "client-b-again", "client", "start", "--kit", "fed/sites/b",
            "--data", "data/site-2.npz", "--server", address, "--device", "cpu",
            "--threads", "1",
        )  # fmt: skip
        assert srv.wait(timeout=400) == 0, srv.text()[-3000:]
        done = rounds(run_dir)
        assert [r["round"] for r in done] == list(range(1, 16))
        with_b = [r["round"] for r in done if "b" in r["sites"]]
        assert with_b[0] == 1 and len(with_b) >= 2 and with_b[-1] == 15, with_b  # it rejoined
        assert "Traceback" not in again.text() and "error" not in again.text()
        trained = [s.round for s in ledger.read(fed / "fed/sites/b/ledger.jsonl").spends]
        assert len(trained) == len(set(trained))  # one line per round, none twice
        # Every round b contributed to is on its ledger; at most one more: the round it
        # was killed in, recorded before its training started.
        assert set(with_b) <= set(trained) and len(set(trained) - set(with_b)) <= 1
    finally:
        terminate_all([site_a, again])


def test_live_sites_keep_serving_across_a_server_restart(fed: Path) -> None:
    """The server ends its run and a new one starts on the same port: the live sites
    say their connection ended, reconnect and train the new run (Flower's SuperNode
    alone exits 0 without a word and the new server waits for it). The second run is
    --dp distributed, which the sites' policies allow only once their operators say so:
    secure aggregation over TLS, and ledgers and an audit that carry the assumption."""
    from fedsilo.privacy import ledger

    # Two runs at epsilon 3 each fit the sites' budget of 10 together (one at 8 would not).
    (fed / "small.toml").write_text("target-epsilon = 3.0\n")
    for name in ("a", "b"):
        toml = fed / "fed" / "sites" / name / "site.toml"
        text = toml.read_text()
        assert "distributed-min-sites = 0" in text  # off by default
        toml.write_text(text.replace("distributed-min-sites = 0", "distributed-min-sites = 2"))
    fleet = free_port()
    address = f"127.0.0.1:{fleet}"
    run = ("--config", "small.toml", "--min-sites", "2")
    first = server(fed, fleet, *run, "--rounds", "1", "--out", "run1")
    sites = [client(fed, name, i, address) for i, name in ((1, "a"), (2, "b"))]
    second = None
    try:
        assert first.wait(timeout=300) == 0, first.text()[-3000:]
        distributed = ("--dp", "distributed", "--dp-max-sample-rate", "0.14")  # 64 / 479
        second = server(fed, fleet, *run, "--rounds", "2", *distributed, "--out", "run2")
        assert second.wait(timeout=300) == 0, second.text()[-3000:]
        assert "distributed DP (secure aggregation, noise shares for 2 sites)" in " ".join(
            second.text().split()
        )
        done = rounds(fed / "run2")
        assert [r["round"] for r in done] == [1, 2]
        assert all(r["sites"] == ["a", "b"] and r["failed"] == [] for r in done)
        for proc in sites:
            said = " ".join(proc.text().split())  # rich wraps long lines
            assert "the site's connection ended" in said and "reconnecting" in said, said
            assert proc.popen.poll() is None  # still serving
        run2 = json.loads((fed / "run2" / "config.json").read_text())["run-id"]
        paths = []
        for name in ("a", "b"):
            path = fed / "fed" / "sites" / name / "ledger.jsonl"
            spends = [s for s in ledger.read(path).spends if s.run == run2]
            assert [(s.mode, s.min_sites, s.sites, s.event.steps) for s in spends] == [
                ("distributed", 2, 2, 1)
            ] * 2
            paths.append(str(path))
        res = fedsilo_cli(fed, "audit", "run2", *paths, "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        for row in json.loads(res.stdout)["sites"]:  # run 1 (local) and run 2 composed
            assert (row["assumed_sites"], row["distributed_events"], row["events"]) == (2, 2, 3)
            assert row["epsilon_own_noise"] > row["epsilon"] > 0
    finally:
        terminate_all(sites)
        if second is not None and second.popen.poll() is None:
            second.terminate()


def test_a_killed_server_resumes_and_the_sites_ledgers_audit(fed: Path) -> None:
    """The server's machine dies (SIGKILL: launcher, SuperLink, ServerApp) after round 2
    of 5, with round 3 sent or about to be. `server start --resume` goes on from round
    2's checkpoint with the same run id and asks for round 3 again: the live sites
    reconnect, resend the reply they kept for it (no new spend) or train it if it never
    reached them, keep their run's noise plan, and the run has all five rounds with each
    spent exactly once: no budget is wasted by the crash. The audit passes."""
    from fedsilo.privacy import ledger

    fleet = free_port()
    address = f"127.0.0.1:{fleet}"
    run_dir = fed / "run"
    srv = server(fed, fleet, "--rounds", "5", "--min-sites", "2", "--out", "run")
    sites = [client(fed, name, i, address) for i, name in ((1, "a"), (2, "b"))]
    resumed = None
    try:
        wait_for(lambda: len(rounds(run_dir)) >= 2, 400, "round 2", [srv, *sites])
        server_pids = [
            pid for home in (run_dir, fed / "flwr-homes" / "server") for pid, _ in leftovers(home)
        ]
        srv.kill_group()
        for pid in server_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not (run_dir / "summary.json").exists()
        run_id = json.loads((run_dir / "config.json").read_text())["run-id"]
        resumed = server(fed, fleet, "--resume", "run")
        assert resumed.wait(timeout=400) == 0, resumed.text()[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        done = [r["round"] for r in rounds(run_dir)]
        assert summary["run_id"] == run_id and summary["resumed_after"][0] >= 2
        assert done == [1, 2, 3, 4, 5] and summary["lost_rounds"] == [], summary
        assert summary["asked_again"] in ([], [3]), summary
        said = " ".join(resumed.text().split())
        assert f"resuming run {run_id} after round {summary['resumed_after'][0]} of 5" in said
        heads = {}
        for name in ("a", "b"):
            path = fed / "fed" / "sites" / name / "ledger.jsonl"
            spends = [s for s in ledger.read(path).spends if s.run == run_id]
            trained = [s.round for s in spends]
            assert trained == [1, 2, 3, 4, 5], trained  # each round spent once, none wasted
            assert rounds_with(run_dir, name) == set(trained)
            assert len({s.event.noise_multiplier for s in spends}) == 1  # the plan kept
            heads[name] = str(path)
        site = {s["site"]: s for s in summary["sites"]}
        assert all(site[n]["epsilon"] <= 8.0 for n in ("a", "b"))
        res = fedsilo_cli(fed, "audit", "run", *heads.values())
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        terminate_all(sites)
        if resumed is not None and resumed.popen.poll() is None:
            resumed.terminate()


def rounds_with(run_dir: Path, site: str) -> set[int]:
    return {r["round"] for r in rounds(run_dir) if site in r["sites"]}


def fedsilo_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.e2e.federation import fedsilo

    return fedsilo(*args, cwd=tmp)
