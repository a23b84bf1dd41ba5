"""fedsilo.server.dashboard: the view holds what the run directory holds, and the app
serves nothing else, to no one else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fedsilo.errors import ConfigError
from fedsilo.server.dashboard import Source, check_token, make_app, run_view
from fedsilo.server.records import (
    Failure,
    Progress,
    RoundRecord,
    SiteRoundReport,
    Summary,
)
from fedsilo.server.run_dir import RunDir

TOKEN = "s3cret-token-0123456789"


def report(eps: float) -> SiteRoundReport:
    return SiteRoundReport(examples=100, epsilon=eps, delta=1e-5, target_epsilon=4.0)


def a_run(path: Path) -> RunDir:
    run = RunDir(path)
    (path / "config.json").write_text(json.dumps({"rounds": 3, "dataset": "digits", "dp": "local"}))
    run.append_metrics(
        RoundRecord(
            round=1, accuracy=0.5, loss=1.2, max_epsilon=2.0,
            reports={"a": report(2.0), "b": report(1.5)}, sites=["a", "b"], failed=["c"],
            reasons={"c": "no reply in 60 s"}, seconds=1.5,
        )
    )  # fmt: skip
    run.append_metrics(
        RoundRecord(
            round=2, accuracy=0.7, loss=0.9, max_epsilon=3.0, reports={"a": report(3.0)},
            sites=["a"], refused=["b"], reasons={"b": "<b>over</b> its budget"}, seconds=4.0,
            flagged={"a": "scaled to norm 6"},
        )
    )  # fmt: skip
    run.write_progress(Progress(started=3))
    return run


def test_a_running_runs_view_holds_its_rounds_sites_and_events(tmp_path: Path) -> None:
    from fedsilo.server.run_dir import write_online

    a_run(tmp_path)
    write_online(tmp_path, 2)
    view = run_view(tmp_path)
    assert view["online"] == 2
    assert view["status"] == "running" and view["planned"] == 3 and view["started"] == 3
    assert [r["round"] for r in view["rounds"]] == [1, 2]
    assert [r["accuracy"] for r in view["rounds"]] == [0.5, 0.7]
    assert view["rounds"][0]["epsilon"] == {"a": 2.0, "b": 1.5}
    sites = {s["site"]: s for s in view["sites"]}
    assert sites["a"]["epsilon"] == 3.0 and sites["a"]["target_epsilon"] == 4.0
    assert (sites["a"]["accepted"], sites["a"]["flagged"]) == (2, 1)
    assert (sites["b"]["accepted"], sites["b"]["refused"]) == (1, 1)
    assert (sites["c"]["failed"], sites["c"]["epsilon"]) == (1, None)
    kinds = [(e["round"], e["site"], e["kind"]) for e in view["events"]]
    assert kinds == [(1, "c", "failed"), (2, "a", "flagged"), (2, "b", "refused")]
    assert view["config"] == {"dataset": "digits", "dp": "local"}


def test_a_stopped_runs_view_shows_why_and_the_failures_only_summary_holds(
    tmp_path: Path,
) -> None:
    run = a_run(tmp_path)
    summary = Summary(
        completed_rounds=2,
        planned_rounds=3,
        stopped="2 site(s) left after the masked-input stage, fewer than 3",
        failures=[Failure(site="d", round=3, reason="masked-input stage: lost")],
    )
    run.write_summary(summary)
    view = run_view(tmp_path)
    assert view["status"] == "stopped" and view["stopped"].startswith("2 site(s) left")
    assert view["events"][-1] == {
        "round": 3, "site": "d", "kind": "failed", "why": "error", "stage": "masked-input",
        "reason": "masked-input stage: lost",
    }  # fmt: skip


def test_the_app_serves_the_page_its_assets_and_the_view_with_an_etag(tmp_path: Path) -> None:
    run = a_run(tmp_path)
    client = TestClient(make_app(Source(run_dir=tmp_path)), base_url="http://127.0.0.1")
    page = client.get("/")
    assert page.status_code == 200 and "uPlot.iife.min.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/uPlot.iife.min.js").status_code == 200
    first = client.get("/api/view")
    assert first.json()["completed"] == 2
    etag = first.headers["etag"]
    assert client.get("/api/view", headers={"If-None-Match": etag}).status_code == 304
    run.append_metrics(RoundRecord(round=3, accuracy=0.8, loss=0.7, max_epsilon=3.5))
    again = client.get("/api/view", headers={"If-None-Match": etag})
    assert again.status_code == 200 and again.json()["completed"] == 3


@pytest.mark.parametrize(
    "path",
    [
        "/static/../config.json",
        "/static/%2e%2e/config.json",
        "/static/..%2fconfig.json",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/dashboard.html",  # the page is /, not an asset
        "/metrics.jsonl",
        "/config.json",
        "/api/../config.json",
    ],
)
def test_nothing_outside_the_routes_is_served(tmp_path: Path, path: str) -> None:
    a_run(tmp_path)
    client = TestClient(make_app(Source(run_dir=tmp_path)), base_url="http://127.0.0.1")
    res = client.get(path)
    assert res.status_code == 404, (path, res.status_code, res.text[:200])
    assert '"rounds"' not in res.text and "root:" not in res.text


def test_it_is_read_only(tmp_path: Path) -> None:
    a_run(tmp_path)
    client = TestClient(make_app(Source(run_dir=tmp_path)), base_url="http://127.0.0.1")
    for method in ("POST", "PUT", "DELETE"):
        assert client.request(method, "/api/view").status_code == 405


def test_a_token_is_needed_for_everything_once_set(tmp_path: Path) -> None:
    a_run(tmp_path)
    app = make_app(Source(run_dir=tmp_path), token=TOKEN)
    client = TestClient(app, base_url="http://127.0.0.1")
    for path in ("/", "/api/view", "/static/dashboard.js", "/healthz"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/view?token=wrong-token-0123456789").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/view", headers=auth).json()["completed"] == 2
    # Opening the printed address sets a same-site cookie the page's requests carry.
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert client.get("/api/view").status_code == 200  # the cookie, kept by the client


def test_a_foreign_host_header_is_refused_against_dns_rebinding(tmp_path: Path) -> None:
    a_run(tmp_path)
    app = make_app(Source(run_dir=tmp_path))
    evil = TestClient(app, base_url="http://attacker.example:8050")
    assert evil.get("/api/view").status_code == 400
    assert TestClient(app, base_url="http://localhost:8050").get("/api/view").status_code == 200


def test_bad_sources_and_tokens_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No run directory"):
        Source(run_dir=tmp_path / "nope").check()
    with pytest.raises(ConfigError, match="holds no run"):
        Source(run_dir=tmp_path).check()
    with pytest.raises(ConfigError, match="No ledger"):
        Source(ledger=tmp_path / "ledger.jsonl").check()
    with pytest.raises(ConfigError, match="one"):
        Source()
    with pytest.raises(ConfigError, match="16 characters"):
        check_token("short")


def test_a_damaged_metrics_file_is_shown_as_a_problem_not_a_crash(tmp_path: Path) -> None:
    a_run(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"schema": 99, "round": 3}) + "\n")
    client = TestClient(make_app(Source(run_dir=tmp_path)), base_url="http://127.0.0.1")
    view = client.get("/api/view").json()
    assert view["problem"] and "schema" in view["problem"].lower()


def test_the_command_refuses_bad_input_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from fedsilo.cli import main

    a_run(tmp_path / "run")
    cases = [
        ([], "give a RUN_DIR, or --ledger PATH"),
        ([str(tmp_path / "run"), "--ledger", "x.jsonl"], "shows one thing"),
        ([str(tmp_path / "nope")], "No run directory"),
        (["--ledger", str(tmp_path / "none.jsonl")], "No ledger"),
        ([str(tmp_path / "run"), "--port", "0"], "1..65535"),
        ([str(tmp_path / "run"), "--host", "0.0.0.0"], "every address"),
        ([str(tmp_path / "run"), "--token", "abc"], "16 characters"),
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        cases.append(([str(tmp_path / "run"), "--port", port], f"127.0.0.1:{port}"))
        for argv, message in cases:
            assert main(["dashboard", *argv]) != 0, argv
            err = " ".join(capsys.readouterr().err.split())
            assert message in err and "Traceback" not in err, (argv, err)


def test_json_prints_the_view_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsilo.cli import main

    a_run(tmp_path)
    assert main(["dashboard", str(tmp_path), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view == json.loads(json.dumps(run_view(tmp_path)))
