"""SiteReports: no site can corrupt the run, name itself or inflate its weight.

Every test feeds crafted replies to `SiteReports(FedAvg())`, as a hostile or broken
site would send them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsilo import protocol
from fedsilo.config import RunConfig
from fedsilo.privacy.refusal import REFUSAL_CODE, refusal_reason
from fedsilo.server.records import RoundRecord
from fedsilo.server.server_app import build_summary
from fedsilo.server.strategy import WEIGHT_CAP_RATIO, Refusal, SiteReports
from tests.views import spy_on_views

NAMES = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d"}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def instruction(node: int) -> Message:
    return Message(
        content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
    )


def metrics(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        protocol.NUM_EXAMPLES: 10,
        protocol.EPSILON: 1.0,
        protocol.DELTA: 1e-5,
        protocol.TARGET_EPSILON: 8.0,
        protocol.NOISE_MULTIPLIER: 1.1,
        protocol.STEPS: 5,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def update(
    node: int,
    value: float | torch.Tensor,
    *,
    head: str = "f" * 64,
    claimed_name: str = "",
    arrays: dict[str, torch.Tensor] | None = None,
    **metric_overrides: Any,
) -> Message:
    w = value if isinstance(value, torch.Tensor) else torch.full((2,), float(value))
    site = {protocol.LEDGER_HEAD: head}
    if claimed_name:
        site["name"] = claimed_name  # what an old or hostile site might still send
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(arrays if arrays is not None else {"w": w}),
            protocol.METRICS: MetricRecord(metrics(**metric_overrides)),
            protocol.SITE: ConfigRecord(site),
        }
    )
    return Message(content=content, reply_to=instruction(node))


def strategy() -> SiteReports:
    s = SiteReports(FedAvg(), names=lambda: NAMES)
    s._spec = {"w": ((2,), torch.float32)}  # what configure_train records from the global model
    return s


def aggregate(s: SiteReports, replies: list[Message], server_round: int = 1) -> torch.Tensor:
    arrays, _ = s.aggregate_train(server_round, replies)
    assert arrays is not None
    return arrays.to_torch_state_dict()["w"]


def test_refusal_is_logged_and_the_others_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    s = strategy()
    refusal = Message(
        Error(REFUSAL_CODE, refusal_reason("whoever", "over its budget")),
        reply_to=instruction(12),
    )
    with caplog.at_level(logging.WARNING, logger="fedsilo.server"):
        w = aggregate(s, [update(11, 2.0), refusal, update(13, 4.0)], server_round=3)
    assert torch.allclose(w, torch.full((2,), 3.0))
    assert s.last_round_sites == ["site-a", "site-c"]
    # The refusal is filed under the node's name, not the one inside the message.
    assert s.refusals == [Refusal("site-b", 3, "over its budget")]
    assert s.failures == []
    assert "site site-b refused: over its budget" in caplog.text
    summary = build_summary([], s, "run", 3).to_dict()
    assert summary["refusals"] == [{"site": "site-b", "round": 3, "reason": "over its budget"}]
    assert summary["sites"][0]["ledger_head"] == "f" * 64
    assert set(summary["sites"][0]) == {
        "site", "examples", "epsilon", "delta", "target_epsilon", "ledger_head"
    }  # fmt: skip


def test_other_errors_stay_failures() -> None:
    s = strategy()
    crash = Message(Error(2, "<class 'ValueError'>:<'boom'>"), reply_to=instruction(11))
    arrays, _ = s.aggregate_train(1, [crash])
    assert arrays is None and s.refusals == [] and len(s.failures) == 1


@pytest.mark.parametrize(
    "make_bad,needle",
    [
        (lambda: update(12, float("nan")), "`w` holds NaN or infinity"),
        (lambda: update(12, float("inf")), "`w` holds NaN or infinity"),
        (lambda: update(12, torch.ones(3)), "`w` is (3,) torch.float32, the model's is (2,)"),
        (lambda: update(12, torch.ones(2, dtype=torch.float64)), "torch.float64"),
        (lambda: update(12, 0.0, arrays={"v": torch.ones(2)}), "model keys differ"),
        (lambda: update(12, 0.0, arrays={}), "model keys differ"),
        (lambda: update(12, 0.0, **{protocol.EPSILON: None}), "metric `epsilon` is missing"),
        (lambda: update(12, 0.0, **{protocol.EPSILON: float("nan")}), "must be finite"),
        (lambda: update(12, 0.0, **{protocol.NUM_EXAMPLES: -1438}), "an integer >= 1"),
        (lambda: update(12, 0.0, **{protocol.NUM_EXAMPLES: 2.5}), "an integer >= 1"),
        (lambda: update(12, 0.0, **{protocol.STEPS: 0}), "an integer >= 1"),
        (lambda: update(12, 0.0, **{protocol.DELTA: 2.0}), "must be in (0, 1)"),
        (lambda: update(12, 0.0, head="not-a-hash"), "ledger-head"),
    ],
)
def test_a_bad_reply_is_a_failure_and_the_round_goes_on(
    make_bad: Callable[[], Message], needle: str
) -> None:
    s = strategy()
    w = aggregate(s, [update(11, 2.0), make_bad(), update(13, 4.0)])
    assert torch.allclose(w, torch.full((2,), 3.0))  # the bad reply took no part
    assert [(f.site, f.round) for f in s.failures] == [("site-b", 1)]
    assert needle in s.failures[0].reason
    assert "site-b" not in s.reports


def test_replies_without_records_are_failures() -> None:
    s = strategy()
    empty = Message(content=RecordDict({}), reply_to=instruction(12))
    wrong = Message(
        content=RecordDict({protocol.ARRAYS: ConfigRecord({"x": 1})}), reply_to=instruction(14)
    )
    w = aggregate(s, [update(11, 1.0), empty, wrong])
    assert torch.allclose(w, torch.full((2,), 1.0))
    assert sorted(f.site for f in s.failures) == ["site-b", "site-d"]


def test_names_come_from_the_authenticated_node_not_the_message() -> None:
    # Two replies that both call themselves site-a: one is, one is site-b.
    s = strategy()
    aggregate(s, [update(11, 1.0, claimed_name="site-a"), update(12, 3.0, claimed_name="site-a")])
    assert sorted(s.reports) == ["site-a", "site-b"]
    # An unknown node is named by its id; a node replying twice in a round is a failure.
    s = strategy()
    aggregate(s, [update(99, 1.0), update(11, 1.0), update(11, 5.0, head="a" * 64)])
    assert sorted(s.reports) == ["node-99", "site-a"]
    assert s.reports["site-a"].ledger_head == "f" * 64  # the second reply changed nothing
    assert [f.reason for f in s.failures] == ["a second reply from this site in one round"]


def test_a_spoofed_name_cannot_overwrite_another_sites_ledger_head() -> None:
    s = strategy()
    aggregate(s, [update(11, 1.0, head="a" * 64), update(12, 1.0, head="b" * 64)])
    spoof = update(12, 1.0, head="d" * 64, claimed_name="site-a")
    aggregate(s, [update(11, 1.0, head="c" * 64), spoof], 2)
    assert s.reports["site-a"].ledger_head == "c" * 64
    assert s.reports["site-b"].ledger_head == "d" * 64


def sized(node: int, value: float, examples: int) -> Message:
    return update(node, value, **{protocol.NUM_EXAMPLES: examples})


def test_a_site_cannot_inflate_its_weight() -> None:
    # The finding: a site claiming 10^12 examples replaced the global model with its own.
    s = strategy()
    honest = [sized(11, 0.0, 100), sized(12, 0.0, 100)]
    liar = sized(13, 1.0, 10**12)
    w = aggregate(s, [*honest, liar])
    # Its weight is capped at WEIGHT_CAP_RATIO x the median (100): 400 / 600 of the average.
    bound = WEIGHT_CAP_RATIO * 100 / (WEIGHT_CAP_RATIO * 100 + 200)
    assert torch.allclose(w, torch.full((2,), bound))
    # A site that commits to few examples in round 1 cannot claim more later.
    s = strategy()
    aggregate(s, [sized(11, 0.0, 10), sized(12, 0.0, 10), sized(13, 0.0, 10)])
    w = aggregate(s, [sized(11, 0.0, 10), sized(12, 0.0, 10), sized(13, 3.0, 30)], 2)
    assert torch.allclose(w, torch.full((2,), 1.0))  # weighed 10 (committed), not 30
    assert s.reports["site-c"].examples == 30  # the report keeps what it said


def test_a_resumed_server_keeps_commitments_reports_and_failures() -> None:
    """What the rounds' metrics lines keep restores the strategy a stopped server had:
    a site's first count stays its commitment, so a resume cannot reset it."""
    s = strategy()
    aggregate(s, [sized(11, 0.0, 10), sized(12, 0.0, 10), sized(13, 0.0, 10)])
    record = RoundRecord(
        round=1,
        accuracy=0.5,
        loss=1.0,
        max_epsilon=1.0,
        reports={site: s.reports[site].to_record() for site in s.last_round_sites},
        failed=["site-d"],
        refused=[],
        reasons={"site-d": "no reply before the round timeout"},
    )
    resumed = strategy()
    resumed.restore([record])
    assert resumed.reports == s.reports and resumed.committed == s.committed
    assert [(f.site, f.round) for f in resumed.failures] == [("site-d", 1)]
    w = aggregate(resumed, [sized(11, 0.0, 10), sized(12, 0.0, 10), sized(13, 3.0, 30)], 2)
    assert torch.allclose(w, torch.full((2,), 1.0))  # still weighed 10, its commitment


