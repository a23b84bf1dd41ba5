"""What the command line shows people: tables, reasons and quiet logs (rich). No Flower logic.

`fedsilo simulate` and `fedsilo server start` end a run the same way: the table of
central evaluation per round, then one line per site that refused or failed, with its
reason, then why the run stopped early, if it did.
"""

from __future__ import annotations

import logging
from typing import Any

from rich.table import Table

from fedsilo.config import RunConfig


def refusal_lines(summary: dict[str, Any]) -> list[str]:
    """One line per site and reason: which rounds the site refused, and why."""
    refused: dict[tuple[str, str], list[int]] = {}
    for r in summary.get("refusals", []):
        refused.setdefault((r["site"], r["reason"]), []).append(r["round"])
    return [
        f"[yellow]{site} refused round(s) {', '.join(map(str, rounds))}[/]: {reason}"
        for (site, reason), rounds in refused.items()
    ]


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="fedsilo: central evaluation per round")
    for col in ("round", "accuracy", "loss", "max site epsilon"):
        table.add_column(col, justify="right")
    for r in summary["rounds"]:
        table.add_row(
            str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", f"{r['max_epsilon']:.3f}"
        )
    return table


def end_of_run_lines(summary: dict[str, Any]) -> list[str]:
    """Refusals, failures and an early stop of a finished run, one line each."""
    lines = refusal_lines(summary)
    failed: dict[tuple[str, str], list[int]] = {}
    for f in summary.get("failures", []):
        failed.setdefault((f["site"], f["reason"]), []).append(f["round"])
    lines += [
        f"[red]{site} failed round(s) {', '.join(map(str, rounds))}[/]: {reason}"
        for (site, reason), rounds in failed.items()
    ]
    if summary.get("lost_rounds"):
        lost = ", ".join(map(str, summary["lost_rounds"]))
        lines.append(
            f"[yellow]round(s) {lost} were lost when the server stopped[/]: the sites spent them "
            f"and the run resumed after round(s) {', '.join(map(str, summary['resumed_after']))}"
        )
    if summary.get("stopped"):
        lines.append(f"[bold red]the run stopped early[/]: {summary['stopped']}")
    return lines


def resume_line(run_id: str, run_dir: str, rounds: int) -> str:
    """What a resumed run continues from, as the console says it."""
    from fedsilo.server.run_dir import read_metrics, read_progress

    done = [r["round"] for r in read_metrics(run_dir)]
    sent = read_progress(run_dir).started
    lost = [r for r in range(1, sent + 1) if r not in done]
    return f"resuming run {run_id} after round {done[-1] if done else 0} of {rounds}" + (
        f"; round(s) {', '.join(map(str, lost))} lost (the sites spent them)" if lost else ""
    )


def quiet_logs(verbose: bool) -> None:
    """Flower logs at INFO through its own handler; without --verbose keep warnings only."""
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
