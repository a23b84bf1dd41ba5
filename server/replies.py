"""The reply book: who replied, whether the reply is usable, and what each site reported.

`ReplyBook` is the one owner of a run's replies, for local-DP rounds
(fedsilo.server.strategy) and for every stage of a secure round
(fedsilo.server.secure_round). No site can corrupt the run through it:

- **Names come from identities.** A reply's site is the node Flower authenticated
  (deployed: the node registered with the site's key; simulated: the engine's
  partition), looked up in RUN_DIR/sites.json (fedsilo.server.run_dir); a node not
  in it is `node-<id>`. Nothing a message says names a site, so one site cannot
  pose as another or overwrite another's recorded ledger head. A second reply from
  one node in a round is a failure.
- **Every reply is validated before it is aggregated**: the global model's keys,
  shapes and dtypes, finite values, every key of fedsilo.protocol.REPLY_METRICS of
  the right type and range, a ledger head. A reply that fails is a recorded
  `Failure(site, round, reason)` and the round goes on with the others.
- **A site's first accepted example count is its commitment** for the run
  (`committed`), which bounds its weight in later rounds (fedsilo.server.strategy).

Replies that are errors (`failures`) or a site's refusal to train (`refusals`,
with the site's public reason: fedsilo.privacy.refusal) are logged and dropped.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID  # the sender of errors for lost nodes

from fedsilo import protocol
from fedsilo.privacy.refusal import parse_refusal
from fedsilo.server.records import Failure, Flagged, Refusal, RoundRecord, SiteRoundReport
from fedsilo.task import codec
from fedsilo.task.train import non_finite

log = logging.getLogger("fedsilo.server")
HEAD = re.compile(r"[0-9a-f]{64}")
# How a failure's reason reads (after a secure round's "STAGE stage[, ...]: " prefix).
NO_REPLY = "no reply before the round timeout"
INVALID = "invalid reply: "
SECOND_REPLY = "a second reply from this site"
NODE_LOST = "Error: Node Unavailable"  # how Flower's SuperLink reports a node it lost
STAGE = re.compile(r"^([a-z-]+) stage(?:, [^:]*)?: ")
# A refusal's kind, from words of the site's public reason (fedsilo.privacy.refusal):
# the first that matches, else "other". A label for monitoring, never a decision.
REFUSAL_WORDS = (
    ("budget", ("budget", "epsilon", "spent")),
    ("policy", ("policy", "allow", "noise multiplier", "clip", "rounds")),
    ("setup", ("ledger", "certificate", "data", "sites take part", "site(s) take part")),
)
INTEGER_METRICS = (protocol.NUM_EXAMPLES, protocol.STEPS)


@dataclass(frozen=True)
class SiteReport:
    """A site's latest accepted reply, as the summary and audit show it."""

    site: str
    examples: int
    epsilon: float
    delta: float
    target_epsilon: float
    round: int
    ledger_head: str | None = None  # the site's ledger sha256 after this round's spend

    def to_record(self) -> SiteRoundReport:
        """What a round's metrics line keeps of it (the round is the line's)."""
        return SiteRoundReport(
            examples=self.examples,
            epsilon=self.epsilon,
            delta=self.delta,
            target_epsilon=self.target_epsilon,
            ledger_head=self.ledger_head,
        )


