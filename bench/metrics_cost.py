"""What watching a federation costs: rounds with Prometheus metrics on against off.

Run: `python -m bench.metrics_cost [--reps 2] [--rounds 10] [--sim-sites 10] [--sites 3]`.

The runs are alternated (off, on, on, off, ...) so load from elsewhere and drift hit
both alike, and each row compares the mean of the later rounds' `seconds` (round 1
also calibrates noise and builds the evaluator), the median over reps:

- simulated: `fedsilo simulate --sites 10`, with `--metrics-port` and a scraper reading
  /metrics every second (Prometheus scrapes every 15 s by default: 15x the load);
- deployed: the README's one-machine recipe (bench.deploy_latency: TLS, `fedsilo client
  start --threads 1` per site), the server and every site with `--metrics-port`, each
  scraped every second.

A site's scrape after a new spend audits its ledger (its epsilon recomputed from every
spend: ~0.4 s of CPU) at most every 15 s (fedsilo.clients.prometheus.AUDIT_EVERY_S), on
a thread at the lowest CPU priority (background_priority). Then what one scrape costs, timed in
this process: the server's (fedsilo.server.prometheus over the simulated run directory)
and a site's (its ledger's cached audit and its status file). The site status file
(fedsilo.clients.site_status) is written after every message whether or not metrics
are served, so both modes pay it. Goal (issue 24): under 1% of a round.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import machine, markdown, write_json
from bench.deploy_latency import deployed, fedsilo, round_seconds, split_data


@contextlib.contextmanager
def scraping(ports: list[int], every: float = 1.0) -> Iterator[list[int]]:
    """Scrape http://127.0.0.1:PORT/metrics for each port every `every` s while the block
    runs; yields the list of successful scrape counts per port."""
    counts = [0] * len(ports)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            for i, port in enumerate(ports):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                        counts[i] += 1
                except OSError:
                    pass  # not up yet, or already gone

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(timeout=5)


def simulated(tmp: Path, sites: int, rounds: int, *, metrics: bool) -> tuple[list[float], int]:
    from fedsilo.processes import free_port

    port = free_port()
    flags = ["--metrics-port", str(port)] if metrics else []
    with scraping([port] if metrics else []) as counts:
        res = fedsilo(
            *("simulate", "--sites", str(sites), "--rounds", str(rounds), "--out", "sim"),
            *flags,
            cwd=tmp,
        )
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return round_seconds(tmp / "sim"), sum(counts)


def deployed_run(
    tmp: Path, sites: int, rounds: int, data: Path, *, metrics: bool
) -> tuple[list[float], int]:
    from fedsilo.processes import free_port

    ports = [free_port() for _ in range(sites + 1)] if metrics else []
    with scraping(ports) as counts:
        times = deployed(tmp, sites, rounds, stock=False, data=data, metrics_ports=ports or None)
    return times, sum(counts)


def later_mean(seconds: list[float]) -> float:
    """The mean of the rounds after the first: a site audits its ledger on a scrape at
    most every 15 s, so the cost falls on some rounds, and a median would hide it."""
    return statistics.mean(seconds[1:] or seconds)


def scrape_cost(run_dir: Path, reps: int = 20) -> dict[str, float]:
    """Milliseconds per scrape of the server's collector and of a site's, and per
    site-status write (done after every message)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from fedsilo.clients import site_status
    from fedsilo.clients.prometheus import SiteCollector
    from fedsilo.server.prometheus import RunCollector

    ledger = sorted((run_dir / "ledgers").glob("*.jsonl"))[0]
    out = {}
    for name, collector in (
        ("server_scrape_ms", RunCollector(run_dir)),
        ("site_scrape_ms", SiteCollector(ledger)),
    ):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        generate_latest(registry)  # warm: the site's first scrape audits its ledger
        t0 = time.perf_counter()
        for _ in range(reps):
            generate_latest(registry)
        out[name] = 1000 * (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for i in range(reps):
        site_status.record(
            ledger, "bench", server_round=i, outcome="answered", seconds=1.0,
            received=1000, sent=1000, steps=10,
        )  # fmt: skip
    out["status_write_ms"] = 1000 * (time.perf_counter() - t0) / reps
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__)
    p.add_argument("--reps", type=int, default=2, help="runs of each mode (alternated)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sim-sites", type=int, default=10)
    p.add_argument("--sites", type=int, default=3, help="deployed sites")
    p.add_argument("--no-deploy", action="store_true", help="only the simulated rows")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    costs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedsilo-metrics-cost-") as root:
        base = Path(root)
        kinds = [("simulated", args.sim_sites)]
        if not args.no_deploy:
            kinds.append(("deployed", args.sites))
        data = None if args.no_deploy else split_data(base, args.sites)
        for kind, sites in kinds:
            means: dict[bool, list[float]] = {False: [], True: []}
            scrapes = 0
            for rep in range(args.reps):
                for on in (False, True) if rep % 2 == 0 else (True, False):  # ABBA
                    tmp = base / f"{kind}-{rep}-{'on' if on else 'off'}"
                    tmp.mkdir()
                    if kind == "simulated":
                        times, n = simulated(tmp, sites, args.rounds, metrics=on)
                    else:
                        assert data is not None
                        times, n = deployed_run(tmp, sites, args.rounds, data, metrics=on)
                    means[on].append(later_mean(times))
                    scrapes += n
                    print(f"{kind} rep {rep + 1} metrics {'on' if on else 'off'}: "
                          f"later rounds {later_mean(times):.3f} s", flush=True)  # fmt: skip
            off, on_ = statistics.median(means[False]), statistics.median(means[True])
            rows.append(
                {
                    "mode": kind,
                    "sites": sites,
                    "round_off_s": round(off, 3),
                    "round_on_s": round(on_, 3),
                    "on_over_off": round(on_ / off, 3),
                    "scrapes": scrapes,
                }
            )
        costs = scrape_cost(base / "simulated-0-on" / "sim")
        round_s = rows[0]["round_on_s"]
        costs["server_scrape_share_of_round_at_15s"] = costs["server_scrape_ms"] / 1000 / 15
        costs["simulated_round_s"] = round_s
    print(markdown(rows, ["mode", "sites", "round_off_s", "round_on_s", "on_over_off", "scrapes"]))
    print(
        f"one scrape: server {costs['server_scrape_ms']:.2f} ms, site "
        f"{costs['site_scrape_ms']:.2f} ms; a site's status write {costs['status_write_ms']:.2f}"
        " ms per message"
    )
    write_json("metrics_cost", {"machine": machine(), "rows": rows, "costs": costs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
