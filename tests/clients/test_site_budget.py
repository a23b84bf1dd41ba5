"""A site's budget across processes: a restarted site process keeps its spend."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

from fedsilo.clients.site_budget import RoundRefused, SiteBudget, authorise_round
from fedsilo.config import RunConfig
from fedsilo.errors import BudgetExceededError, PrivacyError
from fedsilo.privacy import ledger
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.distributed import planned
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.privacy.policy import SitePolicy
from fedsilo.task.data import Dataset, load_dataset

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


def test_more_rounds_only_where_the_policy_allows_them_and_the_budget_fits(
    tmp_path: Path,
) -> None:
    """A resumed run with more rounds: the same noise and steps a round, recorded with
    the new plan, only for a site whose policy allows it (allow-more-rounds) and only
    as many rounds as fit its whole budget; never fewer rounds."""
    policy = SitePolicy(max_epsilon=6.0, allow_more_rounds=1)
    path = tmp_path / "site-a.jsonl"
    ledger.ensure_policy(path, "site-a", policy)
    budget = SiteBudget(path, policy)
    cfg = RunConfig(rounds=2, local_epochs=1, accountant="rdp", target_epsilon=3.0)
    for r in (1, 2):
        authorise_round(budget, cfg, DIGITS, site="site-a", run="7", server_round=r)
    # Execute: 3 rounds fit a budget of 6 at the noise calibrated for 2 rounds at 3.
    longer = dataclasses.replace(cfg, rounds=3)
    auth = authorise_round(budget, longer, DIGITS, site="site-a", run="7", server_round=3)
    spends = ledger.read(path).spends
    assert [(s.round, s.run_rounds) for s in spends] == [(1, 2), (2, 2), (3, 3)]
    assert len({s.event for s in spends}) == 1  # the recorded noise, not a new plan
    assert 3.0 < auth.site_epsilon <= 6.0
    # Many more do not fit, nor do fewer; the ledger is untouched.
    with pytest.raises(BudgetExceededError, match="extending this run to 40 rounds"):
        authorise_round(
            budget,
            dataclasses.replace(cfg, rounds=40),
            DIGITS,
            site="site-a",
            run="7",
            server_round=4,
        )
    with pytest.raises(RoundRefused, match="never lets it shrink"):
        authorise_round(budget, cfg, DIGITS, site="site-a", run="7", server_round=4)
    assert len(ledger.read(path).spends) == 3


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
    assert report.epsilon == pytest.approx(spent, rel=1e-9)  # what the site enforces
    assert len({s.dataset for s in ledger.read(budget.ledger).spends}) == 2


# --------------------------------------------------------------- distributed DP
ALL_DIGITS = load_dataset("digits", "train")  # 1,438 rows: sites may share some


def distributed_sites(tmp_path: Path, sizes: tuple[int, ...]) -> list[tuple[SiteBudget, Dataset]]:
    """One fresh ledger per site (budget 10, distributed DP allowed at 3 sites) and its data."""
    policy = SitePolicy(max_epsilon=10.0, distributed_min_sites=3)
    out = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"site-{i}.jsonl"
        ledger.ensure_policy(path, f"site-{i}", policy)
        out.append((SiteBudget(path, policy), ALL_DIGITS.subset(np.arange(n) + 400 * (i % 2))))
    return out


def google_pld_epsilon(*, sigma: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's PLD epsilon of `steps` Poisson-subsampled Gaussian steps."""
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    return float(acc.get_epsilon(delta))


def distributed_run(**kw: float) -> RunConfig:
    """A distributed-DP run of 3 sites at epsilon 3, batch 10 (not yet planned)."""
    base = {"batch_size": 10, "target_epsilon": 3.0, "dp_min_sites": 3, "min_sites": 3}
    return RunConfig(dp="distributed", **{**base, **kw})  # type: ignore[arg-type]


def test_distributed_sites_of_10x_different_sizes_record_what_the_sum_spends(
    tmp_path: Path,
) -> None:
    """The finding: sites of 100, 1,000 and 1,000 examples (sample rates 0.1, 0.01, 0.01)
    each calibrated their own multiplier (0.98, 0.57, 0.57); the sum carried their root
    mean square (0.73), and the small site, recording epsilon 3.0, spent 5.44 by
    dp_accounting's PLD. With the run's one multiplier (0.98) it records 2.995 against
    PLD's 2.984, and the large sites 0.42 against 0.41."""
    # Prepare: the run as `fedsilo server start` plans it (rate 10 / 100).
    cfg = planned(distributed_run(rounds=10, dp_max_sample_rate=0.1))
    sites = distributed_sites(tmp_path, (100, 1000, 1000))
    # Execute: every round at every site, through the site's own checks and ledger.
    reported: list[float] = []
    for server_round in range(1, cfg.rounds + 1):
        for i, (budget, data) in enumerate(sites):
            auth = authorise_round(
                budget, cfg, data, site=f"site-{i}", run="r", server_round=server_round, sites=3
            )
            if server_round == cfg.rounds:
                reported.append(auth.site_epsilon)
    # Assert: the multiplier the sum carries is the sum of the shares' variances.
    spends = [ledger.read(budget.ledger).spends for budget, _ in sites]
    sum_sigma = min(  # the least noise any round's sum carried
        math.sqrt(sum(s[r].noise_share ** 2 for s in spends)) for r in range(cfg.rounds)
    )
    for i, site_spends in enumerate(spends):
        q = site_spends[0].event.sample_rate
        truth = google_pld_epsilon(sigma=sum_sigma, q=q, steps=cfg.rounds, delta=1e-5)
        recorded = epsilon([s.event for s in site_spends], delta=1e-5, accountant="prv")
        # PLD's discretisation (1e-4) and PRV's (0.01 eps_error) both bound from above.
        assert recorded >= truth - 0.02, (i, recorded, truth)
        assert reported[i] >= truth - 0.02, (i, reported[i], truth)
    assert [s[0].event.sample_rate for s in spends] == [0.1, 0.01, 0.01]
    assert {s.event.noise_multiplier for site in spends for s in site} == {cfg.noise_multiplier}
    assert max(reported) <= 3.0 + 1e-9  # the small site spends its target, no more
    # `fedsilo audit` recomputes both figures from the events: the run's sigma, and the
    # site's own share sigma / sqrt(3), each at the site's own rate.
    from fedsilo.privacy.audit import audit
    from fedsilo.privacy.events import SampledGaussianEvent

    for (budget, _), site_spends, site_eps in zip(sites, spends, reported, strict=True):
        report = audit(budget.ledger)
        own = SampledGaussianEvent(
            noise_multiplier=cfg.noise_multiplier / math.sqrt(3),
            sample_rate=site_spends[0].event.sample_rate,
            steps=cfg.rounds,
        )
        assert (report.status, report.assumed_sites) == ("ok", 3)
        assert report.epsilon == pytest.approx(site_eps, rel=1e-9)
        assert report.epsilon_own_noise == pytest.approx(budget.policy.spent([own]), rel=1e-9)