class InvalidReply(ValueError):
    """A reply that cannot be aggregated; the message says why."""


Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class ReplyBook:
    """Name each reply by its authenticated node, validate it, keep what the run reports.

    Its records are read by the run's summary; they change only through its methods.
    """

    def __init__(self, names: Callable[[], Mapping[int, str]] | None = None) -> None:
        """`names()` maps authenticated node ids to site names (re-read for unknown nodes)."""
        self._names = names or dict
        self.node_names: dict[int, str] = dict(self._names())
        self.reports: dict[str, SiteReport] = {}  # each site's latest accepted report
        self.failures: list[Failure] = []
        self.refusals: list[Refusal] = []
        self.flagged: list[Flagged] = []  # what a robust aggregation rule did to a site
        self.last_round_sites: list[str] = []  # whose updates the last round aggregated
        self.committed: dict[str, int] = {}  # example counts sites committed to

    def restore(self, records: Iterable[RoundRecord]) -> None:
        """Take up where a stopped server left off, from its rounds' metrics lines.

        Reports, commitments (a site's first accepted count stays its commitment),
        failures and refusals are as they were after the last completed round.
        """
        for rec in records:
            r = rec.round
            for site, rep in rec.reports.items():
                self.accept(
                    SiteReport(
                        site=site,
                        examples=rep.examples,
                        epsilon=rep.epsilon,
                        delta=rep.delta,
                        target_epsilon=rep.target_epsilon,
                        round=r,
                        ledger_head=rep.ledger_head,
                    )
                )
            reasons = rec.reasons
            self.failures += [Failure(s, r, reasons.get(s, "")) for s in rec.failed]
            self.refusals += [Refusal(s, r, reasons.get(s, "")) for s in rec.refused]
            self.flagged += [Flagged(s, r, why) for s, why in rec.flagged.items()]

    def flag(self, server_round: int, reasons: Mapping[str, str]) -> None:
        """Record what the round's robust aggregation rule did to each site it acted on."""
        for site, reason in sorted(reasons.items()):
            log.warning("aggregate_train: round %d: %s: %s", server_round, site, reason)
            self.flagged.append(Flagged(site, server_round, reason))

    def site_name(self, node: int) -> str:
        """The site of authenticated node `node` (`node-<id>` when sites.json lacks it)."""
        if node not in self.node_names:
            self.node_names.update(self._names())
        return self.node_names.get(node, f"node-{node}")

    # ------------------------------------------------------------ local-DP rounds

    def train_replies(
        self,
        server_round: int,
        sent: list[Message],
        replies: Iterable[Message],
        spec: Spec,
        decoder: Codec | None = None,
    ) -> list[tuple[SiteReport, Message]]:
        """A local-DP round's valid replies with their accepted reports, ordered by site.

        Each is checked against `spec` (the global model's arrays); errors, refusals,
        second replies, invalid and missing replies are recorded and left out. With a
        `decoder` (run config update-codec, not float32) each reply's coded arrays are
        checked a piece at a time as they decode (Codec.pieces); the reply keeps its wire
        arrays, and the server never holds a decoded model for the checks.
        """
        dst = destinations(sent)
        usable: list[tuple[SiteReport, Message]] = []
        replied: set[int] = set()
        for msg in replies:
            node = replying_node(msg, dst)
            site = self.site_name(node)
            if node in replied:
                self._fail(site, server_round, f"{SECOND_REPLY} in one round")
                continue
            replied.add(node)
            if msg.has_error():
                self._error(site, server_round, msg)
                continue
            try:
                report = self._validate(site, server_round, msg, spec, decoder)
            except InvalidReply as exc:
                self._fail(site, server_round, f"{INVALID}{exc}")
                continue
            self.accept(report)
            usable.append((report, msg))
        for node in sorted(set(dst.values()) - replied):
            self._fail(self.site_name(node), server_round, NO_REPLY)
        usable.sort(key=lambda pair: pair[0].site)
        self.last_round_sites = [report.site for report, _ in usable]
        log.info("aggregate_train: round %d: %d results", server_round, len(usable))
        return usable

    # ------------------------------------------------------------ secure rounds

    def stage_replies(
        self, server_round: int, sent: list[Message], replies: Iterable[Message], where: str = ""
    ) -> dict[int, Message]:
        """A secure-aggregation stage's replies that are not errors, by node (one each).

        Errors, refusals, second replies and missing replies are recorded as for a
        plain round (fedsilo.server.secure_round), each failure's reason after `where`
        (the stage, e.g. "unmask stage: ").
        """
        dst = destinations(sent)
        usable: dict[int, Message] = {}
        replied: set[int] = set()
        for msg in replies:
            node = replying_node(msg, dst)
            if node not in dst.values():
                continue  # not a site this stage asked
            if node in replied:
                self.fail(node, server_round, f"{where}{SECOND_REPLY} in one stage")
                usable.pop(node, None)
                continue
            replied.add(node)
            if msg.has_error():
                self._error(self.site_name(node), server_round, msg, where)
            elif not msg.has_content():
                self.fail(node, server_round, f"{where}{INVALID}no content")
            else:
                usable[node] = msg
        for node in sorted(set(dst.values()) - replied):
            self.fail(node, server_round, f"{where}{NO_REPLY}")
        return usable

    def report_of(self, node: int, server_round: int, msg: Message) -> SiteReport:
        """The public report (metrics, ledger head) of node `node`'s reply, not yet accepted.

        Raises:
            InvalidReply: a metric or the ledger head is missing or out of range.
        """
        return self._report(self.site_name(node), server_round, msg)

    def took_part(self, nodes: Iterable[int]) -> None:
        """Record the sites of `nodes` as the ones whose updates the round aggregated."""
        self.last_round_sites = sorted(self.site_name(n) for n in nodes)

    # ------------------------------------------------------------ the books

    def accept(self, report: SiteReport) -> None:
        """Keep `report` as its site's latest; its first accepted count is its commitment."""
        self.reports[report.site] = report
        self.committed.setdefault(report.site, report.examples)

    def fail(self, node: int, server_round: int, reason: str) -> None:
        """Record that node `node` sent nothing usable in `server_round`, and why."""
        self._fail(self.site_name(node), server_round, reason)

    def _error(self, site: str, server_round: int, msg: Message, where: str = "") -> None:
        refusal = parse_refusal(msg.error.code, msg.error.reason or "")
        if refusal is not None:  # the site's own name in it is ignored: we know who it is
            self.refusals.append(Refusal(site, server_round, refusal[1]))
            log.warning(
                "aggregate_train: round %d: site %s refused: %s", server_round, site, refusal[1]
            )
            return
        reason = msg.error.reason.strip().splitlines()[-1] if msg.error.reason else "error"
        self._fail(site, server_round, where + reason)

    def _fail(self, site: str, server_round: int, reason: str) -> None:
        self.failures.append(Failure(site, server_round, reason))
        log.warning("aggregate_train: round %d: site %s failed: %s", server_round, site, reason)

    # ------------------------------------------------------------ validation

    def _validate(
        self, site: str, server_round: int, msg: Message, spec: Spec, decoder: Codec | None
    ) -> SiteReport:
        if not msg.has_content():
            raise InvalidReply("no content")
        arrays = msg.content.get(protocol.ARRAYS)
        if not isinstance(arrays, ArrayRecord):
            raise InvalidReply(f"no `{protocol.ARRAYS}` record of model arrays")
        if not isinstance(msg.content.get(protocol.METRICS), MetricRecord):
            raise InvalidReply(f"no `{protocol.METRICS}` record")
        state = deserialised(arrays)
        if decoder is None:
            check_state(state, spec)
        else:  # checked a piece at a time: the server never holds a decoded model
            decoder.check(state)  # the global model's keys; coded tensors of its shapes
            coded = [k for k in decoder.global_state if decoder.coded(k)]
            plain = [k for k in decoder.global_state if not decoder.coded(k)]
            check_state({k: state[k] for k in plain}, {k: spec[k] for k in plain if k in spec})
            for key in coded:
                if any(not bool(p.isfinite().all()) for _, p in decoder.pieces(state, key)):
                    raise InvalidReply(f"`{key}` holds NaN or infinity")
        return self._report(site, server_round, msg)

    def _report(self, site: str, server_round: int, msg: Message) -> SiteReport:
        metrics = msg.content.get(protocol.METRICS)
        record = msg.content.get(protocol.SITE)
        if not isinstance(metrics, MetricRecord):
            raise InvalidReply(f"no `{protocol.METRICS}` record")
        values = check_metrics(metrics)
        head = record.get(protocol.LEDGER_HEAD) if isinstance(record, ConfigRecord) else None
        if not (isinstance(head, str) and HEAD.fullmatch(head)):
            raise InvalidReply(f"no `{protocol.LEDGER_HEAD}` (a sha256 in hex)")
        return SiteReport(
            site=site,
            examples=int(values[protocol.NUM_EXAMPLES]),
            epsilon=values[protocol.EPSILON],
            delta=values[protocol.DELTA],
            target_epsilon=values[protocol.TARGET_EPSILON],
            round=server_round,
            ledger_head=head,
        )


