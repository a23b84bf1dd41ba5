"""The site launcher's watch over its SuperNode process."""

from __future__ import annotations

import subprocess
import sys
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

    import fedsilo
    from fedsilo.flwr_adapter import site_runtime

    manifest = Path(fedsilo.__file__).parent / "pyproject.toml"
    components = tomllib.loads(manifest.read_text("utf-8"))["tool"]["flwr"]["app"]["components"]
    flags = list(launcher.WARM_SUPERNODE[4:])
    assert flags == ["--preload", components["clientapp"].partition(":")[0]]

    preload, flower_args = site_runtime.split_preload([*flags, "--superlink", "x:9092"])
    assert flower_args == ["--superlink", "x:9092"]
    cmd = site_runtime.superexec_command(preload, ["--appio-api-address", "y"])
    assert cmd[1:] == ["-m", site_runtime.SELF, "superexec", *flags, "--appio-api-address", "y"]
    assert site_runtime.split_preload(cmd[4:]) == (preload, ["--appio-api-address", "y"])
