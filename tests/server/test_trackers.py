"""`fedsilo export`: TensorBoard's and MLflow's own readers get back what metrics.jsonl says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.cli import main
from fedsilo.server.records import RoundRecord, SiteRoundReport
from fedsilo.server.run_dir import RunDir
from fedsilo.server.trackers import scalars


def report(eps: float) -> SiteRoundReport:
    return SiteRoundReport(examples=100, epsilon=eps, delta=1e-5, target_epsilon=8.0)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A two-round run directory, runs/exp1 under the test's working directory."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "exp1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"rounds": 2, "run-id": "abc", "lr": 0.5}))
    writer = RunDir(run_dir)
    writer.append_metrics(
        RoundRecord(
            round=1, accuracy=0.5, loss=1.25, max_epsilon=2.0, seconds=3.0,
            reports={"site-0": report(2.0), "site-1": report(1.5)}, metrics={"auc": 0.75},
        )
    )  # fmt: skip
    writer.append_metrics(
        RoundRecord(
            round=2, accuracy=0.75, loss=0.5, max_epsilon=3.0, seconds=2.5,
            reports={"site-0": report(3.0), "site-1": report(2.5)}, metrics={"auc": 0.875},
        )
    )  # fmt: skip
    return run_dir


def test_tensorboard_reads_back_every_round(run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["export", "runs/exp1", "--tensorboard", "tb/exp1"]) == 0  # README's
    acc = EventAccumulator(str(tmp_path / "tb" / "exp1"))
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert got == {
        "accuracy": [(1, 0.5), (2, 0.75)],
        "loss": [(1, 1.25), (2, 0.5)],
        "max_epsilon": [(1, 2.0), (2, 3.0)],
        "round_seconds": [(1, 3.0), (2, 2.5)],
        "epsilon/site-0": [(1, 2.0), (2, 3.0)],
        "epsilon/site-1": [(1, 1.5), (2, 2.5)],
        "metrics/auc": [(1, 0.75), (2, 0.875)],
    }
    assert len(scalars([])) == 0


def test_mlflow_reads_back_the_params_and_metrics(run: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert main(["export", "runs/exp1", "--mlflow", "file:./mlruns"]) == 0  # README's
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("fedsilo")
    assert experiment is not None
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "abc"  # the fedsilo run id
    assert found.data.params == {"rounds": "2", "run-id": "abc", "lr": "0.5"}
    history = client.get_metric_history(found.info.run_id, "epsilon/site-1")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 2.5)]
    assert found.data.metrics["accuracy"] == 0.75  # the latest step
    assert found.info.status == "FINISHED"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["export", "{run}"], "needs a destination"),
        (["export", "{tmp}", "--tensorboard", "{tmp}/tb"], "holds no metrics.jsonl"),
        (["export", "{run}", "--tensorboard", "{run}/config.json"], "is a file"),
    ],
)
def test_user_mistakes_are_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    args = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in " ".join(err.split()) and "Traceback" not in err