def destinations(sent: Iterable[Message]) -> dict[str, int]:
    """The node each sent message went to, by message id."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent}


def replying_node(msg: Message, dst: Mapping[str, int]) -> int:
    """The authenticated node a reply is from.

    An error the SuperLink makes for a lost site comes from the SuperLink: its site
    is the one the answered message went to (`dst`, by message id).
    """
    src = msg.metadata.src_node_id
    if src == SUPERLINK_NODE_ID:
        return dst.get(msg.metadata.reply_to_message_id, src)
    return src


@dataclass(frozen=True)
class Codec:
    """A round's update codec (fedsilo.task.codec) and the global model it decodes against."""

    name: str
    global_state: Mapping[str, torch.Tensor]

    def decoded(self, wire: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model a reply's tensors stand for; InvalidReply when they do not fit."""
        try:
            return codec.decode(self.name, wire, self.global_state)
        except codec.CodecError as exc:
            raise InvalidReply(str(exc)) from None

    def check(self, wire: Mapping[str, torch.Tensor]) -> None:
        """InvalidReply unless the reply's tensors fit the codec (decoding none of them)."""
        try:
            codec.check_update(self.name, wire, self.global_state)
        except codec.CodecError as exc:
            raise InvalidReply(str(exc)) from None

    def coded(self, key: str) -> bool:
        """Whether the model's tensor `key` crosses the wire coded (else as it is)."""
        return self.name != "float32" and self.global_state[key].is_floating_point()

    def pieces(
        self, wire: Mapping[str, torch.Tensor], key: str
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """A coded tensor of a checked reply, decoded a piece at a time (codec.decoded_pieces)."""
        return codec.decoded_pieces(self.name, wire, self.global_state, key)


def spec_of(arrays: ArrayRecord) -> Spec:
    """Keys, shapes and dtypes of a model's arrays, from their metadata (the arrays
    themselves are not deserialised: a model's worth of memory and time a round)."""
    return {k: (tuple(a.shape), _torch_dtype(a.dtype)) for k, a in arrays.items()}


@functools.cache
def _torch_dtype(numpy_dtype: str) -> torch.dtype:
    """The torch dtype of an Array's numpy dtype (as `to_torch_state_dict` reads it)."""
    return torch.from_numpy(numpy.zeros(0, dtype=numpy_dtype)).dtype


def deserialised(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """A reply's arrays as tensors; InvalidReply when they do not deserialise."""
    try:
        return arrays.to_torch_state_dict()
    except Exception as exc:  # whatever a malformed record raises in deserialisation
        raise InvalidReply(f"model arrays do not deserialise ({type(exc).__name__})") from None


def check_state(state: Mapping[str, torch.Tensor], spec: Spec) -> None:
    """Raise InvalidReply unless `state` has exactly `spec`'s keys, shapes and dtypes, finite."""
    if spec and set(state) != set(spec):
        missing, extra = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
        raise InvalidReply(f"model keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, tensor in state.items():
        if spec and (tuple(tensor.shape), tensor.dtype) != spec[key]:
            raise InvalidReply(
                f"`{key}` is {tuple(tensor.shape)} {tensor.dtype}, the model's is "
                f"{spec[key][0]} {spec[key][1]}"
            )
    bad = non_finite(state)
    if bad:
        raise InvalidReply(f"`{bad[0]}` holds NaN or infinity")


def check_metrics(metrics: MetricRecord) -> dict[str, float]:
    """The reply's protocol metrics, each present, of its type and in range."""
    out: dict[str, float] = {}
    for key in protocol.REPLY_METRICS:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidReply(f"metric `{key}` is missing or not a number ({value!r})")
        if key in INTEGER_METRICS and not (isinstance(value, int) and value >= 1):
            raise InvalidReply(f"metric `{key}` must be an integer >= 1, not {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise InvalidReply(f"metric `{key}` must be finite and >= 0, not {value!r}")
        out[key] = float(value)
    if not 0 < out[protocol.DELTA] < 1:
        raise InvalidReply(f"metric `{protocol.DELTA}` must be in (0, 1)")
    return out


def reason_kind(outcome: str, reason: str) -> tuple[str, str]:
    """(kind, stage) of a failure's or refusal's reason, for monitoring: a failure is
    `timeout`, `lost` (Flower lost the node), `invalid`, `duplicate` or `error` (the site
    raised); a refusal is `budget`, `policy`, `setup` or `other` (REFUSAL_WORDS). The
    stage is a secure round's, or "" for a plain round. Few values: a hostile site's text
    cannot grow a metric's labels."""
    stage = ""
    if outcome == "failed" and (match := STAGE.match(reason)):
        stage, reason = match.group(1), reason[match.end() :]
    if outcome == "refused":
        low = reason.lower()
        kind = next((k for k, words in REFUSAL_WORDS if any(w in low for w in words)), "other")
        return kind, stage
    if reason.startswith(NO_REPLY):
        return "timeout", stage
    if reason.startswith(NODE_LOST):
        return "lost", stage
    if reason.startswith(INVALID):
        return "invalid", stage
    if reason.startswith(SECOND_REPLY):
        return "duplicate", stage
    return "error", stage
