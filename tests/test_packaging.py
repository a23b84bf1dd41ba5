"""The wheel installs one import package, `fedsilo`, that is also the Flower app."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_only_the_fedsilo_package(tmp_path: Path) -> None:
    # Build from a copy of the tracked files: the build writes build/ next to its sources.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    for name in tracked.stdout.split():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(tmp_path), str(src)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("fedsilo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"fedsilo"}
    for module in (
        "fedsilo/pyproject.toml",
        "fedsilo/cli.py",
        "fedsilo/server/server_app.py",
        "fedsilo/clients/client_app.py",
        "fedsilo/privacy/accountant.py",
        "fedsilo/simulations/runner.py",
        "fedsilo/task/train.py",
    ):
        assert module in names
    assert not any(n.startswith(("fedsilo/tests/", "fedsilo/bench/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedsilo = fedsilo.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
