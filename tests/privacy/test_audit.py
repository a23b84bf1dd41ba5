"""`fedsilo audit`: statuses, exit codes, --json/--markdown/--plot, and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.cli import main
from fedsilo.privacy import ledger
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.audit import audit
from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
from fedsilo.privacy.policy import SitePolicy

EVENT = SampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, steps=50)
ONE, TWO, THREE = (epsilon([EVENT] * n, delta=1e-5) for n in (1, 2, 3))


def make(
    path: Path,
    budget: float,
    rounds: int,
    *,
    site: str = "site-a",
    distributed_min_sites: int = 0,
    **spend: object,
) -> Path:
    policy = SitePolicy(
        max_epsilon=budget, max_clip_norm=2.0, distributed_min_sites=distributed_min_sites
    )
    ledger.ensure_policy(path, site, policy)
    with ledger.transaction(path) as txn:
        for r in range(1, rounds + 1):
            txn.append(
                RoundSpend(
                    **{  # type: ignore[arg-type]
                        "event": EVENT,
                        "clip_norm": 1.0,
                        "delta": 1e-5,
                        "dataset": "sha256:00",
                        "run": "1",
                        "round": r,
                        "time": "2026-01-01T00:00:00.000Z",
                        "site": site,
                        **spend,
                    }
                )
            )
    return path


def audit_json(capsys: pytest.CaptureFixture[str], *paths: Path) -> tuple[int, list[dict]]:  # type: ignore[type-arg]
    code = main(["audit", "--json", *map(str, paths)])
    return code, json.loads(capsys.readouterr().out)["sites"]


def test_statuses_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = make(tmp_path / "ok.jsonl", budget=THREE + 0.1, rounds=2, site="ok")
    exhausted = make(tmp_path / "ex.jsonl", budget=(TWO + THREE) / 2, rounds=2, site="ex")
    over = make(tmp_path / "over.jsonl", budget=ONE, rounds=2, site="over")
    clip = make(tmp_path / "clip.jsonl", budget=8, rounds=1, site="clip", clip_norm=3.0)
    code, sites = audit_json(capsys, ok, exhausted)
    assert code == 0
    assert [s["status"] for s in sites] == ["ok", "exhausted"]
    first = sites[0]
    assert set(first) == {
        "site", "ledger", "events", "steps", "epsilon", "epsilon_rdp", "delta", "budget",
        "status", "problems", "distributed_events", "epsilon_own_noise", "assumed_sites",
        "tolerated",
    }  # fmt: skip
    assert (first["distributed_events"], first["epsilon_own_noise"]) == (0, None)
    assert first["events"] == 2 and first["steps"] == 100 and first["delta"] == 1e-5
    assert first["epsilon"] == pytest.approx(TWO)
    assert first["epsilon_rdp"] == pytest.approx(epsilon([EVENT] * 2, delta=1e-5, accountant="rdp"))
    assert first["epsilon"] < first["epsilon_rdp"]
    code, sites = audit_json(capsys, over, clip)
    assert code == 1
    assert [s["status"] for s in sites] == ["violated", "violated"]
    assert "exceeds the budget" in sites[0]["problems"][0]
    assert "clip norm 3 above the policy's 2" in sites[1]["problems"][0]


def test_tampered_ledger_is_reported_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path / "t.jsonl", budget=8, rounds=3)
    path.write_bytes(path.read_bytes().replace(b'"steps":50', b'"steps":5', 1))
    code, sites = audit_json(capsys, path)
    assert code == 1 and sites[0]["status"] == "tampered"
    assert sites[0]["problems"][0].startswith("line 2:")


def test_run_dir_is_checked_against_the_heads_in_its_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the server saw site-a's head after round 2; the ledger was cut back to round 1.
    run = tmp_path / "run"
    path = make(run / "ledgers" / "site-a.jsonl", budget=20, rounds=2)
    head = ledger.read(path).head
    summary = {"sites": [{"site": "site-a", "ledger_head": head}]}
    (run / "summary.json").write_text(json.dumps(summary))
    assert audit_json(capsys, run)[1][0]["status"] == "ok"
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))
    code, sites = audit_json(capsys, run)
    # Assert: the chain alone is intact, the anchor is not.
    assert code == 1 and sites[0]["status"] == "tampered"
    assert "summary.json records ledger head" in sites[0]["problems"][0]


def test_table_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path / "site-a.jsonl", budget=20, rounds=2)
    assert main(["audit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "site-a" in out and "ok" in out and f"{TWO:.3f}" in out
    png = tmp_path / "eps.png"
    assert main(["audit", "--markdown", "--plot", str(png), str(path)]) == 0
    report = capsys.readouterr().out
    assert report.startswith("# fedsilo privacy audit") and "**All sites passed**" in report
    assert "| site-a | 2 | 100 |" in report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["/nonexistent/ledger.jsonl"], "does not exist"),
        (["{empty}"], "No ledgers (*.jsonl) in"),
        (["{empty}", "--plot", "x.svg"], "`--plot` writes a PNG file"),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["audit", *(a.replace("{empty}", str(tmp_path / "empty")) for a in args)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and needle in err.replace("\n", " ")
    assert "Traceback" not in err


def test_unwritable_plot_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path / "site-a.jsonl", budget=20, rounds=1)
    code = main(["audit", "--json", "--plot", str(tmp_path / "no" / "dir" / "x.png"), str(path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: Cannot write the plot")


@pytest.mark.parametrize(
    "changes",
    [
        {"noise_multiplier": 0.0},
        {"sample_rate": 2.0},
        {"noise_multiplier": float("nan")},
        {"steps": -3},
        {"noise_multiplier": 10**400},  # no float holds it (OverflowError once)
        {"steps": 10**30},
    ],
)
def test_meaningless_entries_are_violations_not_crashes(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    from tests.privacy.test_ledger import rewrite
    from tests.privacy.test_ledger import write as write_ledger

    path = tmp_path / "site-a.jsonl"
    write_ledger(path, rounds=2)
    rewrite(path, 2, **changes)
    report = audit(path)  # returns quickly (NaN once made the accountant hang)
    assert report.status == "violated"
    assert any(p.startswith("line 2: not a valid entry") for p in report.problems)


def test_audit_of_a_junk_file_stays_readable(tmp_path: Path) -> None:
    import os

    from fedsilo.cli import main

    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\n".join(os.urandom(64) for _ in range(20_000)))
    report = audit(junk)
    assert report.status == "tampered"
    assert len(report.problems) <= 25 and "more problem line(s)" in report.problems[-2]
    assert main(["audit", str(junk), "--json"]) == 1


def test_a_line_nested_too_deeply_is_tampering_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path / "site-a.jsonl", budget=20, rounds=1)
    path.write_bytes(path.read_bytes() + b"[" * 100_000 + b"\n")  # RecursionError once
    code, (row,) = audit_json(capsys, path)
    assert code == 1 and row["status"] == "tampered"
    assert "line 3: not a ledger line (not JSON, or nested too deeply)" in row["problems"]


def test_a_deployed_run_directory_is_checked_against_the_ledgers_given_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.privacy.test_ledger import write as write_ledger

    # A deployed run directory: metrics and a summary, no ledgers (the sites keep them).
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    site_a = tmp_path / "site-a.jsonl"
    write_ledger(site_a, rounds=1)
    head = ledger.read(site_a).head
    summary = {"sites": [{"site": "site-a", "ledger_head": head}]}
    (run / "summary.json").write_text(json.dumps(summary))
    # Alone, it says where the ledgers are instead of auditing metrics.jsonl as one.
    assert main(["audit", str(run)]) == 2
    assert "deployed run: its sites keep their own ledgers" in capsys.readouterr().err
    # With the site's ledger beside it, the head the server recorded is checked.
    assert main(["audit", str(run), str(site_a), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sites"]
    assert [(r["site"], r["status"]) for r in rows] == [("site-a", "ok")]
    summary["sites"][0]["ledger_head"] = "0" * 64  # a head the ledger never had
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["audit", str(run), str(site_a), "--json"]) == 1
    assert "summary.json records ledger head" in capsys.readouterr().out


AUDIT_IN_BOUNDED_MEMORY = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))  # a MemoryError, not an OOM kill
from fedsilo.cli import main
sys.exit(main(["audit", sys.argv[1], "--json"]))
"""