def test_a_small_site_samples_at_the_runs_largest_rate(tmp_path: Path) -> None:
    # Prepare: the run's noise planned for rate 0.05, sites whose own rates are 0.1, 0.01.
    cfg = planned(distributed_run(rounds=5, dp_max_sample_rate=0.05))
    (small, small_data), (large, large_data), _ = distributed_sites(tmp_path, (100, 1000, 1000))
    # Execute
    a = authorise_round(small, cfg, small_data, site="s", run="r", server_round=1, sites=3)
    b = authorise_round(large, cfg, large_data, site="l", run="r", server_round=1, sites=3)
    # Assert: the small site samples at the planned rate; the large one at its own.
    assert (a.plan.sample_rate, a.event.sample_rate) == (0.05, 0.05)
    assert (b.plan.sample_rate, b.event.sample_rate) == (0.01, 0.01)
    assert a.plan.noise_multiplier == b.plan.noise_multiplier == cfg.noise_multiplier
    spend = ledger.read(small.ledger).spends[0]
    assert spend.noise_share == pytest.approx(cfg.noise_multiplier / math.sqrt(3))
    # Its round 2 at a server that now plans for its own rate is refused: the plan is fixed.
    wider = planned(dataclasses.replace(cfg, dp_max_sample_rate=0.1, noise_multiplier=0.0))
    with pytest.raises(RoundRefused, match=r"sample rate changed from 0\.05"):
        authorise_round(small, wider, small_data, site="s", run="r", server_round=2, sites=3)


@pytest.mark.parametrize(
    "sigma,needle",
    [(0.0, "never planned"), (0.5, "above the run's target-epsilon 3")],
)
def test_a_run_with_too_little_noise_is_refused_before_any_spend(
    tmp_path: Path, sigma: float, needle: str
) -> None:
    # A server that skips planning (0) or sends a small multiplier (0.5 at rate 0.1 over 10
    # rounds is epsilon ~13): every site refuses it, and no ledger moves.
    cfg = distributed_run(rounds=10, dp_max_sample_rate=0.1, noise_multiplier=sigma)
    for i, (budget, data) in enumerate(distributed_sites(tmp_path, (100, 1000, 1000))):
        with pytest.raises(PrivacyError, match=needle):
            authorise_round(budget, cfg, data, site=f"s{i}", run="r", server_round=1, sites=3)
        assert ledger.read(budget.ledger).spends == []


def test_a_changed_noise_multiplier_mid_run_is_refused(tmp_path: Path) -> None:
    cfg = planned(distributed_run(rounds=3, dp_max_sample_rate=0.1))
    (budget, data), *_ = distributed_sites(tmp_path, (100,))
    authorise_round(budget, cfg, data, site="s", run="r", server_round=1, sites=3)
    # More noise would fit the target, but the run's sum would then hold mixed shares.
    louder = dataclasses.replace(cfg, noise_multiplier=cfg.noise_multiplier * 1.5)
    with pytest.raises(RoundRefused, match="noise-multiplier changed from"):
        authorise_round(budget, louder, data, site="s", run="r", server_round=2, sites=3)
    assert len(ledger.read(budget.ledger).spends) == 1
    authorise_round(budget, cfg, data, site="s", run="r", server_round=2, sites=3)


def test_a_batch_above_the_sites_data_is_warned_once_a_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sampling rate 1 (every step sees every example) is allowed, but never silent."""
    budget = fresh(tmp_path)
    small = DIGITS.subset(np.arange(50))
    cfg = RunConfig(rounds=2, local_epochs=1, accountant="rdp", batch_size=64)
    with caplog.at_level("WARNING", logger="fedsilo.client"):
        for server_round in (1, 2):
            auth = authorise_round(
                budget, cfg, small, site="site-a", run="b", server_round=server_round
            )
    assert auth.event.sample_rate == 1.0
    warned = [r.getMessage() for r in caplog.records if "batch-size" in r.getMessage()]
    assert warned == [
        "plan: batch-size 64 is above this site's 50 examples: every step uses all of them "
        "(sampling rate 1)"
    ]
