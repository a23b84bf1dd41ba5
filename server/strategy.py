"""Aggregation: FedAvg weighted by examples, wrapped to track each site's report.

`SiteReports` wraps any Flower strategy (Flower's DP wrappers do the same): it
reads each train reply's site name and privacy metrics, logs and drops replies
that are errors (`failures`) or a site's refusal to train (`refusals`, with the
site's own reason: fedsilo.privacy.refusal), orders the rest by site name (so aggregation is
deterministic whatever order replies arrive in) and hands them to the wrapped
strategy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from fedsilo.privacy.refusal import parse_refusal
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("fedsilo.server")


@dataclass(frozen=True)
class SiteReport:
    """A site's latest reply, as the summary and audit show it."""

    site: str
    examples: int
    epsilon: float
    delta: float
    target_epsilon: float
    round: int
    site_epsilon: float | None = None  # all the site's spend on its data, at site_delta
    site_budget: float | None = None
    site_delta: float | None = None
    ledger_head: str | None = None  # the site's ledger sha256 after this round's spend


@dataclass(frozen=True)
class Failure:
    """A site that sent no usable update in a round, and why."""

    site: str
    round: int
    reason: str


@dataclass(frozen=True)
class Refusal:
    """A site that refused to train in a round, in its own words."""

    site: str
    round: int
    reason: str


class SiteReports(Strategy):
    """Wrap a strategy; keep the latest report of every site and every failure."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.reports: dict[str, SiteReport] = {}
        self.failures: list[Failure] = []
        self.refusals: list[Refusal] = []
        self.last_round_sites: list[str] = []
        self.node_names: dict[int, str] = {}  # node id -> site name, from earlier replies
        self._sent: list[Message] = []  # this round's train messages (ids set on sending)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable: list[tuple[str, Message]] = []
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        replied: set[int] = set()
        for msg in replies:
            # An error the SuperLink makes for a lost site names no site and comes from
            # the SuperLink: find the site from the message it answers.
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            replied.add(node)
            site = _site_name(msg)
            if site.startswith("node-"):
                site = self.node_names.get(node, f"node-{node}")
            self.node_names.setdefault(node, site)
            if msg.has_error():
                refusal = parse_refusal(msg.error.code, msg.error.reason or "")
                if refusal is not None:
                    self.refusals.append(Refusal(refusal[0], server_round, refusal[1]))
                    log.warning(
                        "aggregate_train: round %d: site %s refused: %s", server_round, *refusal
                    )
                    continue
                reason = msg.error.reason.strip().splitlines()[-1] if msg.error.reason else "error"
                self.failures.append(Failure(site, server_round, reason))
                log.warning(
                    "aggregate_train: round %d: site %s failed: %s", server_round, site, reason
                )
                continue
            metrics = msg.content["metrics"]
            assert isinstance(metrics, MetricRecord)
            self.reports[site] = SiteReport(
                site=site,
                examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
                epsilon=float(metrics["epsilon"]),  # type: ignore[arg-type]
                delta=float(metrics["delta"]),  # type: ignore[arg-type]
                target_epsilon=float(metrics["target-epsilon"]),  # type: ignore[arg-type]
                round=server_round,
                site_epsilon=_optional(metrics, "site-epsilon"),
                site_budget=_optional(metrics, "site-budget"),
                site_delta=_optional(metrics, "site-delta"),
                ledger_head=_ledger_head(msg),
            )
            usable.append((site, msg))
        for node in sorted(set(sent.values()) - replied):
            site = self.node_names.get(node, f"node-{node}")
            self.failures.append(Failure(site, server_round, "no reply before the round timeout"))
        usable.sort(key=lambda pair: pair[0])
        self.last_round_sites = [site for site, _ in usable]
        log.info("aggregate_train: round %d: %d results", server_round, len(usable))
        if not usable:
            return None, None
        return self.inner.aggregate_train(server_round, [m for _, m in usable])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _site_name(msg: Message) -> str:
    if msg.has_content() and "site" in msg.content:
        record = msg.content["site"]
        if isinstance(record, ConfigRecord) and "name" in record:
            return str(record["name"])
    return f"node-{msg.metadata.src_node_id}"


def _optional(metrics: MetricRecord, key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None  # type: ignore[arg-type]


def _ledger_head(msg: Message) -> str | None:
    record = msg.content.get("site")
    if isinstance(record, ConfigRecord) and "ledger-head" in record:
        return str(record["ledger-head"])
    return None
