"""`fedsilo dashboard` in a real browser: headless Chromium (Debian `chromium` and
`chromium-driver`, which .ci/run installs) driven by Selenium opens the dashboard of a
real 3-site simulation, and a site's ledger page.

Set FEDSILO_DASHBOARD_SCREENSHOT=PATH to keep the finished run's picture (docs/).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.federation import Proc, end_leftovers, free_port, leftovers, wait_for

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (`bash .ci/run` installs them)",
)


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[Any]:
    """Headless Chromium with its profile under `tmp` (so `leftovers` finds it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-crash-reporter",
        "--window-size=1400,1500",
        f"--user-data-dir={tmp / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def dashboard(tmp: Path, name: str, *args: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(tmp, name, "dashboard", *args, "--port", str(port))
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as res:
                return bool(res.status == 200)
        except OSError:
            return False

    wait_for(up, 60, f"the dashboard on port {port}", [proc])
    return proc, url


def until(driver: Any, cond: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"the page never showed {what}: {driver.page_source[:3000]}")


@needs_browser
def test_the_dashboard_of_a_3_site_run_in_chromium(tmp_path: Path) -> None:
    from fedsilo.cli import main

    run = tmp_path / "run"
    argv = ["simulate", "--sites", "3", "--rounds", "2", "--local-epochs", "1", "--out", str(run)]
    assert main([*argv, "--json"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    procs: list[Proc] = []
    try:
        with chromium(tmp_path) as browser:
            check_pages(tmp_path, run, records, browser, procs)
    finally:
        for proc in procs:
            assert proc.terminate(timeout=20) == 0, proc.text()[-2000:]
        left = leftovers(tmp_path, grace_s=10)
        end_leftovers(tmp_path)
    assert not left, f"processes left behind: {left}"


def check_pages(
    tmp_path: Path, run: Path, records: list[Any], browser: Any, procs: list[Proc]
) -> None:
    """The run's page, a round appended to it, then a site's ledger page."""
    proc, url = dashboard(tmp_path, "dashboard-run", str(run))
    procs.append(proc)
    browser.get(url)
    js = browser.execute_script
    until(browser, lambda: js("return window.fedsilo && window.fedsilo.renders"), "a view")

    # One point per round, the values of metrics.jsonl.
    data = js("return window.fedsilo.charts.accuracy.plot.data")
    assert data[0] == [r["round"] for r in records] == [1, 2]
    assert data[1] == [r["accuracy"] for r in records]
    assert data[2] == [r["loss"] for r in records]
    eps = js("return window.fedsilo.charts.epsilon.plot.data")
    sites = sorted(records[-1]["reports"])
    assert len(sites) == 3 and len(eps) == 1 + 3
    for i, site in enumerate(sites, start=1):
        assert eps[i] == [r["reports"][site]["epsilon"] for r in records]
    text = browser.find_element("id", "card-accuracy").text
    assert text == f"{records[-1]['accuracy']:.4f}"
    assert browser.find_element("id", "status").text == "finished"
    rows = browser.find_elements("css selector", "#sites tbody tr")
    assert [r.get_attribute("data-site") for r in rows] == sites
    target = records[-1]["reports"][sites[0]]["target_epsilon"]
    assert rows[0].find_element("css selector", ".epsilon").text.endswith(f"{target:.2f}")
    if shot := os.environ.get("FEDSILO_DASHBOARD_SCREENSHOT"):
        browser.save_screenshot(shot)

    # A round appended to metrics.jsonl shows without a reload.
    renders = js("return window.fedsilo.renders")
    extra = {**records[-1], "round": 3, "accuracy": 0.1234, "loss": 2.5}
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(extra) + "\n")
    until(
        browser,
        lambda: js("return window.fedsilo.charts.accuracy.plot.data[0].length") == 3,
        "the appended round",
    )
    assert js("return window.fedsilo.renders") > renders
    assert js("return window.fedsilo.charts.accuracy.plot.data[1][2]") == 0.1234
    assert browser.find_element("id", "card-accuracy").text == "0.1234"

    # A site operator's own ledger: every spend, the audit, the budget left.
    from fedsilo.privacy.audit import audit

    ledger_path = run / "ledgers" / f"{sites[0]}.jsonl"
    found = audit(ledger_path)
    proc, url = dashboard(tmp_path, "dashboard-ledger", "--ledger", str(ledger_path))
    procs.append(proc)
    browser.get(url)
    until(browser, lambda: js("return window.fedsilo && window.fedsilo.renders"), "a view")
    assert browser.find_element("id", "status").text == f"audit: {found.status}"
    assert browser.find_element("id", "card-spent").text == f"{found.epsilon:.3f}"
    spends = browser.find_elements("css selector", "#spends tbody tr")
    assert len(spends) == found.events == 2
    curve = js("return window.fedsilo.charts.ledger.plot.data")
    assert len(curve[1]) == 2 and abs(curve[1][-1] - found.epsilon) < 1e-9
    if found.budget is not None:
        assert curve[2] == [found.budget] * 2
