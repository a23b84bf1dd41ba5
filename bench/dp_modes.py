"""Local against distributed DP in one deployed run: the sampling rate, the server's
stage times, the comparison table (`python -m bench.deploy_latency --dp-compare`)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.common import markdown

GOAL = 2.0  # issue 22: a deployed distributed-DP round takes at most 2x a local-DP one


def site_examples(data: Path, sites: int) -> list[int]:
    """How many examples each site's data file (data/site-N.npz) holds."""
    import numpy as np

    out = []
    for i in range(sites):
        with np.load(data / f"site-{i + 1}.npz") as f:
            out.append(int(f["y"].shape[0]))
    return out


def max_sample_rate(*, batch_size: int, examples: Iterable[int]) -> float:
    """--dp-max-sample-rate: batch-size / the smallest site's examples (at most 1)."""
    return min(1.0, batch_size / min(examples))


def stage_medians(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per stage over the later rounds of metrics.jsonl (`stage_seconds`).

    Round 1 is left out, as in the round medians, unless it is the only one; a round
    recorded twice (a resumed run) counts once, as last recorded.
    """
    laps = {int(r["round"]): r["stage_seconds"] for r in records if r.get("stage_seconds")}
    later = [v for r, v in sorted(laps.items()) if r > 1] or list(laps.values())
    stages = list(dict.fromkeys(k for v in later for k in v))
    return {k: statistics.median(float(v[k]) for v in later if k in v) for k in stages}


def settings(run_dir: Path) -> str:
    """What one round of the run did, from its resolved config.json."""
    cfg = json.loads((run_dir / "config.json").read_text())
    batch = f"batch {cfg['batch-size']}"
    if cfg.get("dp") == "distributed":
        q = float(cfg["dp-max-sample-rate"])
        return (
            f"{cfg['rounds']} rounds x 1 DP-SGD step, {batch} (q {q:.3f}), "
            "4 SecAgg exchanges (5 in round 1)"
        )
    return f"{cfg['rounds']} rounds x {cfg['local-epochs']} local epochs of DP-SGD, {batch}"


def compare(
    local: dict[str, Any], dist: dict[str, Any], run_dirs: dict[str, Path], examples: list[int]
) -> dict[str, Any]:
    """The two deployed rows (bench.deploy_latency.summarise) side by side.

    `run_dirs`: the run directory of each, keyed "warm" (local DP) and "distributed".
    """
    metrics = run_dirs["distributed"] / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    ratio = dist["later_rounds_median_s"] / local["later_rounds_median_s"]
    return {
        "site_examples": examples,
        "local": {**local, "settings": settings(run_dirs["warm"])},
        "distributed": {**dist, "settings": settings(run_dirs["distributed"])},
        "ratio": ratio,
        "goal": GOAL,
        "met": ratio <= GOAL,
        "distributed_stage_medians_s": stage_medians(json.loads(x) for x in lines if x),
    }


def render(c: dict[str, Any]) -> str:
    """The comparison as Markdown: medians, ratio against the goal, stage times."""
    rows: list[dict[str, Any]] = [
        {"dp": m, **{k: c[m][k] for k in ("round_1_s", "later_rounds_median_s", "settings")}}
        for m in ("local", "distributed")
    ]
    verdict = "met" if c["met"] else "NOT met"
    rows.append(
        {
            "dp": "distributed / local",
            "later_rounds_median_s": f"**{c['ratio']:.2f}x** (goal <= {c['goal']:g}x: {verdict})",
        }
    )
    out = [
        f"\nDeployed, the same {len(c['site_examples'])} sites and data "
        f"(examples a site: {c['site_examples']}):\n",
        markdown(rows, ["dp", "round_1_s", "later_rounds_median_s", "settings"]),
    ]
    stages = c["distributed_stage_medians_s"]
    if stages:
        out += ["\nA distributed round's stages, from metrics.jsonl (later-round medians, s):\n"]
        out += [markdown([stages], list(stages))]
    else:
        out += ["\n(no `stage_seconds` in the distributed run's metrics.jsonl)"]
    return "\n".join(out)
