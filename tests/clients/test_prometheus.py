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
    collector = SiteCollector(path)
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
