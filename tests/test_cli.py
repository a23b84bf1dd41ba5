"""The CLI: bad input exits non-zero with one line and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def fedsilo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsilo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--target-epsilon", "-1"], "`target-epsilon` must be a finite number > 0"),
        (["--dataset", "cifar10"], "`dataset` must be one of"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "does not exist"),
        (["--partition", "dirichlet:0"], "alpha must be a number > 0"),
        (["--partition", "dirichlet:-2"], "alpha must be a number > 0"),
        (["--sites", "500"], "Use fewer sites"),
        (["--rounds", "0"], "`rounds` must be an integer >= 1"),
        (["--sites", "0"], "`--sites` must be >= 1"),
        (["--device", "tpu"], "`device` must be one of"),
    ],
)
def test_bad_config_one_line_no_traceback(tmp_path: Path, args: list[str], needle: str) -> None:
    res = fedsilo("simulate", "--out", str(tmp_path / "run"), *args, cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in res.stderr.replace("\n", " ")
    assert res.stdout == ""
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_help_teaches(tmp_path: Path) -> None:
    res = fedsilo("simulate", "--help", cwd=tmp_path)
    assert res.returncode == 0
    for flag in ("--sites", "--partition", "--target-epsilon", "--json", "dirichlet:ALPHA"):
        assert flag in res.stdout
