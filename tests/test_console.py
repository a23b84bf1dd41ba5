"""fedsilo.console's --log-format json events: one JSON object a line, the record's values."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedsilo.clients.prometheus import watch_spends
from fedsilo.clients.site_budget import SiteBudget, authorise_round
from fedsilo.config import RunConfig
from fedsilo.console import emit, end_event, round_events, stopped_round_events
from fedsilo.privacy.audit import audit
from fedsilo.privacy.ledger import ensure_policy
from fedsilo.privacy.policy import SitePolicy
from fedsilo.server.records import (
    Failure,
    Refusal,
    RoundRecord,
    RoundResult,
    SiteRoundReport,
    Summary,
)
from fedsilo.task.data import load_dataset


def test_a_round_is_its_events_with_the_reasons() -> None:
    report = SiteRoundReport(examples=10, epsilon=1.5, delta=1e-5, target_epsilon=8.0)
    record = RoundRecord(
        round=2, accuracy=0.8, loss=0.4, max_epsilon=1.5, reports={"a": report}, sites=["a"],
        failed=["c"], refused=["b"], reasons={"b": "over budget", "c": "timeout"}, seconds=2.0,
        flagged={"a": "scaled"},
    )  # fmt: skip
    events = round_events(record)
    assert events == [
        ("round", {"round": 2, "accuracy": 0.8, "loss": 0.4, "max_epsilon": 1.5,
                   "seconds": 2.0, "sites": ["a"]}),
        ("reply", {"round": 2, "site": "a", "epsilon": 1.5}),
        ("refusal", {"round": 2, "site": "b", "reason": "over budget"}),
        ("failure", {"round": 2, "site": "c", "reason": "timeout"}),
        ("flagged", {"round": 2, "site": "a", "reason": "scaled"}),
    ]  # fmt: skip
    out = io.StringIO()
    for event, fields in events:
        emit(event, fields, out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["round", "reply", "refusal", "failure", "flagged"]
    assert all(line["time"].endswith("Z") and len(line["time"]) == 24 for line in lines)


def test_a_stopped_rounds_failures_come_from_the_summary() -> None:
    summary = Summary(
        rounds=[RoundResult(round=1, accuracy=0.5, loss=1.0, max_epsilon=1.0)],
        failures=[Failure("a", 1, "x"), Failure("c", 2, "died")],
        refusals=[Refusal("b", 2, "budget")],
        completed_rounds=1,
        planned_rounds=3,
        stopped="round 2: too few",
    )
    assert stopped_round_events(summary) == [
        ("refusal", {"round": 2, "site": "b", "reason": "budget"}),
        ("failure", {"round": 2, "site": "c", "reason": "died"}),
    ]
    end = end_event(summary)
    assert (end["completed_rounds"], end["planned_rounds"]) == (1, 3)
    assert end["stopped"] == "round 2: too few"


def a_site(path: Path) -> Callable[[int], object]:
    """Site a's ledger at `path` (budget 10); the returned function spends a round of
    run r1 on it."""
    policy = SitePolicy(max_epsilon=10.0)
    ensure_policy(path, "a", policy)
    budget = SiteBudget(path, policy)
    cfg = RunConfig(rounds=3, target_epsilon=8.0, run_id="r1")
    data = load_dataset("digits", "train").subset(np.arange(300))
    return lambda server_round: authorise_round(
        budget, cfg, data, site="a", run="r1", server_round=server_round
    )


def test_a_sites_new_spends_become_events_with_its_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.clients import prometheus

    path = tmp_path / "ledger.jsonl"
    spend = a_site(path)
    spend(1)  # before watching
    asked = threading.Event()
    real = prometheus.SiteCollector.current

    def current(self: prometheus.SiteCollector) -> object:
        asked.set()
        return real(self)

    monkeypatch.setattr(prometheus.SiteCollector, "current", current)
    got: list[dict[str, object]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_spends, args=(path, got.append, stop))
    watcher.start()
    try:
        assert asked.wait(10)  # it counted the spends before its first audit: round 1
        spend(2)
        spend(3)
        for _ in range(100):
            if len(got) == 2:
                break
            stop.wait(0.1)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert [(e["site"], e["run"], e["round"], e["mode"]) for e in got] == [
        ("a", "r1", 2, "local"),
        ("a", "r1", 3, "local"),
    ]
    assert got[-1]["epsilon_total"] == audit(path).epsilon  # the total after round 3
    assert got[-1]["budget_left"] == audit(path).remaining


def test_a_spend_written_between_the_audit_and_the_read_is_told_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit counted 1 new spend but the ledger held 2 when read: the second waits
    for the audit that counts it (before, it was told twice)."""
    from fedsilo.clients import prometheus

    path = tmp_path / "ledger.jsonl"
    spend = a_site(path)
    # The watcher's audits: none until both spends are written, then the stale one
    # (one spend), then the real ones.
    go, asked = threading.Event(), threading.Event()
    answers: list[object] = []
    real = prometheus.SiteCollector.current

    def current(self: prometheus.SiteCollector) -> object:
        asked.set()
        return (answers.pop(0) if answers else real(self)) if go.is_set() else None

    monkeypatch.setattr(prometheus.SiteCollector, "current", current)
    got: list[dict[str, object]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_spends, args=(path, got.append, stop))
    watcher.start()
    try:
        assert asked.wait(10)  # it counted the spends before its first audit: none
        spend(1)
        stale = audit(path)
        spend(2)
        answers.append(stale)
        go.set()
        for _ in range(100):
            if len(got) >= 2:
                break
            stop.wait(0.1)
        stop.wait(1.5)  # time for a duplicate to show, if there were one
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert [e["round"] for e in got] == [1, 2]
    assert got[0]["epsilon_total"] == stale.epsilon < got[1]["epsilon_total"]
