"""Deployed round time against simulated round time, measured in one run.

Run: `python -m bench.deploy_latency [--rounds 5] [--sites 2] [--stock] [--dp-compare]`.

Deployed: the README's one-machine recipe, for real: `fedsilo provision`,
`fedsilo server start` and one `fedsilo client start --threads 1` per site, over TLS
with SuperNode authentication on loopback, digits split with `fedsilo data split`.
Simulated: `fedsilo simulate` with the same sites, rounds and data sizes. A round's
time is what the ServerApp records in metrics.jsonl (`seconds`: from sending the
global model to the evaluated aggregate), the same code in both modes. Round 1 also
calibrates noise and builds the evaluator; the table shows it apart, and the median
of the later rounds.

`--stock` runs the sites on Flower's own `flower-supernode` (3 s idle pulls, a cold
`flwr-clientapp` process per message) for comparison.

`--wan` (root) also runs the deployed federation across a wide-area path: server and
sites each in a network namespace of their own, 100 Mbit/s links and 25 ms each way
between every site and the server (tests/e2e/wan.py: `tc tbf` and a delaying relay).

`--dp-compare` also runs a deployed distributed-DP federation (`server start --dp
distributed --dp-min-sites SITES --dp-max-sample-rate Q`, Q = batch-size / the smallest
site's examples, every site's policy allowing it) after the local-DP one, on the same
site data, and compares their later-round medians (issue 22's goal: at most 2x). A
distributed round is one DP-SGD step on each site's Poisson batch inside five
secure-aggregation exchanges; a local round is local-epochs of DP-SGD: the table says
which settings each ran. The ServerApp records each secure round's stage times in
metrics.jsonl (`stage_seconds`);
their later-round medians are printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import dp_modes
from bench.common import codec_flags, machine, markdown, write_json

REPO = Path(__file__).resolve().parent.parent


def fedsilo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsilo", *args], cwd=cwd, capture_output=True, text=True
    )


def round_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines if line.strip()]


def simulated(tmp: Path, sites: int, rounds: int) -> list[float]:
    res = fedsilo(
        *("simulate", "--sites", str(sites), "--rounds", str(rounds), "--out", "sim"), cwd=tmp
    )
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return round_seconds(tmp / "sim")


def split_data(tmp: Path, sites: int) -> Path:
    """`fedsilo data split` of digits into tmp/data: site-1.npz ... and server-eval.npz."""
    res = fedsilo(
        "data", "split", "--dataset", "digits", "--sites", str(sites), "--out", "data", cwd=tmp
    )
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return tmp / "data"


def deployed(
    tmp: Path,
    sites: int,
    rounds: int,
    *,
    stock: bool,
    net: Any = None,
    data: Path | None = None,
    distributed: float | None = None,
    metrics_ports: list[int] | None = None,
    task: str | None = None,
    codec: str = "float32",
) -> list[float]:
    """Round times of a deployed run on loopback, or across `net` (a tests.e2e.wan.Wan).

    `data`: site data split beforehand (default: split here). `distributed`: run
    distributed DP at this --dp-max-sample-rate, every site a noise-share holder.
    `metrics_ports`: serve Prometheus metrics, the server on the first port and each
    site on the next (bench.metrics_cost scrapes them). `task`: `--task` of the server
    and every site (default: digits); `codec`: the server's `--update-codec`, or
    UPDATE:MODEL with its `--model-codec` (bench.common.codec_flags).
    """
    ports = metrics_ports or []
    server_metrics = ["--metrics-port", str(ports[0])] if ports else []
    task_args = ["--task", task] if task else []
    from fedsilo.processes import child_env, free_port, spawn, stop

    names = [f"s{i + 1}" for i in range(sites)]
    hosts = net.relay_ips if net is not None else ["127.0.0.1"]
    server_hosts = [a for h in hosts for a in ("--server-host", h)]
    data = (data or split_data(tmp, sites)).resolve()
    res = fedsilo("provision", "--out", "fed", *server_hosts, "--sites", ",".join(names), cwd=tmp)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    dp: list[str] = []
    if distributed is not None:  # each site's operator allows it in site.toml
        for name in names:
            toml = tmp / "fed" / "sites" / name / "site.toml"
            text = toml.read_text()
            if "distributed-min-sites = 0" not in text:
                raise SystemExit(f"{toml}: no `distributed-min-sites = 0` to raise to {sites}")
            toml.write_text(
                text.replace("distributed-min-sites = 0", f"distributed-min-sites = {sites}")
            )
        dp = ["--dp", "distributed", "--dp-min-sites", str(sites)]
        dp += ["--dp-max-sample-rate", repr(distributed)]
    fleet = free_port()
    env = child_env(FLWR_HOME=str(tmp / "flwr-home"), PYTHONPATH=str(REPO))
    addresses = [f"127.0.0.1:{fleet}"] * sites
    if net is not None:
        relay = free_port()
        net.start_relay(relay, fleet, tmp / "relay.log")
        addresses = [f"{h}:{relay}" for h in net.relay_ips]
    server = spawn(
        [
            *(net.exec_prefix(net.server_ns) if net is not None else []),
            sys.executable,
            "-m",
            "fedsilo",
            "server",
            "start",
            "--kit",
            "fed/server",
            "--listen",
            net.server_ip if net is not None else "127.0.0.1",
            "--fleet-port",
            str(fleet),
            "--control-port",
            str(free_port()),
            "--rounds",
            str(rounds),
            "--eval-data",
            str(data / "server-eval.npz"),
            *dp,
            *server_metrics,
            *task_args,
            *codec_flags(codec),
            "--out",
            "dep",
        ],
        log_file=tmp / "server.log",
        env=env,
        cwd=tmp,
    )
    site_procs = []
    try:
        for i, name in enumerate(names):
            site_env = child_env(FLWR_HOME=str(tmp / f"flwr-home-{name}"), PYTHONPATH=str(REPO))
            site_procs.append(
                spawn(
                    (net.exec_prefix(net.site_ns[i]) if net is not None else [])
                    + [sys.executable, "-m", "bench.deploy_latency", "--site", name]
                    + ["--data", str(data / f"site-{i + 1}.npz"), "--server", addresses[i]]
                    + (["--stock"] if stock else [])
                    + task_args
                    + (["--site-metrics-port", str(ports[i + 1])] if ports else []),
                    log_file=tmp / f"site-{name}.log",
                    env=site_env,
                    cwd=tmp,
                )
            )
        deadline = time.monotonic() + 600
        while not (tmp / "dep" / "summary.json").exists():
            dead = [p for p in (server, *site_procs) if p.poll() is not None]
            if time.monotonic() > deadline or dead:
                logs = [tmp / "server.log", *(tmp / f"site-{n}.log" for n in names)]
                logs += [f for f in (tmp / "dep" / "run.log",) if f.exists()]
                raise SystemExit("\n".join(f.read_text()[-1500:] for f in logs))
            time.sleep(0.5)
    finally:
        for proc in site_procs:
            stop(proc)
        stop(server)
    return round_seconds(tmp / "dep")


def run_site(
    name: str, data: str, server: str, *, stock: bool, metrics: int | None, task: str | None
) -> None:
    """One site, as `fedsilo client start` runs it (optionally on Flower's own SuperNode)."""
    from fedsilo.cli import main
    from fedsilo.clients import launcher
    from fedsilo.processes import flower_bin

    if stock:  # the launcher starts Flower's own SuperNode, with the same flags
        launcher.WARM_SUPERNODE = (flower_bin("flower-supernode"),)  # type: ignore[misc]
    main(
        [
            "client",
            "start",
            "--kit",
            f"fed/sites/{name}",
            "--data",
            data,
            "--server",
            server,
            "--device",
            "cpu",
            "--threads",
            "1",
            *(["--metrics-port", str(metrics)] if metrics else []),
            *(["--task", task] if task else []),
        ]
    )


def summarise(mode: str, seconds: list[float]) -> dict[str, Any]:
    later = seconds[1:] or seconds
    return {
        "mode": mode,
        "round_1_s": seconds[0],
        "later_rounds_median_s": statistics.median(later),
        "rounds_s": [round(s, 2) for s in seconds],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--stock", action="store_true", help="also time Flower's own SuperNode")
    p.add_argument("--site", help=argparse.SUPPRESS)  # internal: run one site
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--site-metrics-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument(
        "--wan", action="store_true", help="also across a 25 ms, 100 Mbit/s path (needs root)"
    )
    p.add_argument(
        "--dp-compare",
        action="store_true",
        help="also a deployed distributed-DP federation on the same site data (goal: <= 2x)",
    )
    p.add_argument("--keep", type=Path, help="keep the run directories and logs here")
    p.add_argument(
        "--max-gap",
        type=float,
        default=MAX_GAP_S,
        help="exit 1, saying so, when the deployed round's median is more than this many "
        f"seconds over the simulated one (default {MAX_GAP_S}; 0: never)",
    )
    args = p.parse_args(argv)
    if args.site:
        run_site(
            args.site,
            args.data,
            args.server,
            stock=args.stock,
            metrics=args.site_metrics_port,
            task=args.task,
        )
        return 0
    rows = []
    compare: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.keep:
            root = args.keep.resolve()
            root.mkdir(parents=True)
        print("simulate ...", file=sys.stderr, flush=True)
        rows.append(summarise("simulated", simulated(root, args.sites, args.rounds)))
        print("deployed (warm sites) ...", file=sys.stderr, flush=True)
        (root / "warm").mkdir()
        data = split_data(root, args.sites)
        rows.append(
            summarise(
                "deployed",
                deployed(root / "warm", args.sites, args.rounds, stock=False, data=data),
            )
        )
        if args.dp_compare:
            print("deployed, distributed DP ...", file=sys.stderr, flush=True)
            (root / "distributed").mkdir()
            from fedsilo.config import RunConfig

            examples = dp_modes.site_examples(data, args.sites)
            q = dp_modes.max_sample_rate(batch_size=RunConfig().batch_size, examples=examples)
            times = deployed(
                root / "distributed", args.sites, args.rounds, stock=False, data=data, distributed=q
            )
            rows.append(summarise("deployed, distributed DP", times))
            run_dirs = {m: root / m / "dep" for m in ("warm", "distributed")}
            compare = dp_modes.compare(rows[1], rows[-1], run_dirs, examples)
        if args.stock:
            print("deployed (stock Flower SuperNode) ...", file=sys.stderr, flush=True)
            (root / "stock").mkdir()
            rows.append(
                summarise(
                    "deployed, stock", deployed(root / "stock", args.sites, args.rounds, stock=True)
                )
            )
        if args.wan:
            from tests.e2e import wan

            why = wan.available()
            if why:
                raise SystemExit(f"--wan: {why}")
            print("deployed across a 25 ms / 100 Mbit/s WAN ...", file=sys.stderr, flush=True)
            (root / "wan").mkdir()
            with wan.Wan(args.sites) as net:
                times = deployed(root / "wan", args.sites, args.rounds, stock=False, net=net)
            rows.append(summarise("deployed, WAN 25 ms each way, 100 Mbit/s", times))
    sim = rows[0]["later_rounds_median_s"]
    for row in rows:
        row["minus_simulated_s"] = row["later_rounds_median_s"] - sim
    print(
        markdown(
            rows,
            ["mode", "round_1_s", "later_rounds_median_s", "minus_simulated_s", "rounds_s"],
        )
    )
    if compare:
        print(dp_modes.render(compare))
    payload = {"machine": machine(), "sites": args.sites, "rounds": args.rounds, "rows": rows}
    if compare:
        payload["dp_compare"] = compare
    path = write_json("deploy_latency", payload)
    print(f"\nwrote {path}")
    verdict = gap_verdict(rows, args.max_gap)
    if verdict:
        print(verdict, file=sys.stderr)
        return 1
    return 0


# The deployed digits round's regression line. On 2026-12-07's slower machine the gap was
# +0.80-0.81 s (+1.08-1.25 s with the code before the zygote's warm-up) at 13:10 UTC and
# +1.16-1.55 s (old code: +1.50 s) an hour later, the machine's own noise: the line sits
# above that, where the regressions seen so far landed (+2.82 s, issue 25).
MAX_GAP_S = 2.0


def gap_verdict(rows: list[dict[str, Any]], max_gap: float) -> str:
    """Why the run failed its regression line (the deployed round, fedsilo's site runtime
    on loopback, more than `max_gap` s over the simulated round), or "" when it did not."""
    gap = next((r["minus_simulated_s"] for r in rows if r["mode"] == "deployed"), None)
    if not max_gap or gap is None or gap <= max_gap:
        return ""
    return (
        f"REGRESSION: the deployed round is {gap:+.2f} s over the simulated one, past "
        f"--max-gap {max_gap} s (docs/performance.md, deployed round time): profile a site "
        "(py-spy on its SuperNode's process tree) and the server before changing the line."
    )


if __name__ == "__main__":
    sys.exit(main())
