"""`fedsilo export`: a run's rounds into the experiment trackers teams compare runs in.

Examples:
  fedsilo export runs/exp1 --tensorboard tb/exp1        # then: tensorboard --logdir tb
  fedsilo export runs/exp1 --mlflow file:./mlruns       # then: mlflow ui
  fedsilo export runs/exp1 --mlflow http://mlflow.internal:5000 --experiment digits

Per round (step = round): accuracy, loss, max_epsilon, round_seconds, epsilon/SITE (each
site's epsilon for this run, as it reported it) and the task's own metrics/NAME; to
MLflow also the run config as params. Needs `pip install 'fedsilo[trackers]'`.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from fedsilo.errors import ConfigError
from fedsilo.server.trackers import to_mlflow, to_tensorboard


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export a run's rounds to TensorBoard or MLflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (simulate or server)")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files here")
    p.add_argument(
        "--mlflow", metavar="URI", help="log to this MLflow tracking URI (file:./mlruns: local)"
    )
    p.add_argument(
        "--experiment", default="fedsilo", help="the MLflow experiment (default fedsilo)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.tensorboard or args.mlflow):
        raise ConfigError(
            "`fedsilo export` needs a destination: --tensorboard DIR and/or --mlflow URI."
        )
    out = Console()
    if args.tensorboard:
        path = to_tensorboard(args.run_dir, args.tensorboard)
        out.print(f"TensorBoard: {path} (tensorboard --logdir {path})", highlight=False)
    if args.mlflow:
        run_id = to_mlflow(args.run_dir, args.mlflow, args.experiment)
        out.print(
            f"MLflow: run {run_id} in experiment {args.experiment!r} at {args.mlflow}",
            highlight=False,
        )
    return 0
