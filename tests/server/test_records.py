"""The run directory's records: they round-trip, carry their schema version, read the
files an older fedsilo wrote (no version: 1) and refuse a version they do not know."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedsilo.errors import DataError
from fedsilo.server.records import (
    SCHEMA,
    Failure,
    FinalEvaluation,
    Flagged,
    Progress,
    Refusal,
    RoundRecord,
    RoundResult,
    SiteRoundReport,
    SiteSummary,
    Summary,
)
from fedsilo.server.run_dir import (
    RunDir,
    read_metrics,
    read_progress,
    read_summary,
    resume_config,
)

HEAD = "ab" * 32

# What fedsilo wrote before records carried a schema version, verbatim.
LEGACY_METRICS_LINE = (
    '{"round": 1, "accuracy": 0.81, "loss": 0.6, "max_epsilon": 1.2, "reports": {"site-0": '
    '{"examples": 480, "epsilon": 1.2, "delta": 1e-05, "target_epsilon": 8.0, "ledger_head": '
    f'"{HEAD}"}}}}, "sites": ["site-0"], "failed": ["site-1"], "refused": [], "reasons": '
    '{"site-1": "no reply before the round timeout"}, "seconds": 3.5}'
)
LEGACY_SUMMARY = {
    "task": "digits",
    "rounds": [{"round": 1, "accuracy": 0.81, "loss": 0.6, "max_epsilon": 1.2}],
    "final": {"accuracy": 0.81, "loss": 0.6},
    "sites": [
        {
            "site": "site-0",
            "examples": 480,
            "epsilon": 1.2,
            "delta": 1e-05,
            "target_epsilon": 8.0,
            "ledger_head": HEAD,
        }
    ],
    "failures": [{"site": "site-1", "round": 1, "reason": "no reply before the round timeout"}],
    "refusals": [],
    "completed_rounds": 1,
    "planned_rounds": 3,
    "run_dir": "runs/x",
    "run_id": "abc",
    "lost_rounds": [],
    "resumed_after": [],
    "stopped": "round 2: 0 usable repl(ies), fewer than min-sites=1",
}
LEGACY_PROGRESS = {"started": 2, "lost": [2], "resumed": [1]}


def round_record(r: int = 1, **overrides: object) -> RoundRecord:
    values: dict[str, object] = {
        "round": r,
        "accuracy": 0.81,
        "loss": 0.6,
        "max_epsilon": 1.2,
        "reports": {"site-0": SiteRoundReport(480, 1.2, 1e-5, 8.0, HEAD)},
        "sites": ["site-0"],
        "failed": ["site-1"],
        "refused": ["site-2"],
        "reasons": {"site-1": "no reply", "site-2": "over its budget"},
        "seconds": 3.5,
        "metrics": {"sensitivity": 0.9},
        "stage_seconds": {"advertise-keys": 0.5},
    }
    return RoundRecord(**{**values, **overrides})  # type: ignore[arg-type]


def summary() -> Summary:
    return Summary(
        task="digits",
        rounds=[RoundResult(1, 0.81, 0.6, 1.2, {"sensitivity": 0.9})],
        final=FinalEvaluation(0.81, 0.6, {"sensitivity": 0.9}),
        sites=[SiteSummary("site-0", 480, 1.2, 1e-5, 8.0, HEAD)],
        failures=[Failure("site-1", 1, "no reply")],
        refusals=[Refusal("site-2", 1, "over its budget")],
        completed_rounds=1,
        planned_rounds=3,
        run_dir="runs/x",
        run_id="abc",
        lost_rounds=[2],
        resumed_after=[1],
        stopped=None,
        ray={"address": "local", "nodes": 1},
        hostile={"site-2": "sign-flip:10"},
        flagged=[Flagged("site-2", 1, "krum:1 left its update out")],
    )


# ---------------------------------------------------------------- round trips
def test_each_record_round_trips_through_its_file(tmp_path: Path) -> None:
    # Prepare
    run = RunDir(tmp_path)
    records = [round_record(1), round_record(2, metrics=None, stage_seconds=None)]
    progress = Progress(started=3, lost=[3], resumed=[2])

    # Execute
    for record in records:
        run.append_metrics(record)
    run.write_summary(summary())
    run.write_progress(progress)

    # Assert: the same values back, and each file object says its schema version
    assert read_metrics(tmp_path) == records
    assert read_summary(tmp_path) == summary()
    assert read_progress(tmp_path) == progress
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["schema"] for line in lines] == [SCHEMA, SCHEMA]
    for name in ("summary.json", "progress.json"):
        assert json.loads((tmp_path / name).read_text())["schema"] == SCHEMA


@given(
    r=st.integers(1, 10_000),
    numbers=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=4, max_size=4),
    sites=st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True),
    head=st.none() | st.just(HEAD),
)
def test_a_round_record_round_trips(
    r: int, numbers: list[float], sites: list[str], head: str | None
) -> None:
    accuracy, loss, epsilon, seconds = numbers
    report = SiteRoundReport(examples=r, epsilon=epsilon, delta=1e-5, target_epsilon=8.0)
    record = RoundRecord(
        round=r,
        accuracy=accuracy,
        loss=loss,
        max_epsilon=epsilon,
        reports={s: SiteRoundReport(r, epsilon, 1e-5, 8.0, head) for s in sites} or {"a": report},
        sites=sites,
        failed=sites[:1],
        reasons={s: "why" for s in sites[:1]},
        seconds=seconds,
    )
    assert RoundRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_a_summary_keeps_the_keys_simulate_json_prints() -> None:
    """`fedsilo simulate --json` prints summary.json's object: its keys are the ones it
    printed before the records were typed, plus the schema version and
    the rounds a resumed server asked for again."""
    keys = {*LEGACY_SUMMARY, "ray", "hostile", "schema", "asked_again", "flagged"}
    assert set(summary().to_dict()) == keys
    assert Summary.from_dict(summary().to_dict()) == summary()
    # No task metrics: none written; no round: a final evaluation of nulls.
    assert "metrics" not in RoundResult(1, 0.5, 0.5, 1.0).to_dict()
    assert Summary().to_dict()["final"] == {"accuracy": None, "loss": None}
    assert "ray" not in Summary().to_dict()  # a deployed run's


def test_a_non_finite_evaluation_reads_back_as_nan(tmp_path: Path) -> None:
    RunDir(tmp_path).append_metrics(round_record(1, loss=math.inf))
    assert math.isnan(read_metrics(tmp_path)[0].loss)  # written as null (NaN is not JSON)


# ---------------------------------------------------------------- legacy files
def test_files_written_before_the_schema_key_read_as_version_1(tmp_path: Path) -> None:
    # Prepare: a run directory as fedsilo left it before records carried a version
    (tmp_path / "metrics.jsonl").write_text(LEGACY_METRICS_LINE + "\n")
    (tmp_path / "summary.json").write_text(json.dumps(LEGACY_SUMMARY))
    (tmp_path / "progress.json").write_text(json.dumps(LEGACY_PROGRESS))

    # Execute
    (record,) = read_metrics(tmp_path)
    old = read_summary(tmp_path)

    # Assert
    assert record == RoundRecord(
        round=1,
        accuracy=0.81,
        loss=0.6,
        max_epsilon=1.2,
        reports={"site-0": SiteRoundReport(480, 1.2, 1e-5, 8.0, HEAD)},
        sites=["site-0"],
        failed=["site-1"],
        reasons={"site-1": "no reply before the round timeout"},
        seconds=3.5,
    )
    assert old is not None
    new_keys = {"schema": SCHEMA, "asked_again": [], "flagged": []}
    assert old.to_dict() == {**LEGACY_SUMMARY, **new_keys}
    assert read_progress(tmp_path) == Progress(started=2, lost=[2], resumed=[1])


def test_an_old_run_resumes_and_its_lines_stay_as_written(tmp_path: Path) -> None:
    # Prepare: a stopped run of an older fedsilo, round 1 checkpointed, round 2 sent
    run = RunDir(tmp_path)
    run.save_checkpoint(1, {"w": torch.zeros(1)})
    (tmp_path / "metrics.jsonl").write_text(LEGACY_METRICS_LINE + "\n")
    (tmp_path / "progress.json").write_text(json.dumps({"started": 2, "lost": [], "resumed": []}))

    # Execute
    progress, records = run.resume_point(ask_again=False)
    run.append_metrics(round_record(3))

    # Assert: resumed after round 1; the old line is kept verbatim, the new one versioned
    assert [r.round for r in records] == [1]
    assert progress == Progress(started=2, lost=[2], resumed=[1])
    old, new = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert old == LEGACY_METRICS_LINE and json.loads(new)["schema"] == SCHEMA
    assert [r.round for r in read_metrics(tmp_path)] == [1, 3]


# ---------------------------------------------------------------- unknown versions
@pytest.mark.parametrize(
    "name,text,read",
    [
        ("metrics.jsonl", json.dumps({**json.loads(LEGACY_METRICS_LINE), "schema": 2}) + "\n",
         read_metrics),
        ("summary.json", json.dumps({**LEGACY_SUMMARY, "schema": 2}), read_summary),
        ("progress.json", json.dumps({**LEGACY_PROGRESS, "schema": 2}), read_progress),
    ],
)  # fmt: skip
def test_a_newer_schema_is_refused_with_the_fix(
    tmp_path: Path, name: str, text: str, read: Callable[[Path], object]
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as caught:
        read(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / name) in message  # the file
    assert "schema version 2" in message  # the version found
    assert "written by a newer fedsilo" in message and "Upgrade fedsilo" in message  # the fix


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, None, True])
def test_a_version_no_fedsilo_writes_is_refused_as_damaged(tmp_path: Path, version: object) -> None:
    (tmp_path / "progress.json").write_text(json.dumps({**LEGACY_PROGRESS, "schema": version}))
    with pytest.raises(DataError, match=r"which no fedsilo writes.*damaged"):
        read_progress(tmp_path)


def test_a_metrics_line_of_a_newer_version_is_refused_not_skipped(tmp_path: Path) -> None:
    """A line the server wrote whole but this fedsilo cannot read stops the reader: a
    resume that dropped it would retrain a round the sites already spent."""
    line = json.dumps({**json.loads(LEGACY_METRICS_LINE), "round": 2, "schema": 3})
    (tmp_path / "metrics.jsonl").write_text(LEGACY_METRICS_LINE + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl, line 2 has schema version 3"):
        RunDir(tmp_path).resume_point(ask_again=True)


def test_resuming_a_run_of_a_newer_fedsilo_says_why_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsilo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")  # main() sets it: restored after
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"rounds": 3, "run-id": "abc"}))
    (run / "summary.json").write_text(json.dumps({**LEGACY_SUMMARY, "schema": 2}))
    with pytest.raises(DataError, match="newer fedsilo"):
        resume_config(run)
    code = main(["simulate", "--resume", str(run)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == DataError.exit_code and "Traceback" not in err
    assert err.startswith("error:") and "summary.json has schema version 2" in err
