"""The site launcher's watch over its SuperNode process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsilo.clients import launcher

# Stands in for a SuperNode that logged its end and then hung (Flower 1.39: a heartbeat
# thread that gave up makes the clean-up raise, and the process waits on its threads).
HUNG = """
import sys, time
with open(sys.argv[1], "a") as log:
    log.write("INFO: SuperNode ID: 42\\nINFO: SuperNode terminated gracefully.\\n")
time.sleep(600)
"""


def test_a_supernode_that_hangs_after_it_ended_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "EXIT_GRACE_S", 1.0)
    log = tmp_path / "supernode.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", HUNG, str(log)],
        start_new_session=True,  # stop() ends its group
    )
    events: list[str] = []
    t0 = time.monotonic()
    try:
        assert launcher.watch(proc, log, events.append) == 0  # reconnect, as after an exit 0
        assert time.monotonic() - t0 < 10
        assert proc.poll() is not None  # stopped, not left behind
        assert events == ["admitted by the server; waiting for rounds"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_supernode_that_ends_on_its_own_is_left_to_exit(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    script = HUNG.replace("time.sleep(600)", "time.sleep(1.5)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(log)], start_new_session=True)
    assert launcher.watch(proc, log, lambda _: None) == 0
    assert proc.returncode == 0  # its own exit, not a stop (which would be -15)


def test_the_supernode_is_told_where_the_sites_identity_is(tmp_path: Path) -> None:
    """Flower parses the node config the launcher writes back to the kit's three files."""
    import numpy as np
    from flwr.common.config import parse_config_args

    from fedsilo.privacy.provision import provision, read_site_kit

    provision(tmp_path / "fed", hosts=["localhost"], sites=["a"])
    kit = read_site_kit(tmp_path / "fed/sites/a")
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 64), np.float32), y=np.arange(3))
    opts = launcher.ClientOptions(server="localhost:9092", data=tmp_path / "a.npz")
    cmd = launcher.supernode_command(kit, opts, port=1234)
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert (parsed["site-key"], parsed["site-cert"], parsed["ca-cert"]) == (
        str(kit.key.resolve()),
        str(kit.cert.resolve()),
        str(kit.ca.resolve()),
    )
    kit.cert.unlink()  # a kit made before site certificates: no identity, local DP only
    cmd = launcher.supernode_command(kit, opts, port=1234)
    assert "site-cert" not in parse_config_args([cmd[cmd.index("--node-config") + 1]])


def test_each_clientapp_process_starts_with_the_manifests_clientapp_imported() -> None:
    """The launcher names the ClientApp's module to its warm SuperNode (the runtime, in a
    lower layer, names none), and the SuperNode passes it on to the SuperExec's zygote."""
    import tomllib

    from fedsilo.flwr_adapter import site_runtime
    from fedsilo.server.launcher import DEPLOYED_APPS, write_app_dir

    with tempfile.TemporaryDirectory() as tmp:  # the manifest the server sends its sites
        text = (write_app_dir(Path(tmp)) / "pyproject.toml").read_text("utf-8")
    components = tomllib.loads(text)["tool"]["flwr"]["app"]["components"]
    assert components == DEPLOYED_APPS
    assert "fab-include" not in text  # it lists files of `flwr run .`
    flags = list(launcher.WARM_SUPERNODE[4:])
    assert flags == ["--preload", components["clientapp"].partition(":")[0]]

    preload, flower_args = site_runtime.split_preload([*flags, "--superlink", "x:9092"])
    assert flower_args == ["--superlink", "x:9092"]
    cmd = site_runtime.superexec_command(preload, ["--appio-api-address", "y"])
    assert cmd[1:] == ["-m", site_runtime.SELF, "superexec", *flags, "--appio-api-address", "y"]
    assert site_runtime.split_preload(cmd[4:]) == (preload, ["--appio-api-address", "y"])


# Stands in for a SuperNode that lost its connection when the server stopped and waits
# for ever (Flower 1.39 after a CANCELLED RPC); with RECONNECT, one that retried and
# found the server again (then exits by itself).
SILENT = """
import sys, time
with open(sys.argv[1], "a") as log:
    log.write("INFO: SuperNode ID: 42\\n")
time.sleep(float(sys.argv[2]))
if len(sys.argv) > 3:
    with open(sys.argv[1], "a") as log:
        log.write("INFO: Connection successful after 3.10 seconds and 4 tries.\\n")
    time.sleep(3)
"""


def server_answers(*answers: bool) -> object:
    """A probe answering `answers` in turn, then True (the server is up)."""
    left = list(answers)
    return lambda: left.pop(0) if left else True


def watched(
    tmp_path: Path, args: list[str], probe: object
) -> tuple[int, float, list[str], int | None]:
    """watch() over SILENT: (its answer, seconds, events, the process's own code)."""
    log = tmp_path / "supernode.log"
    proc = subprocess.Popen([sys.executable, "-c", SILENT, str(log), *args], start_new_session=True)
    events: list[str] = []
    t0 = time.monotonic()
    try:
        code = launcher.watch(proc, log, events.append, probe=probe)  # type: ignore[arg-type]
        return code, time.monotonic() - t0, events, proc.poll()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "PROBE_EVERY_S", 0.2)
    monkeypatch.setattr(launcher, "EXIT_GRACE_S", 1.5)


@pytest.mark.usefixtures("quick")
def test_a_supernode_stuck_across_a_server_restart_is_restarted(tmp_path: Path) -> None:
    code, seconds, events, own = watched(tmp_path, ["600"], server_answers(False, False))
    assert code == 0 and seconds < 10  # reconnect
    assert own == -15  # stopped, not left behind
    assert "restarted but this site's SuperNode neither reconnected nor exited" in events[-1]


@pytest.mark.usefixtures("quick")
def test_a_supernode_that_reconnects_by_itself_is_left_alone(tmp_path: Path) -> None:
    code, _, events, own = watched(tmp_path, ["1", "then reconnect"], server_answers(False, False))
    assert code == 0 and own == 0  # its own exit 3 s after it reconnected: never stopped
    assert not any("restarting it" in e for e in events)


@pytest.mark.usefixtures("quick")
def test_one_missed_probe_is_not_a_restart(tmp_path: Path) -> None:
    code, _, events, own = watched(tmp_path, ["4"], server_answers(True, False, True))
    assert code == 0 and own == 0  # ran its 4 s and exited by itself
    assert not any("restarting it" in e for e in events)
