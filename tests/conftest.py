"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's user config (~/.flwr) never leaks between tests or into $HOME."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def pytest_report_header() -> str:
    return f"fashion-mnist present: {FASHION_DIR.is_dir()}; cpus: {os.cpu_count()}"
