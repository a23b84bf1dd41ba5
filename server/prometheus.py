"""The server's Prometheus metrics, read from its run directory at each scrape.

`RunCollector(run_dir)` is what `--metrics-port` serves for `fedsilo server start` and
`fedsilo simulate` (fedsilo.exporter). Everything comes from the records the server
already writes (metrics.jsonl, progress.json, summary.json, config.json, and
sites-online.json, which the launcher rewrites when the count of connected sites
changes), so a scrape shows exactly what the run directory holds, costs a few file
reads (never a call to the SuperLink), and a scrape of a finished or restarted run
shows the same history. Names start with `fedsilo_server_`:

  round                      the last completed round          (gauge)
  rounds_planned             the rounds the run plans          (gauge)
  round_started              the last round sent               (gauge)
  round_seconds              sending a round to its evaluation (histogram)
  accuracy, loss             central evaluation, last round    (gauge)
  max_site_epsilon           largest epsilon a site reported   (gauge)
  site_epsilon{site}         each site's reported run epsilon  (gauge)
  replies_total{site,outcome}  accepted, failed, refused, flagged (counter)
  reply_problems_total{outcome,reason,stage}  failed and refused replies by
                             kind (fedsilo.server.replies.reason_kind)   (counter)
  rounds_lost_total          rounds lost to crashes            (counter)
  sites_online               sites connected now               (gauge)
  finished                   1 once summary.json is written    (gauge)

A site's epsilon here is the one it sends with each reply (this run's spend, which it
discloses by design); its total spend and budget never reach the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsilo.errors import FedsiloError
from fedsilo.server.records import OUTCOMES, RoundRecord, site_events
from fedsilo.server.replies import reason_kind
from fedsilo.server.run_dir import (
    read_config,
    read_metrics,
    read_online,
    read_progress,
    read_summary,
)

PREFIX = "fedsilo_server_"
# Seconds a round takes: a simulated digits round ~1 s, a deployed one ~1-4 s, a large
# model or a slow site minutes.
BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class RunCollector:
    """A prometheus-client collector over one run directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        try:
            rounds = read_metrics(self.run_dir)
            progress = read_progress(self.run_dir)
            summary = read_summary(self.run_dir)
        except (FedsiloError, OSError):
            rounds, progress, summary = [], None, None  # a damaged file: nothing to show

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, doc, value=value)

        last = rounds[-1] if rounds else None
        yield from gauge("round", "The last completed round.", last.round if last else 0)
        yield from gauge("rounds_planned", "The rounds the run plans.", self._planned())
        started = progress.started if progress is not None else None
        yield from gauge("round_started", "The last round the server sent.", started)
        yield _histogram(HistogramMetricFamily, rounds)
        if last is not None:
            yield from gauge("accuracy", "Central accuracy after the last round.", last.accuracy)
            yield from gauge("loss", "Central loss after the last round.", last.loss)
            yield from gauge(
                "max_site_epsilon",
                "The largest epsilon a site reported in the last round (this run's spend).",
                last.max_epsilon,
            )
        eps = GaugeMetricFamily(
            PREFIX + "site_epsilon",
            "Each site's epsilon for this run, as it last reported it.",
            labels=["site"],
        )
        for site, value in sorted(_latest_epsilons(rounds).items()):
            eps.add_metric([site], value)
        yield eps
        replies = CounterMetricFamily(
            PREFIX + "replies",
            "Site replies by outcome: accepted (aggregated), failed, refused, and flagged "
            "by a robust aggregation rule (also accepted).",
            labels=["site", "outcome"],
        )
        for (site, outcome), n in sorted(_outcomes(rounds, summary).items()):
            replies.add_metric([site, outcome], n)
        yield replies
        problems = CounterMetricFamily(
            PREFIX + "reply_problems",
            "Failed and refused replies by kind: failed (timeout, lost, invalid, duplicate, "
            "error) and refused (budget, policy, setup, other), and a secure round's stage.",
            labels=["outcome", "reason", "stage"],
        )
        for key, n in sorted(_problems(rounds, summary).items()):
            problems.add_metric(list(key), n)
        yield problems
        lost = len(progress.lost) if progress is not None else 0
        yield CounterMetricFamily(PREFIX + "rounds_lost", "Rounds lost to crashes.", value=lost)
        online = read_online(self.run_dir)
        if online is not None and not summary:
            yield from gauge("sites_online", "Sites connected now.", online[0])
        yield from gauge("finished", "1 once the run ended.", 1.0 if summary else 0.0)

    def _planned(self) -> int | None:
        try:
            return int(read_config(self.run_dir)["rounds"])
        except (ValueError, KeyError, TypeError):
            return None


def _histogram(family: Any, rounds: list[RoundRecord]) -> Any:
    counts = [sum(r.seconds <= b for r in rounds) for b in BUCKETS]
    buckets = [(str(float(b)), float(c)) for b, c in zip(BUCKETS, counts, strict=True)]
    buckets.append(("+Inf", float(len(rounds))))
    return family(
        PREFIX + "round_seconds",
        "Seconds from sending a round to its central evaluation.",
        buckets=buckets,
        sum_value=sum(r.seconds for r in rounds),
    )


def _latest_epsilons(rounds: list[RoundRecord]) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in rounds:
        out.update({site: report.epsilon for site, report in record.reports.items()})
    return out


def _problems(rounds: list[RoundRecord], summary: Any) -> dict[tuple[str, str, str], int]:
    """(outcome, kind, stage) -> count of the failed and refused replies."""
    counts: dict[tuple[str, str, str], int] = {}
    for event in site_events(rounds, summary):
        outcome = OUTCOMES[type(event)]
        if outcome != "flagged":
            key = (outcome, *reason_kind(outcome, event.reason))
            counts[key] = counts.get(key, 0) + 1
    return counts


def _outcomes(rounds: list[RoundRecord], summary: Any) -> dict[tuple[str, str], int]:
    """(site, outcome) -> count over the completed rounds, and a stopped round's
    failures and refusals that only summary.json holds."""
    counts: dict[tuple[str, str], int] = {}
    pairs = [(site, "accepted") for record in rounds for site in record.sites]
    pairs += [(e.site, OUTCOMES[type(e)]) for e in site_events(rounds, summary)]
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return counts
