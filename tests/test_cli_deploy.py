"""`fedsilo provision|server|client|data`: every user mistake is one `error:` line."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import numpy as np
import pytest

from fedsilo.cli import main
from fedsilo.errors import ConfigError
from fedsilo.privacy import pki
from fedsilo.privacy.provision import provision


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    provision(tmp_path / "fed", hosts=["localhost", "127.0.0.1"], sites=["a", "b", "c"])
    np.savez(tmp_path / "site.npz", x=np.zeros((20, 64), np.float32), y=np.arange(20) % 10)
    return tmp_path


def expire_server_cert(fed: Path) -> None:
    ca_key = pki.load_ca_key(fed / "fed/ca/ca.key")
    ca = pki.load_cert(fed / "fed/ca/ca.crt")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    _, cert = pki.server_cert(ca_key, ca, ["localhost", "127.0.0.1"], not_after=past)
    (fed / "fed/server/server.crt").write_bytes(pki.pem_cert(cert))


SERVER = ["server", "start", "--kit", "fed/server", "--listen", "127.0.0.1"]
CLIENT = ["client", "start", "--kit", "fed/sites/a", "--data", "site.npz"]
TASK = "breast_cancer.task:task"


def bad_inputs(fed: Path) -> None:
    """The files and kits the one-line error cases name."""
    import shutil

    (fed / "afile").write_text("")
    (fed / "empty.npz").write_bytes(b"")
    np.save(fed / "arr.npy", np.zeros((5, 64)))
    (fed / "arr.npy").rename(fed / "renamed.npz")
    np.savez(fed / "scalar.npz", x=np.float32(1.0), y=np.int64(1))
    np.savez(fed / "wide.npz", x=np.zeros((10, 30), np.float32), y=np.zeros(10, np.int64))
    (fed / "cancer.csv").write_text("mean_radius,diagnosis\n12.1,benign\n")
    (fed / "managed.toml").write_text('run-id = "an-old-run"\n')
    (fed / "noise.toml").write_text('dp = "distributed"\nnoise-multiplier = 0.5\n')
    shutil.copytree(fed / "fed/server", fed / "port70000")  # a kit an older fedsilo wrote
    toml = (fed / "port70000/server.toml").read_text()
    (fed / "port70000/server.toml").write_text(
        toml.replace("fleet-port = 9092", "fleet-port = 70000")
    )
    for name, edit in (
        ("keydir", None),
        ("infpolicy", "inf"),
        ("nanpolicy", "nan"),
    ):
        kit = fed / name
        shutil.copytree(fed / "fed/sites/a", kit)
        if edit is None:
            (kit / "site.key").unlink()
            (kit / "site.key").mkdir()
        else:
            toml = (
                (kit / "site.toml")
                .read_text()
                .replace("max-epsilon = 10.0", f"max-epsilon = {edit}")
            )
            (kit / "site.toml").write_text(toml)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["provision", "--server-host", "h", "--sites", "a"], "needs --out DIR"),
        (["provision", "--out", "new", "--sites", "a"], "needs --server-host HOST"),
        (["provision", "--out", "fed", "--server-host", "h", "--sites", "a"], "already holds"),
        (["provision", "--out", "new", "--server-host", "h", "--sites", "A B"], "Site name"),
        (["provision", "--out", "new", "--server-host", "h", "--sites", "a,a"], "given twice"),
        (["provision", "add-site", "--out", "fed", "a"], "already exists"),
        (["provision", "add-site", "--out", "nothing", "d"], "holds no federation"),
        (["provision", "--out", "new", "--federation", "missing.toml"], "does not exist"),
        ([*SERVER, "--kit", "nope"], "Is nope a kit written by `fedsilo provision`?"),
        ([*SERVER, "--min-sites", "4"], "authorises only 3 site(s)"),
        ([*SERVER, "--rounds", "0"], "`rounds` must be an integer >= 1"),
        ([*SERVER, "--eval-data", "missing.npz"], "site data file does not exist"),
        ([*SERVER, "--config", "run.toml"], "Unknown key `epsilon`"),
        ([*SERVER, "--min-sites", "3", "--wait-sites", "2"], "must be >= min-sites"),
        ([*SERVER, "EXPIRE"], "server certificate expired on"),
        ([*SERVER, "--out", "used"], "already holds a run (metrics.jsonl)"),
        ([*CLIENT, "--server", "nocolon"], "must be HOST:PORT"),
        ([*CLIENT, "--device", "tpu"], "`--device` must be one of"),
        ([*CLIENT, "--threads", "-1"], "`--threads` must be >= 0"),
        ([*CLIENT, "--data", "missing.npz", "--server", "127.0.0.1:9"], "does not exist"),
        (
            [*CLIENT, "--server", "127.0.0.1:9", "--connect-timeout", "0.5"],
            "Gave up after 0 s: the federation server 127.0.0.1:9 is not reachable",
        ),
        (["client", "start", "--kit", "fed/sites/zz", "--data", "site.npz"], "does not exist"),
        (["data", "split", "--sites", "0", "--out", "d"], "`--sites` must be >= 1"),
        (["data", "split", "--sites", "2", "--partition", "dirichlet:0", "--out", "d"], "alpha"),
        # Found by trying each as a user would (issue 10): each once gave a traceback.
        (["provision", "--out", "afile", "--server-host", "h", "--sites", "a"], "is a file"),
        (["provision", "--out", "n", "--server-host", "a..b", "--sites", "a"], "not a valid DNS"),
        ([*SERVER, "--fleet-port", "0"], "`--fleet-port` must be a port number in 1..65535"),
        ([*SERVER, "--fleet-port", "-1"], "Found -1"),
        ([*SERVER, "--fleet-port", "70000"], "Found 70000"),
        ([*SERVER, "--control-port", "0"], "`--control-port` must be a port number"),
        ([*SERVER, "SERVER_KEY_644"], "server's TLS private key is readable by others"),
        ([*CLIENT, "--server", "localhost:70000"], "must be a port number in 1..65535"),
        ([*CLIENT, "--kit", "keydir"], "the site's private key is a directory"),
        ([*CLIENT, "--kit", "infpolicy"], "[policy] `policy-max-epsilon` must be a finite number"),
        ([*CLIENT, "--kit", "nanpolicy"], "must be a finite number > 0"),
        ([*CLIENT, "--data", "empty.npz"], "not a readable .npz file"),
        ([*CLIENT, "--data", "renamed.npz"], "a single NumPy array (.npy)"),
        ([*CLIENT, "--data", "scalar.npz"], "`x` must be N x features"),
        ([*CLIENT, "--data", "wide.npz"], "examples of shape 30 fit no built-in task"),
        # Issue 12: a site's own task, and the file it reads, are checked before it connects.
        ([*CLIENT, "--task", "nope_pkg.task:task"], "no module named 'nope_pkg' is installed"),
        ([*CLIENT, "--task", TASK, "--data", "none.csv"], "none.csv: site data file does not"),
        ([*CLIENT, "--task", TASK, "--data", "cancer.csv"], "missing column(s) mean_texture"),
        ([*CLIENT, "--task", TASK, "--data", "wide.npz"], "cannot read it as UTF-8"),
        ([*SERVER, "--task", "nope_pkg.task:task"], "no module named 'nope_pkg' is installed"),
        ([*SERVER, "--task", TASK, "--dataset", "mnist"], "drop `dataset` and `model`"),
        ([*SERVER, "--task", TASK, "--eval-data", "site.npz"], "cannot read it as UTF-8"),
        # Issue 13: --resume continues a stopped run as it was recorded, nothing else.
        ([*SERVER, "--resume", "used"], "used holds no readable config.json"),
        ([*SERVER, "--resume", "used", "--config", "managed.toml"], "recorded; drop --config."),
        ([*SERVER, "--config", "managed.toml"], "`run-id` is fedsilo's to set"),
        # Distributed DP's one noise multiplier is planned here, for the largest sample rate.
        (
            [*SERVER, "--dp", "distributed"],
            "--dp distributed needs --dp-max-sample-rate: the largest Poisson sampling rate "
            "any site uses, batch-size / the smallest site's examples",
        ),
        ([*SERVER, "--config", "noise.toml"], "`noise-multiplier` is fedsilo's to set"),
        (
            [*SERVER, "--dp", "distributed", "--dp-max-sample-rate", "2"],
            "`dp-max-sample-rate` must be in (0, 1]",
        ),
        ([*SERVER, "--dp-max-sample-rate", "0.1"], "must be 0 with --dp local"),
        # Issue 26: each once gave a traceback, or was accepted and could never work.
        ([*SERVER, "--config", "."], ". is a directory; give the TOML file in it"),
        ([*SERVER, "--kit", "fed/server/server.toml"], "is a file; --kit takes the server kit"),
        ([*CLIENT, "--kit", "fed/sites/a/site.toml"], "is a file; --kit takes the site's kit"),
        ([*CLIENT, "--connect-timeout", "nan"], "`--connect-timeout` must be a finite number"),
        ([*CLIENT, "--connect-timeout", "-1"], "Found -1.0; e.g. 600"),
        ([*SERVER, "--wait-sites", "5"], "`--wait-sites` is 5 but the kit authorises only 3"),
        (
            [
                "provision",
                "--out",
                "new",
                "--server-host",
                "h",
                "--sites",
                "a",
                "--fleet-port",
                "70000",
            ],
            "`--fleet-port` must be a port number in 1..65535. Found 70000.",
        ),
        (["provision", "add-site", "--out", "fed", "d\n"], "Site name 'd\\n' must be"),
        (
            [*SERVER, "--kit", "port70000"],
            "port70000/server.toml: [server] fleet-port must be a port number in 1..65535",
        ),
    ],
)
def test_one_line_error(
    fed: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    (fed / "run.toml").write_text("epsilon = 3\n")
    (fed / "used").mkdir()
    (fed / "used" / "metrics.jsonl").write_text("")
    if "EXPIRE" in args:
        args = [a for a in args if a != "EXPIRE"]
        expire_server_cert(fed)
    if "SERVER_KEY_644" in args:
        args = [a for a in args if a != "SERVER_KEY_644"]
        (fed / "fed/server/server.key").chmod(0o644)
    bad_inputs(fed)
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # the last line
    assert needle in " ".join(err.split()), err
    assert not (fed / "runs").exists()  # nothing started
    assert not (fed / "new").exists() and sorted(p.name for p in (fed / "fed/sites").iterdir()) == [
        "a",
        "b",
        "c",
    ]  # nothing written


def test_data_split_writes_site_files(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "split", "--dataset", "digits", "--sites", "3", "--out", "d"]) == 0
    sizes = []
    ys = []
    for i in (1, 2, 3):
        with np.load(fed / f"d/site-{i}.npz") as f:
            assert f["x"].shape[1:] == (64,)
            sizes.append(len(f["y"]))
            ys.append(f["y"])
    assert sum(sizes) == 1438 and max(sizes) - min(sizes) <= 1  # digits train split, iid
    with np.load(fed / "d/server-eval.npz") as f:
        assert len(f["y"]) == 359  # the test split, for --eval-data
    # Refuses to overwrite, and says so.
    assert main(["data", "split", "--sites", "3", "--out", "d"]) != 0
    assert "already exist" in capsys.readouterr().err


def test_taken_port(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        code = main([*SERVER, "--fleet-port", port, "--out", "run"])
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "error: Port" in err and "Traceback" not in err
    assert f"Port {port} on 127.0.0.1 is taken" in err and "--fleet-port" in err
    assert not (fed / "run" / "superlink.log").exists()  # nothing was started


def test_the_server_console_says_who_failed_or_refused_and_why() -> None:
    from fedsilo.server.command import absent_lines
    from fedsilo.server.records import RoundRecord

    record = RoundRecord(
        round=2,
        accuracy=0.5,
        loss=1.0,
        max_epsilon=1.0,
        refused=["site-b"],
        failed=["site-c"],
        reasons={"site-b": "over budget", "site-c": "invalid reply: `w` holds NaN"},
    )
    assert absent_lines(record) == [
        "site-b refused: over budget",
        "site-c failed: invalid reply: `w` holds NaN",
    ]
    assert absent_lines(RoundRecord(1, 0.5, 1.0, 1.0, sites=["a"])) == []


def test_server_start_plans_distributed_dp_once_and_resume_keeps_it(fed: Path) -> None:
    """The run config the sites receive carries the run's one noise multiplier, calibrated
    for --dp-max-sample-rate; a resumed run keeps the one it recorded."""
    import json

    from fedsilo.cli import build_parser
    from fedsilo.privacy.accountant import calibrate_noise
    from fedsilo.server.command import config_from_args

    # Prepare
    start = [*SERVER, "--dp", "distributed", "--dp-max-sample-rate", "0.14", "--rounds", "4"]
    # Execute
    cfg = config_from_args(build_parser().parse_args([*start, "--out", "run"]), 3)
    # Assert
    sigma = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.14, steps=4)
    assert (cfg.dp_max_sample_rate, cfg.noise_multiplier) == (0.14, sigma)
    # A stopped run resumes with what it recorded (the ServerApp wrote config.json).
    recorded = cfg.to_flwr() | {"noise-multiplier": sigma * 1.5}
    (fed / "run").mkdir()
    (fed / "run" / "config.json").write_text(json.dumps(recorded))
    resumed = config_from_args(build_parser().parse_args([*SERVER, "--resume", "run"]), 3)
    assert resumed.noise_multiplier == sigma * 1.5 and resumed.run_id == cfg.run_id
    with_flag = build_parser().parse_args([*SERVER, "--resume", "run", "--dp-max-sample-rate", "1"])
    with pytest.raises(ConfigError, match=r"--dp-max-sample-rate 1.0 \(recorded: 0.14\)"):
        config_from_args(with_flag, 3)