def test_a_robust_rule_aggregates_and_names_the_site_it_acted_on() -> None:
    """trimmed-mean:1 over four sites, one sending a huge model: the global model stays
    with the others, the site is flagged in the book, the round's record and the summary;
    FedAvg's weighted metrics are still aggregated."""
    from fedsilo.config import Aggregation
    from fedsilo.server.server_app import close_round

    s = SiteReports(FedAvg(), names=lambda: NAMES, rule=Aggregation.parse("trimmed-mean:1"))
    s._global = ArrayRecord({"w": torch.zeros(2)})  # what configure_train keeps
    s._spec = {"w": ((2,), torch.float32)}
    honest = [
        update(11 + i, torch.tensor(v)) for i, v in enumerate(([1.0, 3.0], [2.0, 1.0], [3.0, 2.0]))
    ]
    arrays, metrics = s.aggregate_train(1, [*honest, update(14, 1e6, **{protocol.EPSILON: 3.0})])
    assert arrays is not None and metrics is not None
    w = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(w, torch.full((2,), 2.5))  # the middle two of each coordinate
    assert metrics[protocol.EPSILON] == pytest.approx(1.5)  # (1 + 1 + 1 + 3) / 4, equal weights
    assert [(f.site, f.round) for f in s.flagged] == [("site-d", 1)]
    assert "cut its values in 100% of coordinates" in s.flagged[0].reason

    class Evaluated:
        loss, accuracy, extra = 0.5, 0.9, {}

    cfg = RunConfig(aggregation="trimmed-mean:1", min_sites=3)
    out = close_round(1, ArrayRecord({"w": w}), s, cfg, lambda state: Evaluated())
    assert not isinstance(out, str)
    assert out.record.flagged == {"site-d": s.flagged[0].reason}
    summary = build_summary([out.record], s, "run", 1)
    assert [f.site for f in summary.flagged] == ["site-d"]
    restored = SiteReports(FedAvg(), names=lambda: NAMES)
    restored.restore([out.record])
    assert restored.flagged == s.flagged


