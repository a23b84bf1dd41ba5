"""The site policy: parsed from the site's node config, and what it refuses."""

from __future__ import annotations

import pytest

from fedsilo.errors import BudgetExceededError, PrivacyError
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.events import SampledGaussianEvent as Event
from fedsilo.privacy.policy import SitePolicy


def test_from_node_config_reads_the_agreed_keys() -> None:
    policy = SitePolicy.from_node_config(
        {
            "ledger-path": "/var/lib/fedsilo/site.jsonl",
            "policy-max-epsilon": 6,
            "policy-delta": "1e-6",
            "policy-min-noise-multiplier": 0.8,
            "policy-max-clip-norm": 2.0,
        }
    )
    assert policy == SitePolicy(
        max_epsilon=6.0, delta=1e-6, min_noise_multiplier=0.8, max_clip_norm=2.0
    )
    # Only the budget is required; 0 means no limit.
    assert SitePolicy.from_node_config({"policy-max-epsilon": 3.0}) == SitePolicy(3.0, 1e-5, 0, 0)


@pytest.mark.parametrize(
    "node_config,needle",
    [
        ({}, "no privacy budget"),
        ({"policy-max-epsilon": 0}, "`policy-max-epsilon` must be a finite number > 0"),
        ({"policy-max-epsilon": "inf"}, "`policy-max-epsilon` must be a finite number > 0"),
        ({"policy-max-epsilon": 8, "policy-delta": 1}, "`policy-delta` must be in (0, 1)"),
        ({"policy-max-epsilon": 8, "policy-max-clip-norm": -1}, "`policy-max-clip-norm` must"),
        ({"policy-max-epsilon": "eight"}, "`policy-max-epsilon` must be a number"),
    ],
)
def test_bad_or_missing_policy_is_refused(node_config: dict[str, object], needle: str) -> None:
    with pytest.raises(PrivacyError) as info:
        SitePolicy.from_node_config(node_config)
    assert needle in str(info.value)


def test_requests_beyond_the_policy_are_refused() -> None:
    policy = SitePolicy(max_epsilon=4.0, delta=1e-5, max_clip_norm=1.0, min_noise_multiplier=0.5)
    policy.check_request(target_epsilon=4.0, target_delta=1e-5, max_grad_norm=1.0)  # at the limit
    for kwargs in (
        {"target_epsilon": 4.1, "target_delta": 1e-5, "max_grad_norm": 1.0},
        {"target_epsilon": 4.0, "target_delta": 2e-5, "max_grad_norm": 1.0},
        {"target_epsilon": 4.0, "target_delta": 1e-5, "max_grad_norm": 1.5},
    ):
        with pytest.raises(PrivacyError):
            policy.check_request(**kwargs)
    with pytest.raises(PrivacyError, match="below this site's minimum"):
        policy.check_noise(0.4)


def test_check_round_refuses_only_what_does_not_fit() -> None:
    one = Event(noise_multiplier=1.0, sample_rate=0.1, steps=50)
    e1, e2 = epsilon([one], delta=1e-5), epsilon([one, one], delta=1e-5)
    policy = SitePolicy(max_epsilon=(e1 + e2) / 2)
    assert policy.check_round([], one) == pytest.approx(e1)
    with pytest.raises(BudgetExceededError, match=f"from {e1:.3f} to {e2:.3f}"):
        policy.check_round([one], one)
