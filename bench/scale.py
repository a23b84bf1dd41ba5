"""Time per round and per site as a simulated federation grows, measured in one run.

Run: `python -m bench.scale [--sites 10,100,1000] [--rounds 5]`; past 6,000 sites
(Fashion-MNIST's 60,000 images at fedsilo's 10 a site at least) `--task
bench.scale_tasks:blobs` (150,000 synthetic examples): `python -m bench.scale --task
bench.scale_tasks:blobs --sites 1000,10000 --rounds 5`.

Each row is `fedsilo simulate --dataset fashion-mnist --model mlp --local-epochs 1`
with the 60,000 training images split IID among N sites (6,000 a site at 10 sites,
60 at 1,000), so the training work per round is the same in every row and what
grows with N is the per-site cost: the engine's messages, each site's ledger,
policy check and accounting, and the server's validation and aggregation of N
replies. Every site keeps its own ledger and policy; after each run `fedsilo audit`
verifies every ledger, and its time is shown too.

Round times are the ServerApp's own (`seconds` in metrics.jsonl). Ratios are against
the first (smallest) row of the same run. Peak memory is the largest sum, over the
simulation's whole process tree (driver, Ray's daemons and workers), of each
process's proportional set size (shared pages split between their users), sampled
every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import machine, markdown, write_json


def tree_pss_bytes(root: int) -> int:
    """Sum of the proportional set size of `root` and all its descendants (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


REPO = Path(__file__).resolve().parents[1]  # on PYTHONPATH, for `--task bench....`


def run_one(tmp: Path, sites: int, rounds: int, task: str = "") -> dict[str, Any]:
    out = tmp / f"sites-{sites}"
    data = ["--task", task] if task else ["--dataset", "fashion-mnist", "--model", "mlp"]
    cmd = [
        *(sys.executable, "-m", "fedsilo", "simulate", "--json"),
        *("--sites", str(sites), "--rounds", str(rounds), *data),
        *("--local-epochs", "1", "--out", str(out)),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.5):
            peak = max(peak, tree_pss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{sites} sites failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    seconds = [float(json.loads(line)["seconds"]) for line in lines if line.strip()]
    t1 = time.monotonic()
    audit = subprocess.run(
        [sys.executable, "-m", "fedsilo", "audit", str(out), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    audit_s = time.monotonic() - t1
    verified = json.loads(audit.stdout) if audit.stdout.strip() else {}
    later = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {
        "sites": sites,
        "examples_per_site": summary["sites"][0].get("examples", 0) if summary["sites"] else 0,
        "round_1_s": seconds[0],
        "later_rounds_median_s": later,
        "ms_per_site_round": 1000 * later / sites,
        "wall_s": wall,
        "peak_memory_gb": peak / 2**30,
        "accuracy": summary["final"]["accuracy"],
        "audit_s": audit_s,
        "audit_ok": audit.returncode == 0,
        "audited_ledgers": len(verified.get("sites", [])),
        "rounds_s": [round(s, 2) for s in seconds],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", default="10,100,1000", help="comma-separated site counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--task",
        default="",
        help="a task's import path (default: Fashion-MNIST with the MLP); "
        "bench.scale_tasks:blobs splits among up to 15,000 sites",
    )
    args = ap.parse_args()
    counts = [int(s) for s in args.sites.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            print(f"{n} sites x {args.rounds} rounds ...", file=sys.stderr, flush=True)
            rows.append(run_one(Path(tmp), n, args.rounds, args.task))
    base = rows[0]
    for row in rows:
        row["sites_x"] = row["sites"] / base["sites"]
        row["later_round_x"] = row["later_rounds_median_s"] / base["later_rounds_median_s"]
    columns = [
        "sites",
        "examples_per_site",
        "round_1_s",
        "later_rounds_median_s",
        "later_round_x",
        "ms_per_site_round",
        "wall_s",
        "peak_memory_gb",
        "audit_s",
        "audit_ok",
        "audited_ledgers",
        "accuracy",
    ]
    print(markdown(rows, columns))
    path = write_json(
        "scale", {"machine": machine(), "rounds": args.rounds, "task": args.task, "rows": rows}
    )
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
