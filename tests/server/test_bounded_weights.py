"""bounded_weights: a site's FedAvg weight is min(reported, committed, cap), a pure function.

Expected weights are worked out by hand from the rule in fedsilo.server.strategy's
docstring: the cap is WEIGHT_CAP_RATIO (4) times the median commitment of the round's
sites, with at least three sites.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import given
from hypothesis import strategies as st

from fedsilo import protocol
from fedsilo.server.replies import InvalidReply, SiteReport
from fedsilo.server.strategy import WEIGHT_CAP_RATIO, SiteReports, bounded_weights, weighed


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def report(site: str, examples: object) -> SiteReport:
    return SiteReport(
        site=site,
        examples=examples,  # type: ignore[arg-type]  # a hostile count, for the refusals
        epsilon=1.0,
        delta=1e-5,
        target_epsilon=8.0,
        round=1,
        ledger_head="f" * 64,
    )


def weights(reported: dict[str, object], committed: dict[str, object]) -> dict[str, int]:
    return bounded_weights(
        [report(s, n) for s, n in reported.items()],
        committed,  # type: ignore[arg-type]
    )


def test_one_or_two_sites_get_their_share_uncapped() -> None:
    assert weights({"a": 100}, {"a": 100}) == {"a": 100}
    assert weights({"a": 100, "b": 10**12}, {"a": 100, "b": 10**12}) == {"a": 100, "b": 10**12}


def test_no_site_weighs_more_than_the_cap() -> None:
    # Commitments 100, 100, 10^12: the median is 100, the cap 4 x 100 = 400.
    assert WEIGHT_CAP_RATIO == 4.0
    got = weights({"a": 100, "b": 100, "c": 10**12}, {"a": 100, "b": 100, "c": 10**12})
    assert got == {"a": 100, "b": 100, "c": 400}
    # Four sites: the median of 10, 20, 30, 1000 is 25, the cap 100.
    four = {"a": 10, "b": 20, "c": 30, "d": 1000}
    assert weights(four, four) == {"a": 10, "b": 20, "c": 30, "d": 100}


def test_the_cap_comes_from_commitments_not_from_this_rounds_claims() -> None:
    # Every site claims 10^6 now, but committed 1, 1 and 1000: the cap is 4 x 1.
    claims = {"a": 10**6, "b": 10**6, "c": 10**6}
    assert weights(claims, {"a": 1, "b": 1, "c": 1000}) == {"a": 1, "b": 1, "c": 4}


def test_a_site_weighs_at_most_its_commitment_and_at_most_what_it_reports() -> None:
    committed = {"a": 10, "b": 10, "c": 10}
    assert weights({"a": 10, "b": 10, "c": 30}, committed) == {"a": 10, "b": 10, "c": 10}
    assert weights({"a": 10, "b": 10, "c": 5}, committed) == {"a": 10, "b": 10, "c": 5}


def test_no_replies_no_weights() -> None:
    assert bounded_weights([], {}) == {}


def test_it_is_pure() -> None:
    reports = [report("a", 100), report("b", 100), report("c", 10**12)]
    committed = {"a": 100, "b": 100, "c": 10**12, "d": 7}
    before = (list(reports), dict(committed))
    assert bounded_weights(reports, committed) == bounded_weights(reports, committed)
    assert (reports, committed) == before


@pytest.mark.parametrize(
    "count", [0, -1438, 2.5, float("nan"), float("inf"), True, "100", None], ids=repr
)
def test_a_count_that_is_not_an_integer_of_at_least_one_is_refused(count: object) -> None:
    # The reply book never accepts such a count; were one to get here, it stops, not weighs.
    with pytest.raises(InvalidReply, match="reported example count must be an integer >= 1"):
        weights({"a": count, "b": 10}, {"a": 10, "b": 10})
    with pytest.raises(InvalidReply, match="committed example count must be an integer >= 1"):
        weights({"a": 10, "b": 10}, {"a": count, "b": 10})


def test_an_identity_mismatch_is_refused() -> None:
    # Two reports of one site in a round (one site posing as two) ...
    with pytest.raises(InvalidReply, match="site 'a' has two reports in one round"):
        bounded_weights([report("a", 10), report("a", 10**12)], {"a": 10})
    # ... or a report of a site the book holds no commitment of.
    with pytest.raises(InvalidReply, match="site 'b' has no committed example count"):
        bounded_weights([report("a", 10), report("b", 10)], {"a": 10, "B": 10})


counts = st.integers(min_value=1, max_value=10**15)


@given(st.dictionaries(st.sampled_from("abcdefgh"), st.tuples(counts, counts), max_size=8))
def test_every_weight_is_within_its_bounds(sites: dict[str, tuple[int, int]]) -> None:
    reported = {s: r for s, (r, _) in sites.items()}
    committed = {s: c for s, (_, c) in sites.items()}
    got = weights(dict(reported), dict(committed))
    assert set(got) == set(sites)
    for s, w in got.items():
        assert 1 <= w <= min(reported[s], committed[s])
        if len(sites) >= 3:
            assert w <= WEIGHT_CAP_RATIO * statistics.median(committed.values())


def reply(node: int, value: float, examples: int) -> Message:
    instruction = Message(
        content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
    )
    metrics = {
        protocol.NUM_EXAMPLES: examples,
        protocol.EPSILON: 1.0,
        protocol.DELTA: 1e-5,
        protocol.TARGET_EPSILON: 8.0,
        protocol.NOISE_MULTIPLIER: 1.1,
        protocol.STEPS: 5,
    }
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({"w": torch.full((2,), value)}),
            protocol.METRICS: MetricRecord(metrics),
            protocol.SITE: ConfigRecord({protocol.LEDGER_HEAD: "f" * 64}),
        }
    )
    return Message(content=content, reply_to=instruction)


def test_weighed_copies_the_reply_and_leaves_the_sites_record_as_sent() -> None:
    original = reply(11, 1.0, 10**12)
    copy = weighed(original, 400)
    assert copy.content[protocol.METRICS][protocol.NUM_EXAMPLES] == 400
    assert original.content[protocol.METRICS][protocol.NUM_EXAMPLES] == 10**12
    assert copy.content[protocol.ARRAYS] is original.content[protocol.ARRAYS]
    assert copy.metadata.src_node_id == original.metadata.src_node_id == 11


def test_aggregation_does_not_rewrite_the_replies_it_weighs() -> None:
    s = SiteReports(FedAvg(), names=lambda: {11: "site-a", 12: "site-b", 13: "site-c"})
    replies = [reply(11, 0.0, 100), reply(12, 0.0, 100), reply(13, 1.0, 10**12)]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    bound = 400 / 600  # site-c weighs 4 x 100 of 600
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), bound))
    sent = [r.content[protocol.METRICS][protocol.NUM_EXAMPLES] for r in replies]
    assert sent == [100, 100, 10**12]
    assert s.reports["site-c"].examples == 10**12
