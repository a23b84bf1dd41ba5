"""The run directory: everything a run leaves behind, written as it goes.

RUN_DIR/
  config.json           the resolved run config
  metrics.jsonl         one JSON object per round (appended, flushed each round)
  checkpoints/round-NNN.pt
  final_model.pt        the last global model's state_dict
  summary.json          the same object `fedsilo simulate --json` prints
  progress.json         the last round the server sent (written before sending it), the
                        rounds lost to crashes and where the run resumed: what
                        `--resume` needs beyond metrics.jsonl and the checkpoints
  sites.json            {node id: site name}: who each authenticated node is, written
                        by the launcher (from the keys it registered) or the simulation
                        runner (from the engine's partitions); the ServerApp names sites
                        from it, never from their messages
  federation-ca.crt     the federation CA's certificate (public), with --dp distributed:
                        the server checks the sites' signed secure-aggregation keys
                        against it. Copied from the server kit by `fedsilo server start`;
                        a simulation's throwaway CA (fedsilo.simulations.identities)

Every JSON file is valid JSON: a non-finite number is written as null.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography import x509

from fedsilo.errors import ConfigError
from fedsilo.privacy.pki import load_cert


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class RunDir:
    """Writer for one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"Cannot create run directory {self.path}: {exc.strerror}.") from None

    def federation_ca(self) -> x509.Certificate:
        """The federation CA's certificate the launcher left here (ConfigError if none)."""
        path = self.path / FEDERATION_CA
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing: distributed DP checks the sites' signed keys against "
                "the federation CA. Start the run with `fedsilo server start` or "
                "`fedsilo simulate`, which put it there, or copy the kit's ca.crt there."
            )
        return load_cert(path)

    def write_config(self, config: dict[str, Any]) -> None:
        _write_json_atomic(self.path / "config.json", config)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        torch.save(state, self.path / "checkpoints" / f"round-{server_round:03d}.pt")

    def save_momentum(self, server_round: int, velocity: torch.Tensor) -> None:
        """Distributed DP's server-side momentum after a round (post-processing of the sums)."""
        torch.save(velocity, self.path / "checkpoints" / f"round-{server_round:03d}-momentum.pt")

    def momentum(self, server_round: int) -> torch.Tensor | None:
        path = self.path / "checkpoints" / f"round-{server_round:03d}-momentum.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def save_final(self, state: dict[str, torch.Tensor]) -> None:
        torch.save(state, self.path / "final_model.pt")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_json_atomic(self.path / "summary.json", summary)

    def write_progress(self, progress: Progress) -> None:
        _write_json_atomic(self.path / PROGRESS_FILE, progress.to_dict())

    def checkpoint(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:03d}.pt"

    def resume_point(self) -> tuple[Progress, list[dict[str, Any]]]:
        """Where a resumed run goes on: its progress and the rounds it completed.

        A round is completed when its checkpoint and its metrics line were both written
        (in that order); a metrics line cut off by the crash is removed, so the resumed
        server appends to whole lines. Rounds sent but not completed are lost: the sites
        spent them (their ledgers record it) and never train them again.
        """
        records = read_metrics(self.path)
        file = self.path / "metrics.jsonl"
        if file.exists():
            whole = "".join(dumps(r) + "\n" for r in records)
            if file.read_text(encoding="utf-8") != whole:
                file.write_text(whole, encoding="utf-8")
        records = [r for r in records if self.checkpoint(int(r["round"])).exists()]
        progress = read_progress(self.path)
        completed = int(records[-1]["round"]) if records else 0
        started = max(progress.started, completed)
        lost = sorted({*progress.lost, *range(completed + 1, started + 1)})
        resumed = Progress(started=started, lost=lost, resumed=[*progress.resumed, completed])
        return resumed, records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of RUN_DIR/metrics.jsonl (a line being written is skipped)."""
    file = Path(path) / "metrics.jsonl"
    if not file.exists():
        return []
    out = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class Progress:
    """How far a run got: the last round sent, rounds lost to crashes, resume points."""

    started: int = 0  # the last round whose messages the server sent (or was about to)
    lost: list[int] = field(default_factory=list)  # sent, never completed: a crash
    resumed: list[int] = field(default_factory=list)  # completed rounds at each resume

    def to_dict(self) -> dict[str, Any]:
        return {"started": self.started, "lost": self.lost, "resumed": self.resumed}


def read_progress(path: str | Path) -> Progress:
    """RUN_DIR/progress.json (a fresh Progress when absent or unreadable)."""
    try:
        raw = json.loads((Path(path) / PROGRESS_FILE).read_text(encoding="utf-8"))
        return Progress(
            started=int(raw["started"]),
            lost=[int(r) for r in raw["lost"]],
            resumed=[int(r) for r in raw["resumed"]],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return Progress()


def resume_config(path: str | Path, *, rounds: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The run directory and recorded run config of a run to resume, checked.

    Raises:
        ConfigError: not a fedsilo run directory, a run without a run id, or one
            that already completed every round (and `rounds` asks for no more).
    """
    run_dir = Path(path).resolve()
    try:
        values: dict[str, Any] = json.loads((run_dir / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        raise ConfigError(
            f"{run_dir} holds no readable config.json: it is not a fedsilo run directory, or "
            "its run stopped before its first round. Start a new run instead."
        ) from None
    if not values.get("run-id"):
        raise ConfigError(
            f"The run in {run_dir} has no run-id (it was started by an older fedsilo), so its "
            "sites could not tell it from a new run; it cannot be resumed. Start a new run."
        )
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    planned = int(values.get("rounds") or 0)
    if isinstance(summary, dict) and run_complete(summary) and (rounds or 0) <= planned:
        raise ConfigError(
            f"The run in {run_dir} already finished its {summary.get('planned_rounds')} "
            "round(s); there is nothing to resume. Start a new run, or resume it with "
            "--rounds N above that where its sites allow more rounds."
        )
    values["run-dir"] = str(run_dir)
    values["resume"] = True
    return run_dir, values


def run_complete(summary: dict[str, Any]) -> bool:
    """Whether a run's summary shows every planned round either completed or lost."""
    done = int(summary.get("completed_rounds") or 0) + len(summary.get("lost_rounds") or [])
    return not summary.get("stopped") and done >= int(summary.get("planned_rounds") or 0)


SITES_FILE = "sites.json"
FEDERATION_CA = "federation-ca.crt"


def write_site_names(run_dir: str | Path, names: dict[int, str]) -> None:
    """Record which site each authenticated node is (node id -> site name)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(Path(run_dir) / SITES_FILE, {str(k): v for k, v in names.items()})


def read_site_names(run_dir: str | Path) -> dict[int, str]:
    """The node id -> site name map of a run ({} when none was written or it is unreadable)."""
    try:
        raw = json.loads((Path(run_dir) / SITES_FILE).read_text(encoding="utf-8"))
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text of `obj` with every non-finite float as null (NaN is not JSON)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
