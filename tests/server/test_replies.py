"""ReplyBook: the one owner of who replied and what each site reported.

Replies are crafted as a hostile site (or a SuperLink reporting a lost site) would
send them; fedsilo.server.strategy's and secure_round's tests drive the book through
whole rounds.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from fedsilo import protocol
from fedsilo.server.records import Failure
from fedsilo.server.replies import InvalidReply, ReplyBook, replying_node

NAMES = {11: "site-a", 12: "site-b", 13: "site-c"}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def sent_to(node: int, message_id: str) -> Message:
    msg = Message(
        content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
    )
    msg.metadata.__dict__["_message_id"] = message_id  # what the SuperLink sets on sending
    return msg


def reply(instruction: Message, examples: int = 10, head: str = "f" * 64) -> Message:
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
            protocol.ARRAYS: ArrayRecord({"w": torch.zeros(2)}),
            protocol.METRICS: MetricRecord(metrics),
            protocol.SITE: ConfigRecord({protocol.LEDGER_HEAD: head}),
        }
    )
    return Message(content=content, reply_to=instruction)


def from_superlink(msg: Message) -> Message:
    msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return msg


def test_a_reply_is_its_authenticated_senders_whatever_it_answers() -> None:
    dst = {"m11": 11, "m12": 12}
    # Node 13 answers the message sent to node 12: it is still node 13's reply.
    forged = reply(sent_to(12, "m12"))
    forged.metadata.__dict__["_src_node_id"] = 13
    assert replying_node(forged, dst) == 13
    # An error the SuperLink makes for a lost site is that site's: the one it was sent to.
    lost = from_superlink(Message(Error(0, "node lost"), reply_to=sent_to(12, "m12")))
    assert replying_node(lost, dst) == 12


def test_the_book_names_sites_by_node_and_rereads_names_for_unknown_nodes() -> None:
    names = dict(NAMES)
    book = ReplyBook(lambda: names)
    assert book.site_name(11) == "site-a"
    assert book.site_name(99) == "node-99"
    names[99] = "site-z"  # registered after the run started
    assert book.site_name(99) == "site-z"


def test_train_replies_orders_by_site_and_records_the_rest() -> None:
    book = ReplyBook(lambda: NAMES)
    sent = [sent_to(n, f"m{n}") for n in (11, 12, 13)]
    replies = [
        reply(sent[2]),
        reply(sent[0], examples=20),
        reply(sent[0], examples=10**12),  # a second reply of site-a
    ]  # site-b never answers
    valid = book.train_replies(4, sent, replies, {"w": ((2,), torch.float32)})
    assert [(r.site, r.examples) for r, _ in valid] == [("site-a", 20), ("site-c", 10)]
    assert [id(m) for _, m in valid] == [id(replies[1]), id(replies[0])]
    assert book.last_round_sites == ["site-a", "site-c"]
    assert book.failures == [
        Failure("site-a", 4, "a second reply from this site in one round"),
        Failure("site-b", 4, "no reply before the round timeout"),
    ]
    assert book.committed == {"site-a": 20, "site-c": 10}


def test_a_report_is_checked_apart_and_only_accepting_it_records_it() -> None:
    book = ReplyBook(lambda: NAMES)
    report = book.report_of(12, 3, reply(sent_to(12, "m12"), examples=50))
    assert (report.site, report.round, report.examples) == ("site-b", 3, 50)
    assert book.reports == {} and book.committed == {}  # checked, not yet accepted
    with pytest.raises(InvalidReply, match="ledger-head"):
        book.report_of(12, 3, reply(sent_to(12, "m12"), head="not-a-hash"))
    book.accept(report)
    later = book.report_of(12, 4, reply(sent_to(12, "m12"), examples=10**12))
    book.accept(later)
    assert book.reports == {"site-b": later}
    assert book.committed == {"site-b": 50}  # the first accepted count stays the commitment


def test_stage_replies_ignores_nodes_not_asked_and_drops_both_of_two_replies() -> None:
    book = ReplyBook(lambda: NAMES)
    sent = [sent_to(n, f"m{n}") for n in (11, 12)]
    stranger = reply(sent_to(13, "m13"))  # node 13 was not asked in this stage
    usable = book.stage_replies(2, sent, [reply(sent[0]), reply(sent[0]), stranger])
    assert usable == {}
    assert book.failures == [
        Failure("site-a", 2, "a second reply from this site in one stage"),
        Failure("site-b", 2, "no reply before the round timeout"),
    ]


def test_took_part_names_the_aggregated_sites_in_order() -> None:
    book = ReplyBook(lambda: NAMES)
    book.took_part({13, 11, 99})
    assert book.last_round_sites == ["node-99", "site-a", "site-c"]


AFTER = "after its masked input arrived"
KINDS = [
    ("failed", "no reply before the round timeout", ("timeout", "")),
    ("failed", "masked-input stage: no reply before the round timeout", ("timeout", "masked-input")),  # noqa: E501
    ("failed", f"unmask stage, {AFTER}: Error: Node Unavailable - x", ("lost", "unmask")),
    ("failed", "invalid reply: update has NaN", ("invalid", "")),
    ("failed", f"consistency stage, {AFTER}: invalid reply: no view", ("invalid", "consistency")),
    ("failed", "a second reply from this site in one round", ("duplicate", "")),
    ("failed", "ValueError: boom", ("error", "")),
    ("refused", "epsilon 9.1 would exceed the site's budget 8", ("budget", "")),
    ("refused", "the run asks clip norm 5, above the policy's max-clip-norm 2", ("policy", "")),
    ("refused", "the site's data does not fit this run's task (digits)", ("setup", "")),
    ("refused", "masked-input stage: <script>what a hostile site says</script>", ("other", "")),
]  # fmt: skip


@pytest.mark.parametrize(("outcome", "reason", "expected"), KINDS)
def test_a_reason_has_one_of_a_few_kinds(
    outcome: str, reason: str, expected: tuple[str, str]
) -> None:
    from fedsilo.server.replies import reason_kind

    assert reason_kind(outcome, reason) == expected


def test_a_codec_reply_is_decoded_to_its_model_and_a_misfit_is_a_failure_saying_why() -> None:
    """The server checks the model each int8 update stands for; the reply keeps its wire
    arrays (the aggregation decodes them in its turn); a reply that does not fit the run's
    codec is left out, its reason recorded."""
    from fedsilo.server.replies import Codec
    from fedsilo.task.codec import SCALE, encode
    from fedsilo.task.rng import SeededRandom

    book = ReplyBook(lambda: NAMES)
    sent = [sent_to(n, f"m{n}") for n in (11, 12)]
    glob = {"w": torch.tensor([1.0, 2.0])}
    trained = {"w": torch.tensor([2.0, 1.0])}
    good, bad = reply(sent[0]), reply(sent[1])
    good.content[protocol.ARRAYS] = ArrayRecord(
        encode("int8", trained, glob, SeededRandom(0).uniform)
    )
    bad.content[protocol.ARRAYS] = ArrayRecord({"w": torch.zeros(2, dtype=torch.int8)})
    # Execute
    valid = book.train_replies(
        2, sent, [good, bad], {"w": ((2,), torch.float32)}, Codec("int8", glob)
    )
    # Assert: site-a's reply is valid and still int8; it decodes to its model (update
    # +-1 = +-scale: exact in int8).
    assert [r.site for r, _ in valid] == ["site-a"]
    wire = valid[0][1].content[protocol.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    assert wire["w"].dtype == torch.int8
    assert torch.equal(Codec("int8", glob).decoded(wire)["w"], trained["w"])
    assert book.failures == [
        Failure("site-b", 2, f"invalid reply: int8 update keys differ (missing ['w{SCALE}'], "
                "unexpected [])")
    ]  # fmt: skip


def test_a_models_spec_is_read_from_metadata_as_its_tensors_would_give_it() -> None:
    """spec_of reads keys, shapes and dtypes without deserialising the arrays; it must
    say exactly what the deserialised tensors do, for every dtype a model may hold."""
    from fedsilo.server.replies import spec_of

    dtypes = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int8, torch.bool)
    state = {f"t{i}": torch.zeros((2, 3) if i % 2 else (), dtype=d) for i, d in enumerate(dtypes)}
    arrays = ArrayRecord(state)
    expected = {k: (tuple(t.shape), t.dtype) for k, t in arrays.to_torch_state_dict().items()}
    assert spec_of(arrays) == expected
    assert list(spec_of(arrays)) == list(state)
