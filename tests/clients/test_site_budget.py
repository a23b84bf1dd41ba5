"""A site's budget across processes: a restarted site process keeps its spend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedsilo.clients.site_budget import SiteBudget, authorise_round, fingerprint
from fedsilo.config import RunConfig
from fedsilo.errors import BudgetExceededError
from fedsilo.privacy import ledger
from fedsilo.privacy.accountant import epsilon
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
