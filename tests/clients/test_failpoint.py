"""fedsilo.clients.failpoint: a site stops where its environment says, nowhere else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsilo.clients import failpoint


def test_unset_or_elsewhere_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(failpoint.ENV, raising=False)
    failpoint.reach("unmask", 1)
    marker = tmp_path / "stopped"
    monkeypatch.setenv(failpoint.ENV, f"unmask:2:{marker}")
    failpoint.reach("unmask", 1)  # another round
    failpoint.reach("consistency", 2)  # another point
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["unmask", "unmask:x:/tmp/m", "unmask:2:", "fit:1:/tmp/m"])
def test_a_malformed_failpoint_names_the_expected_form(
    monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    monkeypatch.setenv(failpoint.ENV, spec)
    with pytest.raises(ValueError, match="expected POINT:ROUND:FILE"):
        failpoint.reach("unmask", 2)


def test_the_point_writes_its_marker_and_stops_until_killed(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    code = "from fedsilo.clients import failpoint; failpoint.reach('unmask', 2); print('went on')"
    env = {**os.environ, failpoint.ENV: f"unmask:2:{marker}"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.read_text().strip() == str(proc.pid)
        time.sleep(0.3)
        assert proc.poll() is None  # still stopped there
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    assert out == b""


def test_a_failpoint_stops_a_site_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its marker written, the point is passed: the round asked again after a resume."""
    marker = tmp_path / "stopped"
    marker.write_text("123\n")
    monkeypatch.setenv(failpoint.ENV, f"train:1:{marker}")
    failpoint.reach("train", 1)  # returns
    assert marker.read_text() == "123\n"
