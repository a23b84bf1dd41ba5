"""Aggregation: FedAvg over validated replies, wrapped to track each site's report.

`SiteReports` wraps any Flower strategy (as Flower's DP wrappers do). No site can
corrupt the run through it:

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
- **A site cannot inflate its weight.** FedAvg weighs a site by its example count,
  which the site reports. The count a site reports in its first accepted round is
  its *commitment* for the run; later rounds weigh it by min(reported, committed),
  and no site weighs more than WEIGHT_CAP_RATIO times the median commitment of the
  round's sites. A site claiming 10^12 examples thus moves the average at most as
  much as WEIGHT_CAP_RATIO ordinary sites would (with at least three sites; with
  one or two, a median is no bound and each such site simply gets its share).

Replies that are errors (`failures`) or a site's refusal to train (`refusals`,
with the site's public reason: fedsilo.privacy.refusal) are logged and dropped;
the rest are ordered by site name (deterministic aggregation) and handed to the
wrapped strategy.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID  # the sender of errors for lost nodes
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsilo import protocol
from fedsilo.privacy.refusal import parse_refusal
from fedsilo.task.train import non_finite

log = logging.getLogger("fedsilo.server")
WEIGHT_CAP_RATIO = 4.0  # no site weighs more than 4x the median site of its round
HEAD = re.compile(r"[0-9a-f]{64}")
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

    def to_record(self) -> dict[str, object]:
        """What a round's metrics line keeps of it (the round is the line's)."""
        return {
            "examples": self.examples,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "ledger_head": self.ledger_head,
        }


@dataclass(frozen=True)
class Failure:
    """A site that sent no usable update in a round, and why."""

    site: str
    round: int
    reason: str


@dataclass(frozen=True)
class Refusal:
    """A site that refused to train in a round, in its own (public) words."""

    site: str
    round: int
    reason: str


class InvalidReply(ValueError):
    """A reply that cannot be aggregated; the message says why."""


Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class SiteReports(Strategy):
    """Wrap a strategy; validate replies; keep each site's latest report and every failure."""

    def __init__(
        self, inner: Strategy, names: Callable[[], Mapping[int, str]] | None = None
    ) -> None:
        """`names()` maps authenticated node ids to site names (re-read for unknown nodes)."""
        self.inner = inner
        self._names = names or dict
        self.node_names: dict[int, str] = dict(self._names())
        self.reports: dict[str, SiteReport] = {}
        self.failures: list[Failure] = []
        self.refusals: list[Refusal] = []
        self.last_round_sites: list[str] = []
        self.committed: dict[str, int] = {}  # example counts sites committed to
        self.noise: dict[str, float] = {}  # each site's latest reported noise multiplier
        self._sent: list[Message] = []  # this round's train messages (ids set on sending)
        self._spec: Spec = {}

    def summary(self) -> None:
        self.inner.summary()

    def restore(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Take up where a stopped server left off, from its rounds' metrics lines.

        Reports, commitments (a site's first accepted count stays its commitment),
        failures and refusals are as they were after the last completed round.
        """
        for rec in records:
            r = int(rec["round"])
            for site, rep in (rec.get("reports") or {}).items():
                report = SiteReport(site=site, round=r, **rep)
                self.reports[site] = report
                self.committed.setdefault(site, report.examples)
            reasons = rec.get("reasons") or {}
            self.failures += [Failure(s, r, reasons.get(s, "")) for s in rec.get("failed", [])]
            self.refusals += [Refusal(s, r, reasons.get(s, "")) for s in rec.get("refused", [])]

    def site_name(self, node: int) -> str:
        if node not in self.node_names:
            self.node_names.update(self._names())
        return self.node_names.get(node, f"node-{node}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._spec = spec_of(arrays)
        self._sent = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable: list[tuple[str, Message]] = []
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        replied: set[int] = set()
        for msg in replies:
            src = msg.metadata.src_node_id
            # An error the SuperLink makes for a lost site comes from the SuperLink:
            # find the site from the message it answers.
            node = sent.get(msg.metadata.reply_to_message_id, src)
            node = node if src == SUPERLINK_NODE_ID else src
            site = self.site_name(node)
            if node in replied:
                self._fail(site, server_round, "a second reply from this site in one round")
                continue
            replied.add(node)
            if msg.has_error():
                self._error(site, server_round, msg)
                continue
            try:
                report = self._validate(site, server_round, msg)
            except InvalidReply as exc:
                self._fail(site, server_round, f"invalid reply: {exc}")
                continue
            self.reports[site] = report
            usable.append((site, msg))
        for node in sorted(set(sent.values()) - replied):
            self._fail(self.site_name(node), server_round, "no reply before the round timeout")
        usable.sort(key=lambda pair: pair[0])
        self.last_round_sites = [site for site, _ in usable]
        log.info("aggregate_train: round %d: %d results", server_round, len(usable))
        if not usable:
            return None, None
        self._bound_weights(usable)
        return self.inner.aggregate_train(server_round, [m for _, m in usable])

    def stage_replies(
        self, server_round: int, sent: list[Message], replies: Iterable[Message]
    ) -> dict[int, Message]:
        """A secure-aggregation stage's replies that are not errors, by node (one each).

        Errors, refusals, second replies and missing replies are recorded as for a
        plain round (fedsilo.server.secure_round).
        """
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        usable: dict[int, Message] = {}
        replied: set[int] = set()
        for msg in replies:
            src = msg.metadata.src_node_id
            node = dst.get(msg.metadata.reply_to_message_id, src)
            node = node if src == SUPERLINK_NODE_ID else src
            if node not in dst.values():
                continue  # not a site this stage asked
            if node in replied:
                self.fail(node, server_round, "a second reply from this site in one stage")
                usable.pop(node, None)
                continue
            replied.add(node)
            if msg.has_error():
                self._error(self.site_name(node), server_round, msg)
            elif not msg.has_content():
                self.fail(node, server_round, "invalid reply: no content")
            else:
                usable[node] = msg
        for node in sorted(set(dst.values()) - replied):
            self.fail(node, server_round, "no reply before the round timeout")
        return usable

    def fail(self, node: int, server_round: int, reason: str) -> None:
        """Record that node `node` sent nothing usable in `server_round`, and why."""
        self._fail(self.site_name(node), server_round, reason)

    def accept_report(self, node: int, server_round: int, msg: Message) -> SiteReport:
        """The public report (metrics, ledger head) of a masked reply; InvalidReply if bad."""
        site = self.site_name(node)
        return self._report(site, server_round, msg)

    def _error(self, site: str, server_round: int, msg: Message) -> None:
        refusal = parse_refusal(msg.error.code, msg.error.reason or "")
        if refusal is not None:  # the site's own name in it is ignored: we know who it is
            self.refusals.append(Refusal(site, server_round, refusal[1]))
            log.warning(
                "aggregate_train: round %d: site %s refused: %s", server_round, site, refusal[1]
            )
            return
        reason = msg.error.reason.strip().splitlines()[-1] if msg.error.reason else "error"
        self._fail(site, server_round, reason)

    def _fail(self, site: str, server_round: int, reason: str) -> None:
        self.failures.append(Failure(site, server_round, reason))
        log.warning("aggregate_train: round %d: site %s failed: %s", server_round, site, reason)

    def _validate(self, site: str, server_round: int, msg: Message) -> SiteReport:
        if not msg.has_content():
            raise InvalidReply("no content")
        arrays = msg.content.get(protocol.ARRAYS)
        if not isinstance(arrays, ArrayRecord):
            raise InvalidReply(f"no `{protocol.ARRAYS}` record of model arrays")
        if not isinstance(msg.content.get(protocol.METRICS), MetricRecord):
            raise InvalidReply(f"no `{protocol.METRICS}` record")
        check_arrays(arrays, self._spec)
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
        examples = int(values[protocol.NUM_EXAMPLES])
        self.committed.setdefault(site, examples)
        self.noise[site] = values[protocol.NOISE_MULTIPLIER]
        return SiteReport(
            site=site,
            examples=examples,
            epsilon=values[protocol.EPSILON],
            delta=values[protocol.DELTA],
            target_epsilon=values[protocol.TARGET_EPSILON],
            round=server_round,
            ledger_head=head,
        )

    def _bound_weights(self, usable: list[tuple[str, Message]]) -> None:
        """Replace each reply's example count by its bounded weight (see the docstring)."""
        committed = [self.committed[site] for site, _ in usable]
        cap = WEIGHT_CAP_RATIO * statistics.median(committed) if len(usable) >= 3 else math.inf
        for site, msg in usable:
            reported = self.reports[site].examples
            weight = min(reported, self.committed[site], cap)
            metrics = cast(MetricRecord, msg.content[protocol.METRICS])  # checked in _validate
            metrics[protocol.NUM_EXAMPLES] = max(1, int(weight))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def spec_of(arrays: ArrayRecord) -> Spec:
    """Keys, shapes and dtypes of a model's arrays."""
    return {k: (tuple(v.shape), v.dtype) for k, v in arrays.to_torch_state_dict().items()}


def check_arrays(arrays: ArrayRecord, spec: Spec) -> None:
    """Raise InvalidReply unless `arrays` has exactly `spec`'s keys, shapes and dtypes, finite."""
    try:
        state = arrays.to_torch_state_dict()
    except Exception as exc:  # whatever a malformed record raises in deserialisation
        raise InvalidReply(f"model arrays do not deserialise ({type(exc).__name__})") from None
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
