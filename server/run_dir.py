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
  sites-online.json     {"online": N, "time": UNIX}: the sites connected now, written by
                        the launcher when the count changes (a simulation: once, all of
                        them); what the dashboard shows as sites online
  federation-ca.crt     the federation CA's certificate (public), with --dp distributed:
                        the server checks the sites' signed secure-aggregation keys
                        against it. Copied from the server kit by `fedsilo server start`;
                        a simulation's throwaway CA (fedsilo.simulations.identities)

Every JSON file is valid JSON: a non-finite number is written as null. metrics.jsonl,
summary.json and progress.json hold the records of fedsilo.server.records, each with
its schema version; their readers here refuse a version they do not know.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from cryptography import x509

from fedsilo.errors import ConfigError, DataError
from fedsilo.privacy.pki import load_cert
from fedsilo.server.records import Progress, RoundRecord, Summary, check_schema


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# What a run leaves in its directory from its start (a simulation's site ledgers first).
RUN_MARKERS = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "progress.json",
    "flwr-home",
    "ledgers",
)


def new_run_dir(path: str | Path) -> Path:
    """`path` made ready for a new run (created), before anything is written there:
    `simulate` and `server start` never write into a directory that holds a run.

    Raises:
        ConfigError: it already holds a run (nothing there is touched), it or a parent
            is a file, or it cannot be created.
    """
    run_dir = Path(path)
    for used in RUN_MARKERS:
        if (run_dir / used).exists():
            raise ConfigError(
                f"Run directory {run_dir} already holds a run ({used}); nothing was started "
                "or changed. Pick a new one with --out, or continue it with --resume."
            )
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "" if blocker == run_dir else f": {blocker}"
        raise ConfigError(f"Run directory {run_dir}{what} is a file. Pick another with --out.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass  # writable, whoever runs this (permissions alone do not say so for root)
    except OSError as exc:
        raise ConfigError(
            f"Cannot use {run_dir} as the run directory: {exc.strerror or exc}. Pick a "
            "directory you can write with --out."
        ) from None
    return run_dir


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

    def append_metrics(self, record: RoundRecord) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(dumps(record.to_dict()) + "\n")
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

    def write_summary(self, summary: Summary) -> None:
        _write_json_atomic(self.path / SUMMARY_FILE, summary.to_dict())

    def write_progress(self, progress: Progress) -> None:
        _write_json_atomic(self.path / PROGRESS_FILE, progress.to_dict())

    def checkpoint(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:03d}.pt"

    def resume_point(self, *, ask_again: bool) -> tuple[Progress, list[RoundRecord]]:
        """Where a resumed run goes on: its progress and the rounds it completed.

        A round is completed when its checkpoint and its metrics line were both written
        (in that order); a metrics line cut off by the crash is removed, so the resumed
        server appends to whole lines. For the round in flight when the server stopped,
        see `resume_progress`.
        """
        file = self.path / METRICS_FILE
        lines = _metrics_lines(file)
        if file.exists():
            whole = "".join(line + "\n" for line, _ in lines)
            if file.read_text(encoding="utf-8") != whole:
                file.write_text(whole, encoding="utf-8")
        records = [r for _, r in lines if self.checkpoint(r.round).exists()]
        completed = records[-1].round if records else 0
        return resume_progress(read_progress(self.path), completed, ask_again=ask_again), records


def resume_progress(progress: Progress, completed: int, *, ask_again: bool) -> Progress:
    """The progress a run resumed after round `completed` goes on with.

    The round in flight when the server stopped (sent, not completed) was spent by
    every site that trained it. With `ask_again` (local DP) the resumed server asks for
    it again: a site that trained it resends the reply it kept, at no new spend
    (fedsilo.clients.kept_reply), and one that never got it trains it now. Without
    (distributed DP, where a site never resends a masked input) it is lost.
    """
    started = max(progress.started, completed)
    in_flight = list(range(completed + 1, started + 1))
    if ask_again:
        return Progress(
            started=completed,
            lost=sorted(set(progress.lost) - set(in_flight)),
            resumed=[*progress.resumed, completed],
            asked_again=sorted({*progress.asked_again, *in_flight}),
        )
    return Progress(
        started=started,
        lost=sorted({*progress.lost, *in_flight}),
        resumed=[*progress.resumed, completed],
        asked_again=list(progress.asked_again),
    )


METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.json"


def read_metrics(path: str | Path) -> list[RoundRecord]:
    """The rounds of RUN_DIR/metrics.jsonl's complete lines (a line being written is skipped).

    Raises:
        DataError: a line of a schema version this fedsilo does not read, or one that
            is JSON but no round record.
    """
    return [record for _, record in _metrics_lines(Path(path) / METRICS_FILE)]


def _metrics_lines(file: Path) -> list[tuple[str, RoundRecord]]:
    """Each complete line of a metrics.jsonl with its record, up to one cut off."""
    if not file.exists():
        return []
    out = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            break
        where = f"{file}, line {number}"
        if not isinstance(raw, dict):
            raise DataError(f"{where} is not a round record (a JSON object). {_DAMAGED}")
        check_schema(raw, where)
        try:
            out.append((line, RoundRecord.from_dict(raw)))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"{where} is not a round record ({_why(exc)}). {_DAMAGED}") from None
    return out


