"""fedsilo.server.prometheus: a scrape shows what the run directory holds, nothing more."""

from __future__ import annotations

import json
from pathlib import Path

from fedsilo.server.prometheus import RunCollector
from fedsilo.server.records import (
    Failure,
    Progress,
    Refusal,
    RoundRecord,
    SiteRoundReport,
    Summary,
)
from fedsilo.server.run_dir import RunDir, write_online
from tests.metrics import scrape


def report(eps: float) -> SiteRoundReport:
    return SiteRoundReport(examples=100, epsilon=eps, delta=1e-5, target_epsilon=8.0)


def test_a_scrape_reads_the_rounds_replies_and_progress(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"rounds": 5}))
    r1 = RoundRecord(
        round=1, accuracy=0.5, loss=1.2, max_epsilon=2.0,
        reports={"a": report(2.0), "b": report(1.5)}, sites=["a", "b"], failed=["c"],
        reasons={"c": "no reply before the round timeout"}, seconds=1.5,
    )  # fmt: skip
    r2 = RoundRecord(
        round=2, accuracy=0.7, loss=0.9, max_epsilon=3.0, reports={"a": report(3.0)},
        sites=["a"], refused=["b"], reasons={"b": "over its budget"}, seconds=40.0,
        flagged={"a": "scaled"},
    )  # fmt: skip
    run.append_metrics(r1)
    run.append_metrics(r2)
    run.write_progress(Progress(started=3, lost=[]))
    write_online(tmp_path, 2)
    got = scrape(RunCollector(tmp_path))
    assert got["fedsilo_server_round", ()] == 2
    assert got["fedsilo_server_rounds_planned", ()] == 5
    assert got["fedsilo_server_round_started", ()] == 3
    assert got["fedsilo_server_accuracy", ()] == 0.7
    assert got["fedsilo_server_loss", ()] == 0.9
    assert got["fedsilo_server_max_site_epsilon", ()] == 3.0
    assert got["fedsilo_server_site_epsilon", (("site", "a"),)] == 3.0  # its latest report
    assert got["fedsilo_server_site_epsilon", (("site", "b"),)] == 1.5
    replies = {k[1]: v for k, v in got.items() if k[0] == "fedsilo_server_replies_total"}
    assert replies == {
        (("outcome", "accepted"), ("site", "a")): 2,
        (("outcome", "accepted"), ("site", "b")): 1,
        (("outcome", "failed"), ("site", "c")): 1,
        (("outcome", "refused"), ("site", "b")): 1,
        (("outcome", "flagged"), ("site", "a")): 1,
    }
    assert got["fedsilo_server_round_seconds_count", ()] == 2
    problems = {k[1]: v for k, v in got.items() if k[0] == "fedsilo_server_reply_problems_total"}
    assert problems == {
        (("outcome", "failed"), ("reason", "timeout"), ("stage", "")): 1,
        (("outcome", "refused"), ("reason", "budget"), ("stage", "")): 1,
    }
    assert got["fedsilo_server_round_seconds_sum", ()] == 41.5
    assert got["fedsilo_server_round_seconds_bucket", (("le", "2.0"),)] == 1
    assert got["fedsilo_server_round_seconds_bucket", (("le", "60.0"),)] == 2
    assert got["fedsilo_server_sites_online", ()] == 2
    assert got["fedsilo_server_finished", ()] == 0
    # A stopped round is in summary.json only: its failures and refusals count too.
    run.write_summary(
        Summary(
            failures=[Failure("c", 1, "no reply"), Failure("a", 3, "crashed")],
            refusals=[Refusal("b", 2, "over its budget"), Refusal("c", 3, "budget")],
        )
    )
    got = scrape(RunCollector(tmp_path))
    assert got["fedsilo_server_replies_total", (("outcome", "failed"), ("site", "a"))] == 1
    assert got["fedsilo_server_replies_total", (("outcome", "failed"), ("site", "c"))] == 1
    assert got["fedsilo_server_replies_total", (("outcome", "refused"), ("site", "c"))] == 1
    assert got["fedsilo_server_finished", ()] == 1
    assert ("fedsilo_server_sites_online", ()) not in got  # no live count given


def test_an_empty_or_damaged_run_directory_scrapes_without_error(tmp_path: Path) -> None:
    got = scrape(RunCollector(tmp_path))
    assert got["fedsilo_server_round", ()] == 0
    assert ("fedsilo_server_accuracy", ()) not in got
    (tmp_path / "metrics.jsonl").write_text('{"schema": 99, "round": 1}\n')
    assert scrape(RunCollector(tmp_path))["fedsilo_server_round", ()] == 0


def test_sites_online_is_what_the_launcher_last_recorded_until_the_run_ends(
    tmp_path: Path,
) -> None:
    run = RunDir(tmp_path)
    assert ("fedsilo_server_sites_online", ()) not in scrape(RunCollector(tmp_path))
    write_online(tmp_path, 3)
    assert scrape(RunCollector(tmp_path))["fedsilo_server_sites_online", ()] == 3
    run.write_summary(Summary(completed_rounds=1))
    assert ("fedsilo_server_sites_online", ()) not in scrape(RunCollector(tmp_path))