def test_a_round_with_fewer_replies_than_the_rule_needs_gives_no_model() -> None:
    from fedsilo.config import Aggregation

    s = SiteReports(FedAvg(), names=lambda: NAMES, rule=Aggregation.parse("krum:1"))
    s._global = ArrayRecord({"w": torch.zeros(2)})
    s._spec = {"w": ((2,), torch.float32)}
    arrays, _ = s.aggregate_train(1, [update(11, 1.0), update(12, 2.0)])
    assert arrays is None and s.flagged == []


class Nodes:
    """A grid that only names its nodes (FedAvg's configure_train asks no more)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.mark.parametrize("model_codec", ["bf16", "int8"])
def test_a_compressed_global_model_costs_no_precision_over_rounds(model_codec: str) -> None:
    """The server sends w' = its model rounded (model-codec); sites train from w' and
    send int8 updates against it; the server decodes them against w' and adds w - w'
    back. Sites that change nothing leave the model exactly as it was, round after
    round: the rounding never builds up."""
    from fedsilo.task import codec
    from fedsilo.task.rng import SeededRandom

    g = torch.Generator().manual_seed(1)
    model = {"w": torch.randn(300, generator=g), "n": torch.tensor(3)}
    s = SiteReports(FedAvg(), names=lambda: NAMES, update_codec="int8", model_codec=model_codec)
    arrays = ArrayRecord(model)
    for server_round in (1, 2, 3):
        sent = list(s.configure_train(server_round, arrays, ConfigRecord(), Nodes([11, 12])))
        wire = sent[0].content[protocol.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
        tag = codec.MODEL_TAGS[model_codec]
        assert "w" + tag in wire and wire["w" + tag].element_size() < 4
        seen = codec.decode_model(wire)  # what each site trains from
        assert not torch.equal(seen["w"], model["w"])  # rounded: w' differs from w
        replies = []
        for node in (11, 12):
            up = codec.encode("int8", seen, seen, SeededRandom(node).uniform)  # no change
            content = update(node, 0.0, arrays=up).content
            replies.append(Message(content=content, reply_to=sent[[11, 12].index(node)]))
        arrays, _ = s.aggregate_train(server_round, replies)
        assert arrays is not None
        got = arrays.to_torch_state_dict()
        assert torch.allclose(got["w"], model["w"], atol=1e-7, rtol=0)
        assert torch.equal(got["n"], model["n"])


def sent_and_answered(
    s: SiteReports,
    model: dict[str, torch.Tensor],
    replies: dict[int, dict[str, torch.Tensor]],
    counts: dict[int, int],
) -> ArrayRecord | None:
    """Round 1 of `s` from `model`: each node answers its arrays with its example count."""
    sent = s.configure_train(1, ArrayRecord(model), ConfigRecord(), Nodes(list(replies)))
    to = {m.metadata.dst_node_id: m for m in sent}
    answers = [
        Message(
            content=update(n, 0.0, arrays=a, **{protocol.NUM_EXAMPLES: counts[n]}).content,
            reply_to=to[n],
        )
        for n, a in replies.items()
    ]
    arrays, _ = s.aggregate_train(1, answers)
    return arrays


def assert_flowers_mean(
    arrays: ArrayRecord | None, models: list[dict[str, torch.Tensor]], weights: list[int]
) -> None:
    """`arrays` is bit for bit Flower's FedAvg (aggregate_arrayrecords) of `models`."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    assert arrays is not None
    records = [
        RecordDict({"a": ArrayRecord(m), "m": MetricRecord({"w": w})})
        for m, w in zip(models, weights, strict=True)
    ]
    expected = aggregate_arrayrecords(records, "w").to_torch_state_dict()
    got = arrays.to_torch_state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype
        assert torch.equal(got[key], expected[key]), key


