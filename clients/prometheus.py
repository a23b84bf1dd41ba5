"""A site's Prometheus metrics, read from its own ledger at each scrape.

`SiteCollector(ledger)` is what `fedsilo client start --metrics-port` serves
(fedsilo.exporter), on the site's own machine. Everything comes from the site's ledger,
audited as `fedsilo audit` does (fedsilo.privacy.audit): the site's *total* spend over
every run and its budget, which the site keeps to itself and never sends to the server.
The audit is recomputed when the file changed, at most once every AUDIT_EVERY_S seconds
(it composes every spend: ~0.4 s of CPU, taken from the site's training when a scraper
asks each second); `audit_timestamp_seconds` says when the figures shown were computed.
Bind it where only the site's own monitoring can reach it (127.0.0.1 by default). Names
start with `fedsilo_site_`:

  epsilon{accountant}     spent in total: `budget` (what the site enforces, min of PRV
                          and RDP) and `rdp`                                 (gauge)
  budget_epsilon          its policy's max-epsilon                          (gauge)
  budget_left_epsilon     budget minus spent                                (gauge)
  rounds_trained_total    spends on its ledger                              (counter)
  dp_steps_total          DP-SGD steps on its ledger                        (counter)
  ledger_ok               1 while the audit passes (ok or exhausted)        (gauge)
  audit_timestamp_seconds when that audit ran (Unix time)                   (gauge)

and from the site's own status file beside the ledger (fedsilo.clients.site_status):

  messages_total{outcome}         messages answered, refused, or that raised  (counter)
  train_seconds_total             seconds spent answering them                (counter)
  dp_step_seconds                 the last trained round's seconds per step   (gauge)
  bytes_received_total, bytes_sent_total   message bytes in and out           (counter)
  last_error_round                the round of the last refusal or error      (gauge)
  last_error_info{error}          its text (one series: the latest)           (gauge, 1)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedsilo.clients import site_status
from fedsilo.privacy import ledger
from fedsilo.privacy.audit import PASSING, SiteAudit, audit

PREFIX = "fedsilo_site_"
# A scrape shows an audit at most this old (a typical Prometheus scrape interval): a
# site's round adds one spend, and a scraper asking every second would otherwise take
# an audit's CPU from the site's training after each one.
AUDIT_EVERY_S = 15.0

_now = time.monotonic  # the collector's clock (tests move it)


class SiteCollector:
    """A prometheus-client collector over one site's ledger."""

    def __init__(self, ledger: str | Path, audit_every_s: float = AUDIT_EVERY_S) -> None:
        self.ledger = Path(ledger)
        self.audit_every_s = audit_every_s
        self._cache: tuple[tuple[int, int], SiteAudit] | None = None
        self._audited_at = -math.inf  # the clock's time of the last audit
        self.audited_unix: float | None = None  # ... and the wall clock's

    def current(self) -> SiteAudit | None:
        """The ledger's audit, recomputed when the file changed and the last audit is at
        least `audit_every_s` old; None without a ledger."""
        try:
            st = self.ledger.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        changed = self._cache is None or self._cache[0] != key
        if changed and (self._cache is None or _now() - self._audited_at >= self.audit_every_s):
            background_priority()
            self._audited_at, self.audited_unix = _now(), time.time()
            self._cache = (key, audit(self.ledger))
        assert self._cache is not None
        return self._cache[1]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        found = self.current()
        if found is None:
            return
        eps = GaugeMetricFamily(
            PREFIX + "epsilon",
            "Epsilon spent in total on this site's ledger, by accountant.",
            labels=["accountant"],
        )
        eps.add_metric(["budget"], found.epsilon)
        eps.add_metric(["rdp"], found.epsilon_rdp)
        yield eps
        if found.budget is not None and found.remaining is not None:
            yield GaugeMetricFamily(
                PREFIX + "budget_epsilon", "The site policy's max-epsilon.", value=found.budget
            )
            yield GaugeMetricFamily(
                PREFIX + "budget_left_epsilon",
                "The budget minus what the ledger spent.",
                value=found.remaining,
            )
        yield CounterMetricFamily(
            PREFIX + "rounds_trained", "Spends on the site's ledger.", value=found.events
        )
        yield CounterMetricFamily(
            PREFIX + "dp_steps", "DP-SGD steps on the site's ledger.", value=found.steps
        )
        yield GaugeMetricFamily(
            PREFIX + "ledger_ok",
            "1 while the ledger's audit passes (ok or exhausted), else 0.",
            value=1.0 if found.status in PASSING else 0.0,
        )
        yield GaugeMetricFamily(
            PREFIX + "audit_timestamp_seconds",
            "When the audit behind these figures ran (Unix time; at most one per "
            f"{self.audit_every_s:g} s).",
            value=self.audited_unix or 0.0,
        )
        yield from _status(site_status.read(self.ledger))


