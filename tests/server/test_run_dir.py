"""The run directory's files are always valid JSON, and sites.json round-trips."""

from __future__ import annotations

import json
from pathlib import Path

from fedsilo.server.run_dir import RunDir, read_metrics, read_site_names, write_site_names


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"round": 1, "loss": float("nan"), "accuracy": float("inf"), "x": [1.5]})
    run.write_summary({"final": {"loss": float("-inf")}, "rounds": []})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=lambda c: 1 / 0) == {
        "round": 1, "loss": None, "accuracy": None, "x": [1.5]
    }  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert summary["final"]["loss"] is None
    assert read_metrics(tmp_path)[0]["round"] == 1


def test_site_names_round_trip(tmp_path: Path) -> None:
    assert read_site_names(tmp_path) == {}
    write_site_names(tmp_path, {123456789012: "site-a", 7: "site-b"})
    assert read_site_names(tmp_path) == {123456789012: "site-a", 7: "site-b"}
    (tmp_path / "sites.json").write_text("[not json")
    assert read_site_names(tmp_path) == {}