def test_the_streamed_mean_is_flowers_fedavg_bit_for_bit() -> None:
    """SiteReports averages the models itself, one reply at a time in place; the result
    is exactly what Flower's FedAvg (aggregate_arrayrecords) gives, float and integer
    arrays alike, at bounded weights."""

    g = torch.Generator().manual_seed(3)
    models = {
        node: {"w": torch.randn(1000, generator=g), "b": torch.randn(7, generator=g),
               "n": torch.tensor(node)}
        for node in (11, 12, 13)
    }  # fmt: skip
    counts = {11: 17, 12: 5, 13: 1000}  # 13 is capped at 4x the median commitment
    s = SiteReports(FedAvg(), names=lambda: NAMES)
    s.book.committed.update({NAMES[n]: c for n, c in counts.items()})
    # Execute
    arrays = sent_and_answered(s, models[11], models, counts)
    # Assert: Flower's mean of the same replies at the weights SiteReports chose.
    weights = [17, 5, int(WEIGHT_CAP_RATIO * 17)]
    assert_flowers_mean(arrays, [models[n] for n in (11, 12, 13)], weights)


def test_the_mean_reads_one_reply_model_at_a_time() -> None:
    """Each reply's model is read (decoded) in its turn and dropped once added: when a
    reply's model is read, no earlier reply's model is alive except the running sum."""
    import gc
    import weakref

    from fedsilo.server.strategy import weighted_mean

    alive: list[weakref.ref[torch.Tensor]] = []
    seen_alive: list[int] = []

    def model(msg: Message) -> dict[str, torch.Tensor]:
        gc.collect()
        seen_alive.append(sum(r() is not None for r in alive[1:]))  # [0] is the sum
        t = torch.full((1000,), float(len(alive) + 1))
        alive.append(weakref.ref(t))
        return {"w": t}

    msgs = [Message(content=RecordDict(), dst_node_id=n, message_type="train") for n in range(5)]
    # Execute
    total = weighted_mean(((0.2, m) for m in msgs), model)
    # Assert
    assert seen_alive == [0, 0, 0, 0, 0]
    assert torch.allclose(total["w"], torch.full((1000,), 3.0))


