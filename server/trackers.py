"""A run's rounds, exported to experiment trackers: TensorBoard event files and MLflow.

`scalars(rounds)` is the one list both exporters write: for every completed round
(RUN_DIR/metrics.jsonl), at step = the round, `accuracy`, `loss`, `max_epsilon`,
`round_seconds`, `epsilon/SITE` (each site's epsilon for this run, as it reported it)
and the task's own metrics as `metrics/NAME`. MLflow also gets the run config
(config.json) as params and the run id as a tag. Nothing is exported that the run
directory does not hold.

The trackers are optional dependencies (`pip install 'fedsilo[trackers]'`:
tensorboard, mlflow-skinny); a missing one is a ConfigError that says what to install.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from fedsilo.errors import ConfigError
from fedsilo.server.records import RoundRecord
from fedsilo.server.run_dir import read_config, read_metrics

Scalar = tuple[int, str, float]  # (step = round, tag, value)
INSTALL = "pip install 'fedsilo[trackers]'"


def scalars(rounds: list[RoundRecord]) -> list[Scalar]:
    """Every finite per-round value of `rounds`, by round then tag."""
    out: list[Scalar] = []
    for r in rounds:
        values = {
            "accuracy": r.accuracy,
            "loss": r.loss,
            "max_epsilon": r.max_epsilon,
            "round_seconds": r.seconds,
            **{f"epsilon/{site}": rep.epsilon for site, rep in sorted(r.reports.items())},
            **{f"metrics/{k}": v for k, v in sorted((r.metrics or {}).items())},
        }
        out.extend((r.round, tag, float(v)) for tag, v in values.items() if math.isfinite(v))
    return out


def completed_rounds(run_dir: str | Path) -> list[RoundRecord]:
    """The run's completed rounds; a directory without any is the user's mistake."""
    path = Path(run_dir)
    if not (path / "metrics.jsonl").is_file():
        raise ConfigError(
            f"{path} holds no metrics.jsonl: it is not a fedsilo run directory (or its first "
            "round has not completed). Give the directory `simulate` or `server start` wrote."
        )
    return read_metrics(path)


def to_tensorboard(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's scalars as TensorBoard event files under `out`; returns the folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"`--tensorboard` needs the tensorboard package: {INSTALL}.") from None
    rounds = completed_rounds(run_dir)
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"`--tensorboard {out}` is a file; give a directory.")
    writer = SummaryWriter(log_dir=str(target))
    try:
        for step, tag, value in scalars(rounds):
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return target


def to_mlflow(run_dir: str | Path, uri: str, experiment: str = "fedsilo") -> str:
    """Log the run to the MLflow tracking store at `uri`: its config as params, its run
    id as a tag, its scalars as metrics. Returns the MLflow run id.

    A local `file:` store is allowed although MLflow 3 keeps it in maintenance mode: it is
    the store that works offline, as fedsilo must.
    """
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"`--mlflow` needs MLflow: {INSTALL}.") from None
    rounds = completed_rounds(run_dir)
    config = read_config(Path(run_dir))
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = str(config.get("run-id", ""))
    run = client.create_run(
        experiment_id,
        run_name=run_id or Path(run_dir).name,
        tags={"fedsilo.run_dir": str(Path(run_dir).resolve()), "fedsilo.run_id": run_id},
    )
    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
    metrics = [Metric(_mlflow_key(t), v, now, step) for step, t, v in scalars(rounds)]
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("fedsilo.rounds", str(len(rounds)))])
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)


def _mlflow_key(tag: str) -> str:
    """An MLflow metric name for `tag`: its characters beyond MLflow's set become `_`."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in tag)
