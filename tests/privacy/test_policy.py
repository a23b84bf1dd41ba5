"""The site policy: parsed from the site's node config, and what it refuses."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from fedsilo.errors import BudgetExceededError, PrivacyError
from fedsilo.privacy import provision
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.events import SampledGaussianEvent as Event
from fedsilo.privacy.policy import FIELDS, PolicyField, SitePolicy


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
    policy.check_request({"target-epsilon": 4.0, "target-delta": 1e-5, "max-grad-norm": 1.0})
    for asked in (
        {"target-epsilon": 4.1, "target-delta": 1e-5, "max-grad-norm": 1.0},
        {"target-epsilon": 4.0, "target-delta": 2e-5, "max-grad-norm": 1.0},
        {"target-epsilon": 4.0, "target-delta": 1e-5, "max-grad-norm": 1.5},
    ):
        with pytest.raises(PrivacyError):
            policy.check_request(asked)
    with pytest.raises(PrivacyError, match="below this site's minimum"):
        policy.check_request({"noise-multiplier": 0.4})


def test_check_round_refuses_only_what_does_not_fit() -> None:
    one = Event(noise_multiplier=1.0, sample_rate=0.1, steps=50)
    e1, e2 = epsilon([one], delta=1e-5), epsilon([one, one], delta=1e-5)
    policy = SitePolicy(max_epsilon=(e1 + e2) / 2)
    assert policy.check_round([], one) == pytest.approx(e1)
    with pytest.raises(BudgetExceededError, match=f"from {e1:.3f} to {e2:.3f}"):
        policy.check_round([one], one)


# Every field is declared once, in SitePolicy; these tests run over FIELDS, so a new
# field is read, written, refused and audited everywhere without another line here.


def _set_value(f: PolicyField) -> float:
    """A valid value of `f` other than its default."""
    return next(v for v in (2, 0.5, 1) if f.spec.valid(v) and v != f.default)


def _all_set() -> SitePolicy:
    return SitePolicy(**{f.name: f.kind(_set_value(f)) for f in FIELDS})


def test_every_field_round_trips_through_every_reader_and_writer(tmp_path: Path) -> None:
    policy = _all_set()
    assert SitePolicy.from_dict(policy.to_dict()) == policy  # the ledger record
    text = {k: str(v) for k, v in policy.node_config().items()}  # node config values are text
    assert SitePolicy.from_node_config(text) == policy
    table = tomllib.loads(policy.to_table())["policy"]
    assert set(table) == {f.key for f in FIELDS}
    assert SitePolicy.from_table(table) == policy
    # The kit writer writes every key, each with its help; the kit reader reads them back.
    provision.provision(tmp_path, hosts=["localhost"], sites=["site-a"])
    written = (tmp_path / "sites" / "site-a" / "site.toml").read_text()
    for f in FIELDS:
        assert f"# {f.spec.help}\n{f.key} = " in written
    site = provision.read_site_kit(tmp_path / "sites" / "site-a")
    assert site.policy == provision.DEFAULT_SITE_POLICY


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.key)
def test_every_field_refuses_invalid_values_where_it_is_read(f: PolicyField) -> None:
    bad = next(v for v in (-1.0, math.nan, math.inf, 1.5) if not f.spec.valid(v))
    node = {"policy-max-epsilon": 1.0, f.node_key: bad}
    with pytest.raises(PrivacyError, match=f"`{f.node_key}` must be"):
        SitePolicy.from_node_config(node)
    with pytest.raises(PrivacyError, match=f"`{f.key}` must be|`{f.node_key}` must be"):
        SitePolicy.from_table({"max-epsilon": 1.0, f.key: bad})
    with pytest.raises(PrivacyError, match="unknown key `no-such-key`"):
        SitePolicy.from_table({"max-epsilon": 1.0, "no-such-key": 1})


@pytest.mark.parametrize("f", [f for f in FIELDS if f.spec.limit], ids=lambda f: f.key)
def test_every_limit_is_refused_by_the_site_and_found_by_the_audit(f: PolicyField) -> None:
    limit = f.spec.limit
    assert limit is not None
    policy = SitePolicy(**{f.name: f.kind(_set_value(f))} | {"max_epsilon": 2.0})
    allowed = getattr(policy, f.name)
    breaking = allowed * 1.5 if limit.bound == "max" else allowed / 2
    policy.check_request({limit.run_key: allowed})  # at the limit
    assert policy.breaches({limit.run_key: allowed}) == []
    with pytest.raises(PrivacyError) as info:
        policy.check_request({limit.run_key: breaking})
    assert (
        limit.run_key in str(info.value)
        or f.node_key in str(info.value)
        or ("minimum" in str(info.value))
    )
    assert len(policy.breaches({limit.run_key: breaking})) == 1
