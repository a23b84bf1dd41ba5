"""`fedsilo simulate` end to end on Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def simulate(tmp: Path, name: str, *args: str) -> dict:  # type: ignore[type-arg]
    res = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--json", "--out", str(tmp / name), *args],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)  # stdout holds exactly one JSON object


def resume(tmp: Path, run_dir: str, *args: str) -> dict:  # type: ignore[type-arg]
    """`fedsilo simulate --resume RUN_DIR ARGS --json` as a shell runs it: its summary."""
    res = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--resume", run_dir, *args, "--json"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_a_killed_simulation_resumes_and_its_ledgers_audit(tmp_path: Path) -> None:
    """A default simulation (3 digits sites, epsilon 8), 5 rounds. SIGKILL the whole
    simulation (driver and Ray) during round 3; `--resume` goes on
    from round 2's checkpoint with the same run id and asks for the round in flight
    again. Its virtual sites died with the driver: one killed while training spent the
    round and kept no reply, so it refuses it (never trains a round twice), and with
    too few replies the round is lost; one killed between rounds loses nothing. Every
    site's ledger has at most one line per round, the run's epsilon stays within its
    target and the audit passes."""
    from fedsilo.privacy import ledger
    from tests.e2e.federation import (
        Proc,
        end_leftovers,
        fedsilo,
        free_port,
        leftovers,
        scrape,
        wait_for,
    )

    run_dir = tmp_path / "run"
    port = free_port()
    first = Proc(
        tmp_path, "sim", "simulate", "--rounds", "5", "--out", str(run_dir),
        "--metrics-port", str(port),
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                (run_dir / "metrics.jsonl").exists()
                and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
            ),
            400,
            "round 2",
            [first],
        )
        # Prometheus sees the running simulation as its run directory records it.
        got = scrape(port)
        lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        seen = int(got["fedsilo_server_round", ()])
        assert seen >= 2 and got["fedsilo_server_rounds_planned", ()] == 5
        assert got["fedsilo_server_accuracy", ()] == lines[seen - 1]["accuracy"]
        assert got["fedsilo_server_sites_online", ()] == 3
        for site in ("site-0", "site-1", "site-2"):
            assert (
                got["fedsilo_server_replies_total", (("outcome", "accepted"), ("site", site))] >= 2
            )
            assert got["fedsilo_server_site_epsilon", (("site", site),)] > 0
        first.kill_group()
    finally:
        end_leftovers(tmp_path)  # Ray's processes are in groups of their own
    assert not leftovers(tmp_path)
    run_id = json.loads((run_dir / "config.json").read_text())["run-id"]
    out = resume(tmp_path, str(run_dir))
    assert out["run_id"] == run_id and out["resumed_after"][0] >= 2
    done = [r["round"] for r in out["rounds"]]
    assert sorted(done + out["lost_rounds"]) == [1, 2, 3, 4, 5] and done[-1] == 5
    assert len(out["lost_rounds"]) <= 1 and set(out["lost_rounds"]) <= set(out["asked_again"])
    # The defaults (`make demo`'s run, 5 rounds here): 3 digits sites, epsilon 8.
    assert out["final"]["accuracy"] >= 0.70
    assert len(out["sites"]) == 3
    for site in out["sites"]:
        assert 0 < site["epsilon"] <= 8.0
        assert site["delta"] == 1e-5 and site["target_epsilon"] == 8.0
        assert site["examples"] > 400
    # Epsilon accumulates: the largest site epsilon grows every round.
    eps = [r["max_epsilon"] for r in out["rounds"]]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == out["rounds"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["round"] for ln in lines] == done
    assert (run_dir / "final_model.pt").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"round-{r:03d}.pt" for r in done
    ]
    for path in sorted((run_dir / "ledgers").glob("*.jsonl")):
        spends = [s for s in ledger.read(path).spends if s.run == run_id]
        trained = [s.round for s in spends]
        assert len(trained) == len(set(trained)) and set(done) <= set(trained), trained
        assert len({s.event.noise_multiplier for s in spends}) == 1  # the plan kept
    audit = fedsilo("audit", str(run_dir), "--json", cwd=tmp_path)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # The resumed run's rounds, as TensorBoard reads them back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    export = fedsilo("export", str(run_dir), "--tensorboard", str(tmp_path / "tb"), cwd=tmp_path)
    assert export.returncode == 0, export.stdout + export.stderr
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("accuracy")] == [
        (r["round"], pytest.approx(r["accuracy"])) for r in out["rounds"]
    ]
    again = fedsilo("simulate", "--resume", str(run_dir), cwd=tmp_path)
    assert again.returncode == 2 and "already finished its 5 round(s)" in again.stderr


def test_distributed_dp_simulation_records_both_epsilons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--dp distributed` on Flower's engine: SecAgg+ stages through the virtual sites'
    contexts, one step per round; the ledgers and the audit carry the trust assumption."""
    from fedsilo.cli import main
    from fedsilo.privacy import ledger

    summary = simulate(
        tmp_path,
        "run",
        *("--dp", "distributed", "--rounds", "4", "--batch-size", "300", "--lr", "2"),
    )
    assert summary["completed_rounds"] == 4 and not summary["failures"]
    assert summary["final"]["accuracy"] > 0.5  # 4 steps of the pooled batch (random: 0.1)
    spends = ledger.read(tmp_path / "run" / "ledgers" / "site-0.jsonl").spends
    assert [(s.mode, s.min_sites, s.sites, s.event.steps) for s in spends] == [
        ("distributed", 3, 3, 1)
    ] * 4
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "run"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sites"]
    assert len(rows) == 3
    for row in rows:
        # Own share only (sigma / sqrt(3)): far more than the 8 the sum is calibrated to.
        assert row["epsilon"] <= 8.0 < row["epsilon_own_noise"]
        assert row["assumed_sites"] == 3 and row["tolerated"] == 0
    assert main(["audit", str(tmp_path / "run")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "assume at least 3 honest sites' noise shares" in text


def test_a_finished_run_resumes_with_more_rounds_where_the_sites_allow_them(
    tmp_path: Path,
) -> None:
    """`--resume RUN --rounds N` past the plan: applied (config.json, summary), trained at
    the noise each site planned, recorded in every ledger; the audit passes. The virtual
    sites' budgets (30) allow it; their run's epsilon then passes its target (8)."""
    from fedsilo.privacy import ledger

    first = simulate(tmp_path, "run", "--rounds", "1", "--site-max-epsilon", "30")
    assert first["completed_rounds"] == 1
    out = resume(tmp_path, "run", "--rounds", "2")
    assert [r["round"] for r in out["rounds"]] == [1, 2] and out["planned_rounds"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rounds"] == 2
    for site in out["sites"]:
        assert 8.0 < site["epsilon"] <= 30.0
    for path in sorted((tmp_path / "run" / "ledgers").glob("*.jsonl")):
        spends = ledger.read(path).spends
        assert [(s.round, s.run_rounds) for s in spends] == [(1, 1), (2, 2)]
        assert spends[0].event == spends[1].event  # the noise planned for one round
    audit = subprocess.run(
        [sys.executable, "-m", "fedsilo", "audit", "run"], cwd=tmp_path, capture_output=True
    )
    assert audit.returncode == 0, audit.stdout


def test_a_crash_in_a_round_the_sites_answered_loses_nothing(tmp_path: Path) -> None:
    """The server died in round 2 after every site had trained it and kept its reply
    (made here by removing round 2's checkpoint and metrics line and the summary, as a
    crash before the server completed the round leaves them). `--resume` asks for
    round 2 again: each site resends the reply it kept, at no new spend, so round 2 is
    recorded with the same model to the last bit, nothing is lost, and each ledger has
    rounds [1, 2] once each."""
    import torch

    from fedsilo.privacy import ledger

    out = simulate(tmp_path, "run", "--rounds", "2", "--seed", "5")
    run_dir = Path(out["run_dir"])
    first = torch.load(run_dir / "checkpoints" / "round-002.pt")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n")
    (run_dir / "checkpoints" / "round-002.pt").unlink()
    (run_dir / "summary.json").unlink()
    (run_dir / "final_model.pt").unlink()

    again = resume(tmp_path, str(run_dir))

    assert [r["round"] for r in again["rounds"]] == [1, 2]
    assert again["lost_rounds"] == [] and again["asked_again"] == [2]
    assert again["rounds"][1] == out["rounds"][1]  # the same replies, the same evaluation
    second = torch.load(run_dir / "checkpoints" / "round-002.pt")
    assert all(torch.equal(first[k], second[k]) for k in first)
    for path in sorted((run_dir / "ledgers").glob("*.jsonl")):
        assert [s.round for s in ledger.read(path).spends] == [1, 2], path.name
    assert {s["site"]: s["epsilon"] for s in again["sites"]} == {
        s["site"]: s["epsilon"] for s in out["sites"]
    }


def test_krum_keeps_the_model_that_one_sign_flipping_site_steers_under_fedavg(
    tmp_path: Path,
) -> None:
    """Five digits sites, the last sends its update times -10 (a real DP-SGD site that
    attacks what it sends). Under FedAvg the model is steered to chance; under krum:1
    the attacker is left out every round, named in the record, and the model learns.
    The hostile site's spend is real: the audit of its ledger passes like the others'."""
    from tests.e2e.federation import fedsilo

    flags = ("--sites", "5", "--rounds", "2", "--hostile-sites", "1:sign-flip:10")
    runs = {
        rule: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedsilo",
                "simulate",
                "--json",
                "--out",
                str(tmp_path / rule.replace(":", "-")),
                *flags,
                "--aggregation",
                rule,
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rule in ("fedavg", "krum:1")
    }
    out = {}
    for rule, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[rule] = json.loads(stdout)
    assert out["fedavg"]["final"]["accuracy"] < 0.3  # steered: near chance (0.1)
    assert out["krum:1"]["final"]["accuracy"] >= 0.6
    for summary in out.values():
        assert summary["hostile"] == {"site-4": "sign-flip:10"}
    assert out["fedavg"]["flagged"] == []
    flagged = out["krum:1"]["flagged"]
    assert [(f["site"], f["round"]) for f in flagged] == [("site-4", 1), ("site-4", 2)]
    assert all("krum:1 left its update out" in f["reason"] for f in flagged)
    lines = (tmp_path / "krum-1" / "metrics.jsonl").read_text().splitlines()
    assert all(set(json.loads(ln)["flagged"]) == {"site-4"} for ln in lines)
    audit = fedsilo("audit", str(tmp_path / "krum-1"), "--json", cwd=tmp_path)
    assert audit.returncode == 0, audit.stdout + audit.stderr
