"""fedsilo.clients.prometheus: a site's scrape is its own ledger's audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsilo.clients.prometheus import SiteCollector
from fedsilo.clients.site_budget import SiteBudget, authorise_round
from fedsilo.config import RunConfig
from fedsilo.privacy import ledger
from fedsilo.privacy.audit import audit
from fedsilo.privacy.ledger import ensure_policy
from fedsilo.privacy.policy import SitePolicy
from fedsilo.task.data import load_dataset
from tests.metrics import scrape


def site(path: Path) -> SiteBudget:
    """A site whose ledger starts with its policy (max epsilon 10), as a site's does."""
    policy = SitePolicy(max_epsilon=10.0)
    ensure_policy(path, "a", policy)
    return SiteBudget(path, policy)


def test_the_scrape_is_the_ledgers_audit_and_follows_new_spends(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    collector = SiteCollector(path, audit_every_s=0.0)
    assert scrape(collector) == {}  # no ledger yet: nothing to say
    budget = site(path)
    cfg = RunConfig(rounds=3, target_epsilon=8.0, run_id="r1")
    data = load_dataset("digits", "train").subset(np.arange(300))
    authorise_round(budget, cfg, data, site="a", run="r1", server_round=1)
    first = scrape(collector)
    assert first["fedsilo_site_rounds_trained_total", ()] == 1
    authorise_round(budget, cfg, data, site="a", run="r1", server_round=2)
    got = scrape(collector)  # the file changed: audited again
    found = audit(path)
    assert got["fedsilo_site_rounds_trained_total", ()] == 2
    assert got["fedsilo_site_dp_steps_total", ()] == found.steps
    assert got["fedsilo_site_epsilon", (("accountant", "budget"),)] == pytest.approx(found.epsilon)
    assert got["fedsilo_site_epsilon", (("accountant", "rdp"),)] == pytest.approx(found.epsilon_rdp)
    assert (
        got["fedsilo_site_epsilon", (("accountant", "budget"),)]
        > first["fedsilo_site_epsilon", (("accountant", "budget"),)]
    )
    assert got["fedsilo_site_budget_epsilon", ()] == 10.0
    assert got["fedsilo_site_budget_left_epsilon", ()] == pytest.approx(10.0 - found.epsilon)
    assert got["fedsilo_site_ledger_ok", ()] == 1


def test_a_new_spend_is_audited_once_the_last_audit_is_old_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scraper asking each second gets one audit per AUDIT_EVERY_S, not one per spend:
    the audit's CPU is the site's training time."""
    from fedsilo.clients import prometheus

    clock = [1000.0]
    monkeypatch.setattr(prometheus, "_now", lambda: clock[0])
    path = tmp_path / "ledger.jsonl"
    budget = site(path)
    cfg = RunConfig(rounds=3, target_epsilon=8.0, run_id="r1")
    data = load_dataset("digits", "train").subset(np.arange(300))
    authorise_round(budget, cfg, data, site="a", run="r1", server_round=1)
    collector = SiteCollector(path)
    assert collector.audit_every_s == prometheus.AUDIT_EVERY_S == 15.0
    first = scrape(collector)
    assert first["fedsilo_site_rounds_trained_total", ()] == 1
    stamp = first["fedsilo_site_audit_timestamp_seconds", ()]
    authorise_round(budget, cfg, data, site="a", run="r1", server_round=2)
    clock[0] += 14.0
    held = scrape(collector)  # changed, but the last audit is 14 s old: shown as it was
    assert held["fedsilo_site_rounds_trained_total", ()] == 1
    assert held["fedsilo_site_audit_timestamp_seconds", ()] == stamp
    clock[0] += 1.0
    got = scrape(collector)
    assert got["fedsilo_site_rounds_trained_total", ()] == 2
    assert got["fedsilo_site_audit_timestamp_seconds", ()] >= stamp
    assert got["fedsilo_site_epsilon", (("accountant", "budget"),)] == pytest.approx(
        audit(path).epsilon
    )
    clock[0] += 100.0
    calls: list[Path] = []
    monkeypatch.setattr(prometheus, "audit", lambda p: calls.append(p))
    scrape(collector)  # unchanged: no audit however old the last one
    assert calls == []


def test_a_tampered_ledger_scrapes_as_not_ok(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    budget = site(path)
    cfg = RunConfig(rounds=3, target_epsilon=8.0, run_id="r1")
    data = load_dataset("digits", "train").subset(np.arange(300))
    authorise_round(budget, cfg, data, site="a", run="r1", server_round=1)
    assert ledger.read(path).spends
    text = path.read_text()
    assert '"round":1' in text
    path.write_text(text.replace('"round":1', '"round":7', 1))
    assert scrape(SiteCollector(path))["fedsilo_site_ledger_ok", ()] == 0


def test_the_scrape_adds_the_sites_status_file(tmp_path: Path) -> None:
    from fedsilo.clients import site_status

    path = tmp_path / "ledger.jsonl"
    site(path)
    collector = SiteCollector(path)
    assert not any(k[0] == "fedsilo_site_messages_total" for k in scrape(collector))
    args = {"seconds": 3.0, "received": 1000, "sent": 900}
    site_status.record(path, "a", server_round=1, outcome="answered", steps=6, **args)
    refused = {"outcome": "refused", "error": "refused: budget"}
    site_status.record(path, "a", server_round=2, **refused, **args)
    got = scrape(collector)
    assert got["fedsilo_site_messages_total", (("outcome", "answered"),)] == 1
    assert got["fedsilo_site_messages_total", (("outcome", "refused"),)] == 1
    assert got["fedsilo_site_messages_total", (("outcome", "error"),)] == 0
    assert got["fedsilo_site_train_seconds_total", ()] == 6.0
    assert got["fedsilo_site_dp_step_seconds", ()] == 0.5  # the trained round's, kept
    assert got["fedsilo_site_bytes_received_total", ()] == 2000
    assert got["fedsilo_site_bytes_sent_total", ()] == 1800
    assert got["fedsilo_site_last_error_round", ()] == 2
    assert got["fedsilo_site_last_error_info", (("error", "refused: budget"),)] == 1


def test_an_audit_off_the_main_thread_runs_at_the_lowest_priority(tmp_path: Path) -> None:
    import os
    import sys
    import threading

    path = tmp_path / "ledger.jsonl"
    site(path)
    seen: list[int] = []

    def scrape_thread() -> None:
        SiteCollector(path).current()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=scrape_thread)
    thread.start()
    thread.join()
    before = os.getpriority(os.PRIO_PROCESS, 0)  # the main thread's (its id is the pid's)
    SiteCollector(path).current()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    if sys.platform == "linux":
        assert seen == [19]