def read_progress(path: str | Path) -> Progress:
    """RUN_DIR/progress.json (a fresh Progress when absent or unreadable).

    Raises:
        DataError: it is of a schema version this fedsilo does not read.
    """
    file = Path(path) / PROGRESS_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Progress()
    if not isinstance(raw, dict):
        return Progress()
    check_schema(raw, file)
    try:
        return Progress.from_dict(raw)
    except (ValueError, KeyError, TypeError):
        return Progress()


def read_summary(path: str | Path) -> Summary | None:
    """RUN_DIR/summary.json (None when absent or unreadable).

    Raises:
        DataError: it is of a schema version this fedsilo does not read.
    """
    file = Path(path) / SUMMARY_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    check_schema(raw, file)
    try:
        return Summary.from_dict(raw)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


_DAMAGED = "The file is damaged or was not written by fedsilo; restore it from a copy."


def _why(exc: Exception) -> str:
    return f"no {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__


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
    summary = read_summary(run_dir)
    planned = int(values.get("rounds") or 0)
    if summary is not None and run_complete(summary) and (rounds or 0) <= planned:
        raise ConfigError(
            f"The run in {run_dir} already finished its {summary.planned_rounds} "
            "round(s); there is nothing to resume. Start a new run, or resume it with "
            "--rounds N above that where its sites allow more rounds."
        )
    for key, then in ADDED_SINCE.items():  # a run recorded before the key existed
        values.setdefault(key, then)
    values["run-dir"] = str(run_dir)
    values["resume"] = True
    return run_dir, values


# Run-config keys added after runs were recorded, with the value such a run used.
ADDED_SINCE = {
    "aggregation": "fedavg",
    "update-codec": "float32",
    "model-codec": "float32",
    "precision": "fp32",
}


def run_complete(summary: Summary) -> bool:
    """Whether a run's summary shows every planned round either completed or lost."""
    done = summary.completed_rounds + len(summary.lost_rounds)
    return not summary.stopped and done >= summary.planned_rounds


CONFIG_FILE = "config.json"
SITES_FILE = "sites.json"
FEDERATION_CA = "federation-ca.crt"
ONLINE_FILE = "sites-online.json"


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/config.json as recorded ({} when absent or unreadable): for showing a run,
    never for resuming one (fedsilo.server.run_dir's resume check refuses a bad one)."""
    try:
        raw = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def write_online(run_dir: str | Path, online: int) -> None:
    """Record how many sites are connected now."""
    _write_json_atomic(Path(run_dir) / ONLINE_FILE, {"online": online, "time": time.time()})


def read_online(run_dir: str | Path) -> tuple[int, float] | None:
    """(sites connected, when that was recorded), or None when nothing is recorded."""
    try:
        raw = json.loads((Path(run_dir) / ONLINE_FILE).read_text(encoding="utf-8"))
        return int(raw["online"]), float(raw["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_site_names(run_dir: str | Path, names: dict[int, str]) -> None:
    """Record which site each authenticated node is (node id -> site name)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(Path(run_dir) / SITES_FILE, {str(k): v for k, v in names.items()})


def add_site_name(run_dir: str | Path, node: int, name: str) -> None:
    """Add node -> name to the run's map, under a lock: `flwr run`'s virtual sites each
    record their own, from processes that run at once (fedsilo.simulations.flwr_run)."""
    import fcntl  # POSIX; only that simulation's sites call this

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / (SITES_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = read_site_names(run_dir)
        if names.get(node) != name:
            write_site_names(run_dir, {**names, node: name})


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
