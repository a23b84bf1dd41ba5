"""A site's budget across processes: a restarted site process keeps its spend."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsilo.clients.site_budget import RoundRefused, SiteBudget, authorise_round
from fedsilo.config import RunConfig
from fedsilo.errors import BudgetExceededError
from fedsilo.privacy import ledger
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.privacy.policy import SitePolicy
from fedsilo.task.data import load_dataset

CFG = RunConfig(rounds=2, local_epochs=1, accountant="rdp", target_epsilon=4.0)


# A whole site process: authorise round 1 of run "1", then exit (its memory is gone).
SITE_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from fedsilo.clients.site_budget import SiteBudget, authorise_round
from fedsilo.config import RunConfig
from fedsilo.privacy.policy import SitePolicy
from fedsilo.task.data import load_dataset

cfg = RunConfig(rounds=2, local_epochs=1, accountant="rdp", target_epsilon=4.0)
data = load_dataset("digits", "train").subset(np.arange(400))
budget = SiteBudget(Path(sys.argv[1]), SitePolicy(max_epsilon=4.0))
authorise_round(budget, cfg, data, site="site-a", run="1", server_round=1)
"""


def test_restarted_site_process_keeps_its_spend(tmp_path: Path) -> None:
    # Prepare: round 1 in one process that then exits.
    path = tmp_path / "site-a.jsonl"
    ledger.ensure_policy(path, "site-a", SitePolicy(max_epsilon=4.0))
    # A fresh interpreter: a forked child of a process that ran torch can hang in OpenMP.
    res = subprocess.run(
        [sys.executable, "-c", SITE_PROCESS, str(path)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    # Execute: round 2 in this process, which never saw round 1.
    data = load_dataset("digits", "train").subset(np.arange(400))
    budget = SiteBudget(path, SitePolicy(max_epsilon=4.0))
    auth = authorise_round(budget, CFG, data, site="site-a", run="1", server_round=2)
    # Assert: the plan and the spend come from the ledger.
    first = ledger.read(path).spends[0]
    assert auth.run_prior == [first.event] and auth.event == first.event
    assert auth.site_epsilon == pytest.approx(epsilon([first.event] * 2, delta=1e-5))
    assert first.dataset == fingerprint(data)
    # Another run on the same data no longer fits: the budget is spent.
    with pytest.raises(BudgetExceededError, match="over its budget of 4"):
        authorise_round(budget, CFG, data, site="site-a", run="2", server_round=1)


def fresh(tmp_path: Path, max_epsilon: float = 20.0) -> SiteBudget:
    path = tmp_path / "site-a.jsonl"
    ledger.ensure_policy(path, "site-a", SitePolicy(max_epsilon=max_epsilon))
    return SiteBudget(path, SitePolicy(max_epsilon=max_epsilon))


DIGITS = load_dataset("digits", "train").subset(np.arange(400))


def test_a_run_never_trains_beyond_its_plan(tmp_path: Path) -> None:
    # The finding: target 4, 1 planned round, a site budget of 20; rounds 1, 1, 2, 3 all
    # trained and the run's epsilon went 3.99, 5.41, 6.55, 7.54.
    budget = fresh(tmp_path)
    cfg = RunConfig(rounds=1, local_epochs=1, accountant="rdp", target_epsilon=4.0)
    auth = authorise_round(budget, cfg, DIGITS, site="site-a", run="9", server_round=1)
    for server_round, needle in ((1, "already trained"), (2, "outside this run's planned")):
        with pytest.raises(RoundRefused, match=needle):
            authorise_round(budget, cfg, DIGITS, site="site-a", run="9", server_round=server_round)
    with pytest.raises(RoundRefused, match="outside"):
        authorise_round(budget, cfg, DIGITS, site="site-a", run="10", server_round=0)
    # A server that re-plans mid-run (more rounds) is refused too, from the ledger alone.
    more = dataclasses.replace(cfg, rounds=5)
    with pytest.raises(RoundRefused, match="rounds changed from 1"):
        authorise_round(budget, more, DIGITS, site="site-a", run="9", server_round=2)
    spends = ledger.read(budget.ledger).spends
    assert [(s.run, s.round, s.run_rounds) for s in spends] == [("9", 1, 1)]
    run_eps = epsilon([auth.event], delta=1e-5, accountant="rdp")
    assert run_eps <= 4.0


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 32}, {"local_epochs": 2}, {"max_grad_norm": 0.5}, {"target_delta": 1e-6}],
)
def test_a_runs_plan_cannot_change_mid_run(tmp_path: Path, change: dict[str, object]) -> None:
    budget = fresh(tmp_path)
    cfg = RunConfig(rounds=3, local_epochs=1, accountant="rdp", target_epsilon=4.0)
    authorise_round(budget, cfg, DIGITS, site="site-a", run="1", server_round=1)
    changed = dataclasses.replace(cfg, **change)  # type: ignore[arg-type]
    with pytest.raises(RoundRefused, match="changed from"):
        authorise_round(budget, changed, DIGITS, site="site-a", run="1", server_round=2)


def test_changed_data_never_gets_a_fresh_budget(tmp_path: Path) -> None:
    # The finding: the same data minus one example, or re-ordered, got a full new budget.
    # Each run costs PRV epsilon 3.37; two compose to 4.28, three to 5.01 (> 4.5).
    budget = fresh(tmp_path, max_epsilon=4.5)
    cfg = RunConfig(rounds=1, local_epochs=1, accountant="rdp", target_epsilon=4.0)
    variants = [
        DIGITS,
        DIGITS.subset(np.arange(399)),  # one example removed
        DIGITS.subset(np.arange(400)[::-1].copy()),  # the same rows in another order
    ]
    events = []
    for run, data in enumerate(variants[:2]):
        events.append(
            authorise_round(budget, cfg, data, site="site-a", run=str(run), server_round=1).event
        )
    spent = epsilon(events, delta=1e-5, accountant="prv")
    assert spent < 4.5
    # A third run does not fit: the budget covers everything on the ledger, whatever data.
    with pytest.raises(BudgetExceededError):
        authorise_round(budget, cfg, variants[2], site="site-a", run="2", server_round=1)
    from fedsilo.privacy.audit import audit

    report = audit(budget.ledger)
    assert report.epsilon_prv == pytest.approx(spent, rel=1e-9)  # what the site enforces
    assert len({s.dataset for s in ledger.read(budget.ledger).spends}) == 2
