"""The records a run directory holds, as typed values with their on-disk form.

  RoundRecord  one line of RUN_DIR/metrics.jsonl: a completed round's central
               evaluation, each participating site's report, who failed or refused
  Summary      RUN_DIR/summary.json, the object `fedsilo simulate --json` prints
  Progress     RUN_DIR/progress.json: the last round sent, rounds lost, resume points

Every file object (and every metrics line) carries `"schema": SCHEMA`. A reader
refuses a version it does not know (`check_schema`, a DataError naming the file and
the fix) rather than misread it; a record written before fedsilo wrote the key is
version 1. The layout of the files is fedsilo.server.run_dir's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import fedsilo
from fedsilo.errors import DataError

SCHEMA_KEY = "schema"
SCHEMA = 1  # the version every record here is written at; bump it when a meaning changes
LEGACY_SCHEMA = 1  # what a record without the key is: written before records carried it


def check_schema(raw: Mapping[str, Any], file: str | Path) -> None:
    """Refuse a record of a schema version this fedsilo does not read.

    Raises:
        DataError: the version is newer than SCHEMA (upgrade fedsilo), or not one
            fedsilo ever wrote (the file is damaged).
    """
    found = raw.get(SCHEMA_KEY, LEGACY_SCHEMA)
    if type(found) is int and found == SCHEMA:
        return
    if type(found) is int and found > SCHEMA:
        raise DataError(
            f"{file} has schema version {found}, but fedsilo {fedsilo.__version__} reads "
            f"version {SCHEMA} only: it was written by a newer fedsilo. Upgrade fedsilo "
            "(pip install -U fedsilo) to read it."
        )
    raise DataError(
        f"{file} has schema version {found!r}, which no fedsilo writes (this one reads "
        f"version {SCHEMA}): the file is damaged or was not written by fedsilo. Restore it "
        "from a copy, or start a new run."
    )


@dataclass(frozen=True)
class SiteRoundReport:
    """What a round's metrics line keeps of a participating site's report."""

    examples: int
    epsilon: float
    delta: float
    target_epsilon: float
    ledger_head: str | None = None  # the site's ledger sha256 after this round's spend

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "ledger_head": self.ledger_head,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SiteRoundReport:
        return SiteRoundReport(
            examples=int(d["examples"]),
            epsilon=_float(d["epsilon"]),
            delta=_float(d["delta"]),
            target_epsilon=_float(d["target_epsilon"]),
            ledger_head=_optional_str(d.get("ledger_head")),
        )


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl: a completed round (written after its checkpoint)."""

    round: int
    accuracy: float  # central evaluation of the round's global model
    loss: float
    max_epsilon: float  # the largest epsilon a participating site reported
    reports: dict[str, SiteRoundReport] = field(default_factory=dict)  # by site
    sites: list[str] = field(default_factory=list)  # whose updates were aggregated
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # of the failed and refused
    seconds: float = 0.0  # from sending the round to its evaluation
    metrics: dict[str, float] | None = None  # the task's own metrics, where it has any
    stage_seconds: dict[str, float] | None = None  # a distributed round's time per stage
    # sites a robust aggregation rule left out, scaled or cut, and how (by site)
    flagged: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA,
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            **({"metrics": dict(self.metrics)} if self.metrics else {}),
            "max_epsilon": self.max_epsilon,
            "reports": {site: r.to_dict() for site, r in self.reports.items()},
            "sites": list(self.sites),
            "failed": list(self.failed),
            "refused": list(self.refused),
            "reasons": dict(self.reasons),
            "seconds": self.seconds,
            **({"stage_seconds": dict(self.stage_seconds)} if self.stage_seconds else {}),
            **({"flagged": dict(self.flagged)} if self.flagged else {}),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> RoundRecord:
        """The record of a metrics line's object (check_schema first)."""
        return RoundRecord(
            round=int(d["round"]),
            accuracy=_float(d["accuracy"]),
            loss=_float(d["loss"]),
            max_epsilon=_float(d["max_epsilon"]),
            reports={
                str(site): SiteRoundReport.from_dict(r)
                for site, r in (d.get("reports") or {}).items()
            },
            sites=_strings(d.get("sites")),
            failed=_strings(d.get("failed")),
            refused=_strings(d.get("refused")),
            reasons={str(k): str(v) for k, v in (d.get("reasons") or {}).items()},
            seconds=_float(d.get("seconds", 0.0)),
            metrics=_floats(d.get("metrics")),
            stage_seconds=_floats(d.get("stage_seconds")),
            flagged={str(k): str(v) for k, v in (d.get("flagged") or {}).items()},
        )

    def result(self) -> RoundResult:
        """What the summary keeps of the round."""
        return RoundResult(
            round=self.round,
            accuracy=self.accuracy,
            loss=self.loss,
            max_epsilon=self.max_epsilon,
            metrics=self.metrics,
        )