@pytest.mark.parametrize("update_codec", ["float32", "int8"])
def test_a_fedavg_with_its_own_aggregation_aggregates_as_it_defines(update_codec: str) -> None:
    """A wrapped FedAvg subclass that changes aggregate_train (a server optimiser, say)
    is not bypassed by the streamed mean, and it reads the models the replies stand for
    (decoded from the update codec), not their wire arrays."""
    from fedsilo.task import codec
    from fedsilo.task.rng import SeededRandom

    class Halving(FedAvg):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            arrays, metrics = super().aggregate_train(server_round, replies)
            assert arrays is not None
            return ArrayRecord({k: t / 2 for k, t in arrays.to_torch_state_dict().items()}), metrics

    s = SiteReports(Halving(), names=lambda: NAMES, update_codec=update_codec)
    s._spec = {"w": ((2,), torch.float32)}
    zero = {"w": torch.zeros(2)}
    sent = s.configure_train(1, ArrayRecord(zero), ConfigRecord(), Nodes([11, 12]))
    trained = {"w": torch.full((2,), 4.0)}  # an update of +4 = +scale: exact in int8
    wire = codec.encode(update_codec, trained, zero, SeededRandom(0).uniform)
    replies = [
        Message(content=update(m.metadata.dst_node_id, 0.0, arrays=wire).content, reply_to=m)
        for m in sent
    ]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))
    # the sites' own replies are left as sent (their wire arrays)
    got = replies[0].content[protocol.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    assert set(got) == set(wire)


@pytest.mark.parametrize("update_codec", ["bf16", "int8"])
def test_coded_replies_are_checked_and_averaged_a_piece_at_a_time_bit_for_bit(
    update_codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under an update codec the server validates and averages each reply's coded
    tensors a piece at a time: no decoded model is ever built (a 67 M-parameter one is
    270 MB), yet the mean is exactly Flower's FedAvg of the decoded models."""

    from fedsilo.task import codec
    from fedsilo.task.rng import SeededRandom

    g = torch.Generator().manual_seed(5)
    glob = {"w": torch.randn(10, 10, generator=g), "b": torch.randn(3, generator=g),
            "n": torch.tensor(2)}  # fmt: skip
    trained = {
        n: {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in glob.items()}
        for n in (11, 12, 13)
    }  # fmt: skip
    wires = {
        n: codec.encode(update_codec, trained[n], glob, SeededRandom(n).uniform) for n in trained
    }
    counts = {11: 17, 12: 5, 13: 9}
    pieces: list[int] = []
    real = codec.decoded_pieces

    def spy(*args: Any, **kwargs: Any) -> Any:
        for start, piece in real(*args, **kwargs):
            pieces.append(piece.numel())
            yield start, piece

    def whole(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a whole reply was decoded")

    monkeypatch.setattr(codec, "DECODE_CHUNK", 7)  # pieces that split rows, a short last one
    monkeypatch.setattr(codec, "decoded_pieces", spy)
    monkeypatch.setattr(codec, "decode", whole)
    s = SiteReports(FedAvg(), names=lambda: NAMES, update_codec=update_codec)
    s.book.committed.update({NAMES[n]: c for n, c in counts.items()})
    # Execute
    arrays = sent_and_answered(s, glob, wires, counts)
    # Assert
    assert arrays is not None and s.failures == []
    assert pieces and max(pieces) == 7
    monkeypatch.undo()
    decoded = [codec.decode(update_codec, wires[n], glob) for n in (11, 12, 13)]
    assert_flowers_mean(arrays, decoded, [counts[n] for n in (11, 12, 13)])


def test_a_bf16_reply_that_decodes_to_nan_is_a_failure_checked_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsilo.task import codec
    from fedsilo.task.rng import SeededRandom

    monkeypatch.setattr(codec, "DECODE_CHUNK", 3)
    glob = {"w": torch.zeros(10)}
    good = codec.encode("bf16", {"w": torch.ones(10)}, glob, SeededRandom(0).uniform)
    bad = {"w": good["w"].clone()}
    bad["w"][8] = torch.tensor(float("nan"), dtype=torch.bfloat16).view(torch.int16)  # 3rd piece
    s = SiteReports(FedAvg(), names=lambda: NAMES, update_codec="bf16")
    arrays = sent_and_answered(s, glob, {11: good, 12: bad}, {11: 10, 12: 10})
    assert arrays is not None
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.ones(10))
    assert [(f.site, f.reason) for f in s.failures] == [
        ("site-b", "invalid reply: `w` holds NaN or infinity")
    ]


@pytest.mark.parametrize(
    ("update_codec", "model_codec", "rule"),
    [("int8", "float32", "fedavg"), ("bf16", "float32", "fedavg"), ("int8", "int8", "fedavg"),
     ("float32", "float32", "median"), ("int8", "float32", "trimmed-mean:1")],
)  # fmt: skip
def test_aggregating_reads_the_global_model_in_place_and_never_writes_it(
    update_codec: str, model_codec: str, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server reads the global model it sent from the record's own bytes (no copy of
    the model a round): aggregating against it, under every codec and rule that reads
    it, leaves those bytes as they were, and gives what reading a copy gives."""
    import fedsilo.server.strategy as strategy_module
    from fedsilo.config import Aggregation
    from fedsilo.task import codec
    from fedsilo.task.rng import SeededRandom

    g = torch.Generator().manual_seed(9)
    glob = {"w": torch.randn(6, 5, generator=g), "n": torch.tensor(4)}
    trained = {n: {"w": glob["w"] + 0.1 * torch.randn(6, 5, generator=g), "n": glob["n"]}
               for n in (11, 12, 13)}  # fmt: skip

    def run() -> tuple[dict[str, torch.Tensor], list[ArrayRecord]]:
        s = SiteReports(
            FedAvg(), names=lambda: NAMES, update_codec=update_codec, model_codec=model_codec,
            rule=Aggregation.parse(rule),
        )  # fmt: skip
        sent = s.configure_train(1, ArrayRecord(glob), ConfigRecord(), Nodes(list(trained)))
        assert s._global is not None
        before = [bytearray(a.data) for a in s._global.values()]  # copies
        seen = s._global.to_torch_state_dict()  # the model the sites trained from
        to = {m.metadata.dst_node_id: m for m in sent}
        answers = [
            Message(
                content=update(
                    n, 0.0, arrays=codec.encode(update_codec, t, seen, SeededRandom(n).uniform)
                ).content,
                reply_to=to[n],
            )
            for n, t in trained.items()
        ]
        read.clear()
        arrays, _ = s.aggregate_train(1, answers)
        assert [bytearray(a.data) for a in s._global.values()] == before  # never written
        assert arrays is not None and s.failures == []
        return arrays.to_torch_state_dict(), list(read)

    # Execute: the global model read in place, then (the reference) read from a copy
    read = spy_on_views(monkeypatch, strategy_module)
    in_place, records = run()
    monkeypatch.setattr(strategy_module, "tensor_views", ArrayRecord.to_torch_state_dict)
    copied, _ = run()
    # Assert
    assert records, "the aggregation read the global model some other way"
    assert list(in_place) == list(copied)
    assert all(torch.equal(in_place[k], copied[k]) for k in copied)