def _status(status: site_status.SiteStatus | None) -> Iterator[Any]:
    """The metrics of the site's status file (fedsilo.clients.site_status)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if status is None:
        return
    messages = CounterMetricFamily(
        PREFIX + "messages",
        "Messages from the server by how the site answered: answered, refused, error.",
        labels=["outcome"],
    )
    for outcome, n in sorted(status.messages.items()):
        messages.add_metric([outcome], n)
    yield messages
    yield CounterMetricFamily(
        PREFIX + "train_seconds", "Seconds spent answering.", value=status.train_seconds_total
    )
    if status.last_step_seconds is not None:
        yield GaugeMetricFamily(
            PREFIX + "dp_step_seconds",
            "The last trained round's seconds per DP-SGD step (its whole answer).",
            value=status.last_step_seconds,
        )
    yield CounterMetricFamily(
        PREFIX + "bytes_received", "Bytes of the messages received.",
        value=status.bytes_received_total,
    )  # fmt: skip
    yield CounterMetricFamily(
        PREFIX + "bytes_sent", "Bytes of the replies sent.", value=status.bytes_sent_total
    )
    if status.last_error is not None and status.last_error_round is not None:
        yield GaugeMetricFamily(
            PREFIX + "last_error_round",
            "The round of the site's last refusal or error.",
            value=status.last_error_round,
        )
        info = GaugeMetricFamily(
            PREFIX + "last_error_info",
            "The site's last refusal or error (its text as label; always 1).",
            labels=["error"],
        )
        info.add_metric([status.last_error[:300]], 1.0)
        yield info


def background_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux: nice 19 for this thread
    alone). An audit recomputes the site's epsilon from every spend (PRV: ~0.4 s of CPU
    per change); a scrape's or a log watcher's thread, which serves nothing else, must
    not take that from the site's training. The main thread, another platform, or a
    refusal: left as it was."""
    if sys.platform != "linux" or threading.current_thread() is threading.main_thread():
        return
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def watch_spends(
    path: Path, on_spend: Callable[[dict[str, Any]], None], stop: threading.Event
) -> None:
    """Call `on_spend` for each spend the ledger at `path` gains until `stop` is set (a
    site's `--log-format json` events): its run, round, mode and the total spent after it."""
    collector = SiteCollector(path, audit_every_s=0.0)  # each spend's own total
    seen = len(ledger.read(path).spends) if path.exists() else 0
    while not stop.wait(1.0):
        found = collector.current()
        if found is None or found.events <= seen:
            continue
        # The spends the audit counted, no more: the file may have grown since.
        for spend in ledger.read(path).spends[seen : found.events]:
            on_spend(
                {
                    "site": spend.site,
                    "run": spend.run,
                    "round": spend.round,
                    "mode": spend.mode,
                    "epsilon_total": found.epsilon,
                    "budget_left": found.remaining,
                }
            )
        seen = found.events