@dataclass(frozen=True)
class RoundResult:
    """A round as summary.json lists it: its central evaluation and largest epsilon."""

    round: int
    accuracy: float
    loss: float
    max_epsilon: float
    metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            **({"metrics": dict(self.metrics)} if self.metrics else {}),
            "max_epsilon": self.max_epsilon,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> RoundResult:
        return RoundResult(
            round=int(d["round"]),
            accuracy=_float(d["accuracy"]),
            loss=_float(d["loss"]),
            max_epsilon=_float(d["max_epsilon"]),
            metrics=_floats(d.get("metrics")),
        )


@dataclass(frozen=True)
class FinalEvaluation:
    """The last completed round's central evaluation (None: no round completed)."""

    accuracy: float | None = None
    loss: float | None = None
    metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            **({"metrics": dict(self.metrics)} if self.metrics else {}),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> FinalEvaluation:
        return FinalEvaluation(
            accuracy=None if d.get("accuracy") is None else _float(d["accuracy"]),
            loss=None if d.get("loss") is None else _float(d["loss"]),
            metrics=_floats(d.get("metrics")),
        )


@dataclass(frozen=True)
class SiteSummary:
    """A site's latest accepted report, as summary.json lists it (the audit checks the head)."""

    site: str
    examples: int
    epsilon: float
    delta: float
    target_epsilon: float
    ledger_head: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "examples": self.examples,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "ledger_head": self.ledger_head,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SiteSummary:
        return SiteSummary(
            site=str(d["site"]),
            examples=int(d["examples"]),
            epsilon=_float(d["epsilon"]),
            delta=_float(d["delta"]),
            target_epsilon=_float(d["target_epsilon"]),
            ledger_head=_optional_str(d.get("ledger_head")),
        )


@dataclass(frozen=True)
class SiteEvent:
    """Something that happened to one site in one round, and why (summary.json lists)."""

    site: str
    round: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "round": self.round, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        return cls(str(d["site"]), int(d["round"]), str(d["reason"]))


@dataclass(frozen=True)
class Failure(SiteEvent):
    """A site that sent no usable update in a round, and why."""


@dataclass(frozen=True)
class Refusal(SiteEvent):
    """A site that refused to train in a round, in its own (public) words."""


@dataclass(frozen=True)
class Flagged(SiteEvent):
    """A site a robust aggregation rule acted on in a round (fedsilo.server.robust), and how."""


