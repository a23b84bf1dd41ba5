"""A simulated site with a smaller budget refuses; the others train; `fedsilo audit` agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def fedsilo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_refusing_site_then_audit(tmp_path: Path) -> None:
    # Prepare / Execute: site-1's own budget (2) is below the run's target (8).
    run_dir = tmp_path / "run"
    sim = fedsilo(
        "simulate", "--json", "--out", str(run_dir), "--sites", "2", "--rounds", "2",
        "--site-max-epsilon", "8,2", cwd=tmp_path,
    )  # fmt: skip
    # Assert: the federation ran both rounds with site-0; site-1 refused each, saying why.
    assert sim.returncode == 0, sim.stderr[-3000:]
    out = json.loads(sim.stdout)
    assert out["completed_rounds"] == 2
    assert [s["site"] for s in out["sites"]] == ["site-0"]
    assert [(r["site"], r["round"]) for r in out["refusals"]] == [("site-1", 1), ("site-1", 2)]
    assert "more than this site's budget of 2" in out["refusals"][0]["reason"]
    assert "site site-1 refused" in sim.stderr
    site0 = out["sites"][0]
    assert 0 < site0["epsilon"] <= 8.0  # this run's epsilon: all a site discloses
    assert "site_epsilon" not in site0 and "budget" not in site0
    assert out["final"]["accuracy"] >= 0.6

    table = fedsilo("audit", str(run_dir), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "fedsilo audit" in table.stdout and "site-0" in table.stdout
    assert "site-1" in table.stdout

    res = fedsilo("audit", "--json", str(run_dir), cwd=tmp_path)
    assert res.returncode == 0
    sites = {s["site"]: s for s in json.loads(res.stdout)["sites"]}
    assert sites["site-0"]["events"] == 2  # one spend per local round
    # A fresh ledger holds only this run: the site's total is the run's epsilon (PRV).
    assert sites["site-0"]["epsilon"] == pytest.approx(site0["epsilon"], rel=1e-9)
    assert sites["site-0"]["budget"] == 8.0
    assert sites["site-0"]["status"] in ("ok", "exhausted")
    assert sites["site-1"]["events"] == 0 and sites["site-1"]["status"] == "ok"