def test_an_extreme_but_valid_entry_is_audited_without_exhausting_memory(tmp_path: Path) -> None:
    # Noise 0.3, sample rate 0.5, 10,000 steps: valid values whose PRV composition was
    # killed for memory on a 24 GB machine. The audit answers from RDP instead.
    import subprocess
    import sys

    from tests.privacy.test_ledger import rewrite
    from tests.privacy.test_ledger import write as write_ledger

    path = tmp_path / "site-a.jsonl"
    write_ledger(path, rounds=1)
    rewrite(path, 2, noise_multiplier=0.3, sample_rate=0.5, steps=10_000)
    res = subprocess.run(
        [sys.executable, "-c", AUDIT_IN_BOUNDED_MEMORY, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    row = json.loads(res.stdout)["sites"][0]
    assert row["status"] == "violated" and row["epsilon"] > 100  # far over its budget of 8


def test_distributed_spends_report_the_own_noise_epsilon_and_need_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dist = {"mode": "distributed", "noise_share": 0.5, "min_sites": 4, "sites": 6}
    # The policy allows distributed DP at 4 sites: ok, and both figures are reported.
    allowed = make(tmp_path / "allowed.jsonl", 50.0, 2, site="a", distributed_min_sites=4, **dist)
    # The same spends on a ledger whose policy never allowed distributed DP: violated.
    refused = make(tmp_path / "refused.jsonl", 8.0, 2, site="b", **dist)
    code, (ok, bad) = audit_json(capsys, allowed, refused)
    assert code == 1 and ok["status"] == "ok" and bad["status"] == "violated"
    assert (ok["distributed_events"], ok["assumed_sites"], ok["tolerated"]) == (2, 4, 2)
    alone = SampledGaussianEvent(noise_multiplier=0.5, sample_rate=0.1, steps=50)
    assert ok["epsilon_own_noise"] == pytest.approx(epsilon([alone] * 2, delta=1e-5), rel=1e-6)
    assert ok["epsilon_own_noise"] > ok["epsilon"] == pytest.approx(TWO)
    assert (
        "distributed DP assuming 4 honest sites; the policy allows it at never"
        in bad["problems"][0]
    )
    main(["audit", "--markdown", str(allowed)])
    report = capsys.readouterr().out
    assert "epsilon (own noise only; sites assumed)" in report
    assert f"{ok['epsilon_own_noise']:.3f}; 4 |" in report