@dataclass(frozen=True)
class Summary:
    """summary.json: how a run ended (the object `fedsilo simulate --json` prints)."""

    task: str = ""
    rounds: list[RoundResult] = field(default_factory=list)  # the completed rounds
    final: FinalEvaluation = field(default_factory=FinalEvaluation)
    sites: list[SiteSummary] = field(default_factory=list)  # by name
    failures: list[Failure] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    flagged: list[Flagged] = field(default_factory=list)  # by a robust aggregation rule
    completed_rounds: int = 0
    planned_rounds: int = 0
    run_dir: str = ""
    run_id: str = ""
    lost_rounds: list[int] = field(default_factory=list)  # sent, never completed: a crash
    resumed_after: list[int] = field(default_factory=list)  # completed rounds at each resume
    asked_again: list[int] = field(default_factory=list)  # in flight at a crash, asked again
    stopped: str | None = None  # why the run stopped early, if it did
    # The simulation runner's entry: the engine and the Ray node(s) each virtual site
    # ran on (fedsilo.simulations.cluster.placement_summary); None for a deployed run.
    ray: dict[str, Any] | None = None
    # A simulation's hostile virtual sites (`simulate --hostile-sites`) and what each
    # does: never honest sites, whatever the rounds say of them. None: no hostile site.
    hostile: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA,
            "task": self.task,
            "rounds": [r.to_dict() for r in self.rounds],
            "final": self.final.to_dict(),
            "sites": [s.to_dict() for s in self.sites],
            "failures": [f.to_dict() for f in self.failures],
            "refusals": [r.to_dict() for r in self.refusals],
            "flagged": [f.to_dict() for f in self.flagged],
            "completed_rounds": self.completed_rounds,
            "planned_rounds": self.planned_rounds,
            "run_dir": self.run_dir,
            "run_id": self.run_id,
            "lost_rounds": list(self.lost_rounds),
            "resumed_after": list(self.resumed_after),
            "asked_again": list(self.asked_again),
            "stopped": self.stopped,
            **({"ray": self.ray} if self.ray is not None else {}),
            **({"hostile": dict(self.hostile)} if self.hostile is not None else {}),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Summary:
        """The summary of summary.json's object (check_schema first)."""
        return Summary(
            task=str(d.get("task") or ""),
            rounds=[RoundResult.from_dict(r) for r in d.get("rounds") or []],
            final=FinalEvaluation.from_dict(d.get("final") or {}),
            sites=[SiteSummary.from_dict(s) for s in d.get("sites") or []],
            failures=[Failure.from_dict(f) for f in d.get("failures") or []],
            refusals=[Refusal.from_dict(r) for r in d.get("refusals") or []],
            flagged=[Flagged.from_dict(f) for f in d.get("flagged") or []],
            completed_rounds=int(d.get("completed_rounds") or 0),
            planned_rounds=int(d.get("planned_rounds") or 0),
            run_dir=str(d.get("run_dir") or ""),
            run_id=str(d.get("run_id") or ""),
            lost_rounds=[int(r) for r in d.get("lost_rounds") or []],
            resumed_after=[int(r) for r in d.get("resumed_after") or []],
            asked_again=[int(r) for r in d.get("asked_again") or []],
            stopped=_optional_str(d.get("stopped")) or None,
            ray=dict(d["ray"]) if isinstance(d.get("ray"), Mapping) else None,
            hostile=(
                {str(k): str(v) for k, v in d["hostile"].items()}
                if isinstance(d.get("hostile"), Mapping)
                else None
            ),
        )


@dataclass(frozen=True)
class Progress:
    """How far a run got: the last round sent, rounds lost to crashes, resume points."""

    started: int = 0  # the last round whose messages the server sent (or was about to)
    lost: list[int] = field(default_factory=list)  # sent, never completed: a crash
    resumed: list[int] = field(default_factory=list)  # completed rounds at each resume
    # In flight at a crash and asked for again on resume (sites resend kept replies).
    asked_again: list[int] = field(default_factory=list)

    @property
    def asking_again(self) -> list[int]:
        """The rounds the latest resume asks for again (in flight at its crash)."""
        last = self.resumed[-1] if self.resumed else 0
        return [r for r in self.asked_again if r > last]

    def to_dict(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA,
            "started": self.started,
            "lost": list(self.lost),
            "resumed": list(self.resumed),
            "asked_again": list(self.asked_again),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Progress:
        """The progress of progress.json's object (check_schema first)."""
        return Progress(
            started=int(d["started"]),
            lost=[int(r) for r in d["lost"]],
            resumed=[int(r) for r in d["resumed"]],
            asked_again=[int(r) for r in d.get("asked_again") or []],
        )


OUTCOMES = {Failure: "failed", Refusal: "refused", Flagged: "flagged"}


def site_events(rounds: list[RoundRecord], summary: Summary | None) -> list[SiteEvent]:
    """Every failure, refusal and flag of a run, by round: the completed rounds' from
    their records, then a stopped round's failures and refusals that only summary.json
    holds. `OUTCOMES[type(event)]` names each (failed, refused, flagged)."""
    out: list[SiteEvent] = []
    for record in rounds:
        out += [Failure(s, record.round, record.reasons.get(s, "")) for s in record.failed]
        out += [Refusal(s, record.round, record.reasons.get(s, "")) for s in record.refused]
        out += [Flagged(s, record.round, why) for s, why in sorted(record.flagged.items())]
    if summary is not None:
        done = {r.round for r in rounds}
        out += [e for e in (*summary.failures, *summary.refusals) if e.round not in done]
    return out


def _float(value: Any) -> float:
    """A number as written (a non-finite one is written as null: read back as NaN)."""
    return math.nan if value is None else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value or []]


def _floats(value: Any) -> dict[str, float] | None:
    return {str(k): _float(v) for k, v in value.items()} if value else None
