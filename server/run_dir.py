"""The run directory: everything a run leaves behind, written as it goes.

RUN_DIR/
  config.json           the resolved run config
  metrics.jsonl         one JSON object per round (appended, flushed each round)
  checkpoints/round-NNN.pt
  final_model.pt        the last global model's state_dict
  summary.json          the same object `fedsilo simulate --json` prints
  sites.json            {node id: site name}: who each authenticated node is, written
                        by the launcher (from the keys it registered) or the simulation
                        runner (from the engine's partitions); the ServerApp names sites
                        from it, never from their messages

Every JSON file is valid JSON: a non-finite number is written as null.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedsilo.errors import ConfigError


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

    def write_config(self, config: dict[str, Any]) -> None:
        _write_json_atomic(self.path / "config.json", config)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        torch.save(state, self.path / "checkpoints" / f"round-{server_round:03d}.pt")

    def save_final(self, state: dict[str, torch.Tensor]) -> None:
        torch.save(state, self.path / "final_model.pt")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_json_atomic(self.path / "summary.json", summary)


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


SITES_FILE = "sites.json"


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
