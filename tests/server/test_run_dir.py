"""The run directory's files are always valid JSON, and sites.json round-trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedsilo.server.records import FinalEvaluation, RoundRecord, Summary
from fedsilo.server.run_dir import RunDir, read_metrics, read_site_names, write_site_names


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    nan, inf = float("nan"), float("inf")
    run.append_metrics(RoundRecord(round=1, loss=nan, accuracy=inf, max_epsilon=1.5))
    run.write_summary(Summary(final=FinalEvaluation(loss=-inf), rounds=[]))
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    raw = json.loads(line, parse_constant=lambda c: 1 / 0)
    assert {k: raw[k] for k in ("round", "loss", "accuracy", "max_epsilon")} == {
        "round": 1, "loss": None, "accuracy": None, "max_epsilon": 1.5
    }  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert summary["final"]["loss"] is None
    assert read_metrics(tmp_path)[0].round == 1


def test_site_names_round_trip(tmp_path: Path) -> None:
    assert read_site_names(tmp_path) == {}
    write_site_names(tmp_path, {123456789012: "site-a", 7: "site-b"})
    assert read_site_names(tmp_path) == {123456789012: "site-a", 7: "site-b"}
    (tmp_path / "sites.json").write_text("[not json")
    assert read_site_names(tmp_path) == {}


def test_resume_point_counts_only_checkpointed_rounds_and_loses_the_sent_one(
    tmp_path: Path,
) -> None:
    """Round 3 was sent and its metrics line half written when the server died: the run
    goes on after round 2 from its checkpoint, round 3 is lost (sites spent it), and the
    cut-off line is removed so new lines append to whole ones."""
    import torch

    from fedsilo.server.records import Progress
    from fedsilo.server.run_dir import read_progress

    run = RunDir(tmp_path)
    for r in (1, 2):
        run.save_checkpoint(r, {"w": torch.zeros(1)})
        run.append_metrics(RoundRecord(round=r, accuracy=0.5, loss=0.1, max_epsilon=1.0))
    run.write_progress(Progress(started=3))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "accur')
    progress, records = run.resume_point(ask_again=False)
    assert [r.round for r in records] == [1, 2]
    assert progress == Progress(started=3, lost=[3], resumed=[2])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    run.write_progress(progress)
    assert read_progress(tmp_path) == progress
    # A metrics line without its checkpoint is not a completed round.
    (tmp_path / "checkpoints" / "round-002.pt").unlink()
    progress, records = run.resume_point(ask_again=False)
    assert [r.round for r in records] == [1] and progress.lost == [2, 3]


def test_a_local_dp_resume_asks_for_the_round_in_flight_again(tmp_path: Path) -> None:
    """Local DP: round 3 was in flight when the server died. The resumed server starts
    at round 3 again (sites that trained it resend their kept replies) and loses
    nothing; a second crash in the same round asks for it again once more, and a round
    lost before (a distributed run's, or one too few sites kept) stays lost."""
    import torch

    from fedsilo.server.records import Progress
    from fedsilo.server.run_dir import resume_progress

    run = RunDir(tmp_path)
    for r in (1, 2):
        run.save_checkpoint(r, {"w": torch.zeros(1)})
        run.append_metrics(RoundRecord(round=r, accuracy=0.5, loss=0.1, max_epsilon=1.0))
    run.write_progress(Progress(started=3, lost=[1]))
    progress, records = run.resume_point(ask_again=True)
    assert [r.round for r in records] == [1, 2]
    assert progress == Progress(started=2, lost=[1], resumed=[2], asked_again=[3])
    again = resume_progress(dataclasses.replace(progress, started=3), 2, ask_again=True)
    assert again == Progress(started=2, lost=[1], resumed=[2, 2], asked_again=[3])
    # Nothing in flight (the crash came between rounds): nothing asked again.
    assert resume_progress(Progress(started=2), 2, ask_again=True).asked_again == []
    # Distributed DP never asks again: the round is lost.
    assert resume_progress(Progress(started=3), 2, ask_again=False).lost == [3]


def test_only_a_stopped_fedsilo_run_with_a_run_id_can_be_resumed(tmp_path: Path) -> None:
    import pytest

    from fedsilo.errors import ConfigError
    from fedsilo.server.run_dir import resume_config

    with pytest.raises(ConfigError, match="not a fedsilo run directory"):
        resume_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"rounds": 3, "run-id": ""}))
    with pytest.raises(ConfigError, match="has no run-id"):
        resume_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"rounds": 3, "run-id": "abc"}))
    done = {"completed_rounds": 2, "lost_rounds": [2], "planned_rounds": 3, "stopped": None}
    (tmp_path / "summary.json").write_text(json.dumps(done))
    with pytest.raises(ConfigError, match="already finished its 3 round"):
        resume_config(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({**done, "stopped": "round 3: ..."}))
    run_dir, values = resume_config(tmp_path)
    assert values["resume"] is True and values["run-id"] == "abc"
    assert values["run-dir"] == str(tmp_path.resolve()) == str(run_dir)
