"""What `fedsilo simulate` and `fedsilo server start` print about a run (rich markup).

Both show a run the same way: at the start, how its noise is added and, on --resume,
what it continues from; at the end, the table of central evaluation per round, then one
line per site that refused or failed (with its reason), the rounds lost when the server
stopped, and why the run stopped early. `quiet_logs` keeps Flower's INFO logs off the
console unless --verbose.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from rich.table import Table

from fedsilo.config import RunConfig
from fedsilo.server.records import RoundRecord, Summary
from fedsilo.server.run_dir import read_metrics, read_progress, resume_progress


def refusal_lines(summary: Summary) -> list[str]:
    """One line per site and reason: which rounds the site refused, and why."""
    refused: dict[tuple[str, str], list[int]] = {}
    for r in summary.refusals:
        refused.setdefault((r.site, r.reason), []).append(r.round)
    return [
        f"[yellow]{site} refused round(s) {', '.join(map(str, rounds))}[/]: {reason}"
        for (site, reason), rounds in refused.items()
    ]


def summary_table(summary: Summary) -> Table:
    table = Table(title="fedsilo: central evaluation per round")
    for col in ("round", "accuracy", "loss", "max site epsilon"):
        table.add_column(col, justify="right")
    for r in summary.rounds:
        table.add_row(str(r.round), f"{r.accuracy:.4f}", f"{r.loss:.4f}", f"{r.max_epsilon:.3f}")
    return table


def end_of_run_lines(summary: Summary) -> list[str]:
    """Refusals, failures and an early stop of a finished run, one line each."""
    lines = refusal_lines(summary)
    failed: dict[tuple[str, str], list[int]] = {}
    for f in summary.failures:
        failed.setdefault((f.site, f.reason), []).append(f.round)
    lines += [
        f"[red]{site} failed round(s) {', '.join(map(str, rounds))}[/]: {reason}"
        for (site, reason), rounds in failed.items()
    ]
    flagged: dict[str, list[int]] = {}
    last: dict[str, str] = {}
    for flag in summary.flagged:
        flagged.setdefault(flag.site, []).append(flag.round)
        last[flag.site] = flag.reason
    hostile = summary.hostile or {}
    lines += [
        f"[yellow]{site}{' (hostile: ' + hostile[site] + ')' if site in hostile else ''} "
        f"flagged in round(s) {', '.join(map(str, rounds))}[/]: {last[site]}"
        for site, rounds in flagged.items()
    ]
    if summary.hostile:
        lines.append(
            f"[yellow]simulated hostile sites[/]: {', '.join(sorted(summary.hostile))} "
            f"({', '.join(sorted(set(summary.hostile.values())))}); the run's accuracy is "
            "under their attack"
        )
    if summary.lost_rounds:
        lost = ", ".join(map(str, summary.lost_rounds))
        lines.append(
            f"[yellow]round(s) {lost} were lost when the server stopped[/]: the sites spent them "
            f"and the run resumed after round(s) {', '.join(map(str, summary.resumed_after))}"
        )
    if summary.asked_again:
        again = ", ".join(map(str, summary.asked_again))
        lines.append(
            f"round(s) {again} were in flight when the server stopped and were asked for "
            "again on resume: the sites that had trained them resent their replies, at no "
            "new spend"
        )
    if summary.stopped:
        lines.append(f"[bold red]the run stopped early[/]: {summary.stopped}")
    return lines


def resume_line(run_id: str, run_dir: str, rounds: int, *, ask_again: bool) -> str:
    """What a resumed run continues from, as the console says it."""
    done = [r.round for r in read_metrics(run_dir)]
    completed = done[-1] if done else 0
    plan = resume_progress(read_progress(run_dir), completed, ask_again=ask_again)
    again = plan.asking_again
    return (
        f"resuming run {run_id} after round {completed} of {rounds}"
        + (
            f"; round {', '.join(map(str, again))} was in flight and is asked for again "
            "(a site that trained it resends its reply, at no new spend)"
            if again
            else ""
        )
        + (
            f"; round(s) {', '.join(map(str, plan.lost))} lost (the sites spent them)"
            if plan.lost
            else ""
        )
    )


def quiet_logs(verbose: bool) -> None:
    """Flower logs at INFO through its own handler; without --verbose keep warnings only."""
    # lazy: `fedsilo --help` imports this module, and flwr takes 0.1 s of it
    import flwr.supercore.logger  # noqa: F401  (sets the flwr logger up; we adjust it after)

    level = logging.INFO if verbose else logging.WARNING
    for name in ("flwr", "ray", "fedsilo"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("flwr").propagate = False  # Opacus adds a root handler at import


def dp_note(cfg: RunConfig) -> str:
    """How a run's noise is added, for the start lines ("" for local DP, the default)."""
    if not cfg.distributed:
        return ""
    return f", distributed DP (secure aggregation, noise shares for {cfg.dp_min_sites} sites)"


# ---------------------------------------------------------------- --log-format json


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """`--log-format text|json`: how a long-running command reports on stderr."""
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (default) for people; json: one event object per line on stderr "
        "(time, event, and its fields) for a log shipper",
    )


def emit(event: str, fields: Mapping[str, Any] | None = None, stream: TextIO | None = None) -> None:
    """Write one JSON event line: {"time": ISO 8601 UTC, "event": event, **fields}."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    out = stream or sys.stderr
    out.write(json.dumps({"time": stamp, "event": event, **(fields or {})}) + "\n")
    out.flush()


def round_events(record: RoundRecord) -> list[tuple[str, dict[str, Any]]]:
    """A completed round as events: the round, then each site's reply, refusal, failure
    and what a robust rule did to it, each with the round and the site's reason."""
    r = record.round
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "round",
            {
                "round": r,
                "accuracy": record.accuracy,
                "loss": record.loss,
                "max_epsilon": record.max_epsilon,
                "seconds": record.seconds,
                "sites": list(record.sites),
            },
        )
    ]
    for site in record.sites:
        report = record.reports.get(site)
        epsilon = report.epsilon if report is not None else None
        events.append(("reply", {"round": r, "site": site, "epsilon": epsilon}))
    for kind, sites in (("refusal", record.refused), ("failure", record.failed)):
        for site in sites:
            why = record.reasons.get(site, "")
            events.append((kind, {"round": r, "site": site, "reason": why}))
    for site, reason in record.flagged.items():
        events.append(("flagged", {"round": r, "site": site, "reason": reason}))
    return events


def stopped_round_events(summary: Summary) -> list[tuple[str, dict[str, Any]]]:
    """The failures and refusals of rounds that never completed (a stopped run's last),
    which no round record holds."""
    done = {r.round for r in summary.rounds}
    return [
        (kind, {"round": e.round, "site": e.site, "reason": e.reason})
        for kind, found in (("refusal", summary.refusals), ("failure", summary.failures))
        for e in found
        if e.round not in done
    ]


def end_event(summary: Summary) -> dict[str, Any]:
    """How the run ended, for the last event line."""
    return {
        "completed_rounds": summary.completed_rounds,
        "planned_rounds": summary.planned_rounds,
        "accuracy": summary.final.accuracy,
        "stopped": summary.stopped,
        "lost_rounds": list(summary.lost_rounds),
        "run_dir": summary.run_dir,
    }
