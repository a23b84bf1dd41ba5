"""Robust aggregation against hostile sites: final accuracy per rule, attack and count.

Run: `python -m bench.robust_aggregation [--dataset digits] [--hostile 0,1,3]
[--kinds sign-flip:10,noise:1,label-flip,free-ride] [--rules fedavg,median,...]`

Each cell is a real `fedsilo simulate --json` run (local DP at --target-epsilon, 10
sites by default): the last K sites attack (`--hostile-sites K:KIND`), the server
combines the replies with the rule (`--aggregation`). The clean row (K = 0) of each
rule is the baseline the attacked rows are read against, measured in the same run;
the clean FedAvg cell is every rule's reference. The cell is the central test
accuracy after the last round; `flagged` counts the (site, round) pairs the rule
acted on, `hostile_flagged` those that were hostile sites.

The rules' F is the largest hostile count of the run (3 by default: trimmed-mean:3,
krum:3, which 10 sites allow: n >= 2F + 3); norm-bound's B is --norm-bound, about
the honest sites' update norm (digits at epsilon 3: 5.3 to 5.5, read from a
norm-bound run's `flagged` reasons).

Writes bench/results/robust_aggregation-DATASET.json: {"rows": [{"rule", "attack", "hostile",
"accuracy", "flagged", "hostile_flagged", "wall_s"}], "machine", "settings"}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import machine, markdown, write_json
from bench.utility import FM

DIGITS = {"rounds": 3, "local_epochs": 2}
# bench.utility's tuned Fashion-MNIST settings (the sites' count is this bench's flag).
FASHION = {k: v for k, v in FM.items() if k != "sites"}
# B of norm-bound:B: about the honest sites' update norm at epsilon 3, read from a run's
# `flagged` reasons (digits: 5.3 to 5.5; Fashion-MNIST, bench.utility's settings: 27.2 to 27.7).
NORM_BOUND = {"digits": 6.0, "fashion-mnist": 30.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.robust_aggregation", description=__doc__)
    p.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--hostile", default="0,1,2,3", help="hostile counts K (0 = clean)")
    p.add_argument("--kinds", default="sign-flip:10,noise:1,label-flip,free-ride")
    p.add_argument("--rules", default="fedavg,median,trimmed-mean:F,krum:F,norm-bound:B")
    p.add_argument(
        "--norm-bound",
        type=float,
        default=None,
        help="B of norm-bound:B (default: the dataset's honest update norm, NORM_BOUND)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def rules(text: str, f: int, bound: float) -> list[str]:
    """The rules to run, with F and B filled in."""
    return [r.replace(":F", f":{f}").replace(":B", f":{bound:g}") for r in text.split(",")]


def cell(args: argparse.Namespace, rule: str, attack: str, hostile: int) -> dict[str, Any]:
    """One `fedsilo simulate --json` run: its final accuracy and what the rule flagged."""
    settings = DIGITS if args.dataset == "digits" else FASHION
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    with tempfile.TemporaryDirectory(prefix="fedsilo-robust-") as tmp:
        cmd = [
            sys.executable, "-m", "fedsilo", "simulate", "--json", "--out", f"{tmp}/run",
            "--dataset", args.dataset, "--sites", str(args.sites),
            "--target-epsilon", str(args.target_epsilon), "--seed", str(args.seed),
            "--aggregation", rule, *flags,
            *(["--hostile-sites", f"{hostile}:{attack}"] if hostile else []),
        ]  # fmt: skip
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.monotonic() - t0
    if res.returncode != 0:
        return {"rule": rule, "attack": attack, "hostile": hostile, "error": res.stderr[-500:]}
    out = json.loads(res.stdout)
    bad = set(out.get("hostile") or {})
    return {
        "rule": rule,
        "attack": attack if hostile else "none",
        "hostile": hostile,
        "accuracy": out["final"]["accuracy"],
        "flagged": len(out["flagged"]),
        "hostile_flagged": sum(f["site"] in bad for f in out["flagged"]),
        "wall_s": wall,
    }


def table(rows: list[dict[str, Any]], rule_names: list[str]) -> str:
    """One row per (attack, hostile count), one accuracy column per rule."""
    keys = list(dict.fromkeys((r["attack"], r["hostile"]) for r in rows))
    out = []
    for attack, k in keys:
        line: dict[str, Any] = {"attack": attack, "hostile": k}
        for r in rows:
            if (r["attack"], r["hostile"]) == (attack, k):
                line[r["rule"]] = r.get("accuracy", "error")
        out.append(line)
    return markdown(out, ["attack", "hostile", *rule_names])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = [int(k) for k in args.hostile.split(",")]
    f = max(1, max(counts))
    bound = NORM_BOUND[args.dataset] if args.norm_bound is None else args.norm_bound
    names = rules(args.rules, f, bound)
    cells = [("none", 0)] if 0 in counts else []
    cells += [(kind, k) for kind in args.kinds.split(",") for k in counts if k]
    rows = []
    for attack, k in cells:
        for rule in names:
            row = cell(args, rule, attack, k)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows, names))
    path = write_json(
        f"robust_aggregation-{args.dataset}",
        {"rows": rows, "machine": machine(), "settings": vars(args), "rules": names},
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
