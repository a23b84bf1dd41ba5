"""Big models: a deployed round against the simulated round, with where the gap goes.

Run: `python -m bench.big_model [--widths 1024,4096] [--update-codecs float32,int8]
[--rounds 3] [--sites 2]` (about 3 minutes a 17 M-parameter cell; `--widths
1024,4096,8192` adds the 67 M-parameter model, about 8 minutes a cell).

For each model (bench.big_tasks: the digits task with a 64 -> W -> W -> 10 tanh MLP;
W = 4096 is 17.1 M parameters, 65 MiB; W = 8192 is 67.7 M, 258 MiB; MB in the tables
is MiB) it runs, in this
process tree:
- simulated: `fedsilo simulate --task ...` with SITES sites, ROUNDS rounds;
- deployed: the README's one-machine recipe (bench.deploy_latency.deployed): `fedsilo
  provision`, `server start`, one `client start --threads 1` per site, TLS on loopback.

Per mode it prints the later rounds' median round time (the ServerApp's `seconds` in
metrics.jsonl, the same code in both modes), and splits the last round into the time
the slowest site's ClientApp took to answer it (from its status file,
fedsilo.clients.site_status: the last answer's seconds per step times its steps) and
the rest: moving the model and updates between processes, aggregation and
evaluation. Sites draw their DP noise differently in the two modes (a deployed site
from a ChaCha20 keystream, a simulated one from a seeded generator: fedsilo.task.rng),
so the table also gives the noise's cost a round, measured here on one thread: steps
a round x (secure - seeded) seconds a draw. It is DP-SGD's work, not the deployed
path's (issue 28 draws it on the GPU).

Also: bytes a site received and sent a round (its status file), and each process
kind's peak resident memory (VmHWM, sampled every 0.5 s); with the 1.1 M-parameter
model in the same run (width 1024, the default's first), each peak's growth over that
model's, against the model's size (issue 25's goal: at most 4x).
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

from bench import deploy_latency
from bench.common import codec_flags, machine, markdown, write_json

MB = 1024 * 1024


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _status(pid: str) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def _kind(cmd: str, parent_cmd: str, grandparent_cmd: str) -> str:
    """The process's role, from its command line (a ClientApp is a fork of the
    SuperExec's zygote, itself a fork of the SuperExec: same command line)."""
    if "superexec" in cmd:
        depth = ("superexec" in parent_cmd) + ("superexec" in grandparent_cmd)
        return ("site SuperExec", "site zygote", "site ClientApp")[depth]
    for needle, kind in (
        ("fedsilo.flwr_adapter.superlink", "SuperLink"),
        ("flwr-serverapp", "ServerApp"),
        ("site_runtime supernode", "site SuperNode"),
        ("fedsilo simulate", "simulate (ServerApp)"),
        ("ray::", "Ray site actor"),
        ("default_worker.py", "Ray site actor"),
    ):
        if needle in cmd:
            return kind
    return ""


class PeakMemory:
    """Peak resident memory (VmHWM) of this process tree's processes, by kind."""

    def __init__(self) -> None:
        self.peak_mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.5):
            procs = {}
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    status = _status(pid)
                    if status:
                        procs[pid] = status
            for pid, status in procs.items():
                chain, p = [], pid
                while p in procs and p not in ("0", "1") and len(chain) < 12:
                    chain.append(p)
                    p = procs[p].get("PPid", "0")
                if me not in chain[1:]:
                    continue  # not a descendant of this bench
                cmds = [_cmdline(c) for c in chain[:3]] + ["", "", ""]
                kind = _kind(cmds[0], cmds[1], cmds[2])
                hwm = status.get("VmHWM", "0 kB").split()[0]
                if kind and hwm.isdigit():
                    mb = int(hwm) / 1024
                    self.peak_mb[kind] = max(self.peak_mb.get(kind, 0.0), mb)


def noise_seconds(task: str, *, reps: int = 3) -> dict[str, float]:
    """Seconds one DP step's noise takes for `task`'s model, secure and seeded, 1 thread."""
    import torch

    from fedsilo.task.api import load_task
    from fedsilo.task.rng import SecureRandom, SeededRandom

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = [p.shape for p in load_task(task).model().parameters()]
        out = {}
        for name, rng in (("secure", SecureRandom()), ("seeded", SeededRandom(0))):
            rng.gaussians(shapes, 1.0)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                rng.gaussians(shapes, 1.0)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
        return out
    finally:
        torch.set_num_threads(threads)


def site_figures(status_files: list[Path]) -> dict[str, float]:
    """The slowest site's last answer (seconds), DP steps and MB in + out an answer."""
    last, steps, moved, answers = 0.0, 0.0, 0, 0
    for path in status_files:
        s = json.loads(path.read_text())
        n = int(s["messages"]["answered"])
        answers += n
        per_answer = int(s["dp_steps_total"]) / n  # local DP: the same every round
        steps = max(steps, per_answer)
        # the status keeps the last answer's seconds per step: its seconds, exactly
        last = max(last, float(s["last_step_seconds"]) * per_answer)
        moved += int(s["bytes_received_total"]) + int(s["bytes_sent_total"])
    return {"site_s": last, "steps": steps, "site_mb_moved": moved / answers / MB}


