"""Where a simulated site keeps its ledger: RUN_DIR/ledgers/site-N.jsonl.

Flower gives a simulated site only `partition-id`/`num-partitions` as node config,
so `fedsilo simulate` plays the role of each virtual site's operator: before the
engine starts it writes each site's policy as the head of its ledger, and the
simulated ClientApp finds the ledger from its partition id and the run directory.
The ledger code is the deployed sites' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedsilo.clients.site_budget import rounds_that_fit
from fedsilo.privacy import ledger
from fedsilo.privacy.ledger import ensure_policy
from fedsilo.privacy.policy import SitePolicy

LEDGER_DIR = "ledgers"


def simulated_ledger(run_dir: str | Path, partition_id: int) -> Path:
    return Path(run_dir) / LEDGER_DIR / f"site-{partition_id}.jsonl"


def write_site_policies(run_dir: str | Path, policies: Sequence[SitePolicy]) -> list[Path]:
    """Make policies[i] the policy of simulated site i (appending to existing ledgers)."""
    paths = []
    for pid, policy in enumerate(policies):
        path = simulated_ledger(run_dir, pid)
        ensure_policy(path, f"site-{pid}", policy)
        paths.append(path)
    return paths


def rounds_allowed(run_dir: str | Path, run: str, sites: int, rounds: int) -> dict[str, int]:
    """Each simulated site's most rounds of run `run` (up to `rounds`): the rounds it
    spent plus as many more as its budget fits at the noise it recorded, where its
    policy allows more rounds (else the rounds it planned). A site that spent nothing
    on the run yet is left out: it plans the run afresh, and checks it then."""
    allowed = {}
    for pid in range(sites):
        contents = ledger.read(simulated_ledger(run_dir, pid))
        mine = [s for s in contents.spends if s.run == run]
        if contents.policy is None or not mine:
            continue
        planned = max(s.run_rounds for s in mine)
        if not contents.policy.allow_more_rounds:
            allowed[f"site-{pid}"] = min(rounds, planned)
            continue
        more = rounds_that_fit(contents.policy, contents.events(), mine[0].event, rounds)
        allowed[f"site-{pid}"] = min(rounds, len(mine) + more)
    return allowed