def row(mode: str, run_dir: Path, status_files: list[Path]) -> dict[str, Any]:
    seconds = deploy_latency.round_seconds(run_dir)
    later = seconds[1:] or seconds
    figures = site_figures(status_files)
    return {
        "mode": mode,
        "round_median_s": statistics.median(later),
        "last_round_s": seconds[-1],
        "site_s": figures["site_s"],
        "outside_site_s": seconds[-1] - figures["site_s"],
        "steps": figures["steps"],
        "site_mb_moved": figures["site_mb_moved"],
        "rounds_s": [round(s, 2) for s in seconds],
    }


def run_model(root: Path, task: str, sites: int, rounds: int, codec: str) -> dict[str, Any]:
    from bench.big_tasks import parameters
    from fedsilo.task.api import load_task

    params = parameters(load_task(task))
    model_mb = params * 4 / MB
    print(f"{task}: {params / 1e6:.1f} M parameters, {model_mb:.0f} MB", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": str(deploy_latency.REPO)}
    print("  simulate ...", file=sys.stderr, flush=True)
    with PeakMemory() as sim_mem:
        res = subprocess.run(
            [
                *(sys.executable, "-m", "fedsilo", "simulate", "--task", task),
                *("--sites", str(sites), "--rounds", str(rounds), "--out", "sim"),
                *codec_flags(codec),
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    sim = row("simulated", root / "sim", sorted((root / "sim" / "ledgers").glob("*.status.json")))
    print("  deployed ...", file=sys.stderr, flush=True)
    (root / "dep").mkdir()
    with PeakMemory() as dep_mem:
        deploy_latency.deployed(root / "dep", sites, rounds, stock=False, task=task, codec=codec)
    dep = row(
        "deployed",
        root / "dep" / "dep",
        sorted((root / "dep" / "fed" / "sites").glob("*/ledger.status.json")),
    )
    noise = noise_seconds(task)
    for r in (sim, dep):
        r["minus_simulated_s"] = r["round_median_s"] - sim["round_median_s"]
    extra_noise = dep["steps"] * (noise["secure"] - noise["seeded"])
    return {
        "task": task,
        "update_codec": codec,
        "parameters": params,
        "model_mb": model_mb,
        "rows": [sim, dep],
        "noise_step_s": noise,
        "secure_noise_extra_s": extra_noise,
        "deployed_over_simulated": dep["round_median_s"] / sim["round_median_s"],
        "path_gap_s": dep["outside_site_s"] - sim["outside_site_s"],
        "peak_mb": {"simulated": sim_mem.peak_mb, "deployed": dep_mem.peak_mb},
    }


def render(result: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    cols = ["mode", "round_median_s", "minus_simulated_s", "last_round_s", "site_s"]
    cols += ["outside_site_s", "steps", "site_mb_moved", "rounds_s"]
    model_mb = result["model_mb"]
    lines = [
        f"\n### {result['task']}: {result['parameters'] / 1e6:.1f} M parameters, "
        f"{model_mb:.0f} MB, codecs {result['update_codec']} (update:model)",
        "",
        markdown(result["rows"], cols),
        "",
        f"- deployed / simulated (later-round medians): {result['deployed_over_simulated']:.2f}x",
        f"- the deployed path's own time (outside the sites' ClientApps, deployed minus "
        f"simulated, last round): {result['path_gap_s']:+.2f} s",
        f"- a DP step's noise on one thread: secure {result['noise_step_s']['secure']:.3f} s, "
        f"seeded {result['noise_step_s']['seeded']:.3f} s: the deployed sites' ChaCha20 noise "
        f"costs {result['secure_noise_extra_s']:.1f} s more a round",
        "",
        "| process | peak MB | over the 1.1 M model's, MB | x model |",
        "|---|---|---|---|",
    ]
    for mode, peaks in result["peak_mb"].items():
        for kind, mb in sorted(peaks.items()):
            base = (baseline or {}).get("peak_mb", {}).get(mode, {}).get(kind)
            if base is None or baseline is result:
                lines.append(f"| {mode}: {kind} | {mb:,.0f} | | |")
            else:
                grew = mb - base
                x = grew / model_mb
                lines.append(f"| {mode}: {kind} | {mb:,.0f} | {grew:,.0f} | {x:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--widths",
        default="1024,4096",
        help="hidden widths, comma-separated: 1024 (1.1 M, the memory baseline), 4096 (17 M), "
        "8192 (67 M)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument(
        "--update-codecs",
        default="float32",
        help="comma list: each model once per --update-codec (float32, bf16, int8), or "
        "UPDATE:MODEL pair that sets --model-codec too (int8:int8)",
    )
    p.add_argument("--keep", type=Path, help="keep the run directories and logs here")
    args = p.parse_args(argv)
    tasks = {4096: "bench.big_tasks:mlp_17m", 8192: "bench.big_tasks:mlp_67m"}
    tasks[1024] = "bench.big_tasks:mlp_1m"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep.resolve() if args.keep else Path(tmp)
        cells = [(int(w), c) for w in args.widths.split(",") for c in args.update_codecs.split(",")]
        for width, codec in cells:
            if width not in tasks:
                raise SystemExit(f"--widths: {width} is not one of {sorted(tasks)}")
            root = base / f"w{width}-{codec}"
            root.mkdir(parents=True)
            result = run_model(root, tasks[width], args.sites, args.rounds, codec)
            baseline = next(
                (r for r in results if r["task"] == tasks[1024] and r["update_codec"] == codec),
                None,
            )
            print(render(result, baseline), flush=True)
            results.append(result)
    payload = {"machine": machine(), "sites": args.sites, "rounds": args.rounds}
    path = write_json("big_model", {**payload, "results": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
