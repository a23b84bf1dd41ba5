"""DP step cost with the site's secure noise, against a plain step: issue 28's table.

Run: `python -m bench.dp_noise [--device cpu|cuda] [--models cnn,mlp_17m,mlp_67m]
[--threads 1] [--reps 10] [--precisions fp32,bf16]` (CPU, 1 thread: ~2 minutes for the
CNN and the 17 M model; the 67 M model adds ~4 minutes).

For each model, in one process, it alternates single steps (bench.common.interleaved,
medians) of:
- `plain`: a PyTorch SGD step, fp32;
- `dp_no_noise`: fedsilo's DPTrainer step with sigma = 0 (clipping only);
- `dp_seeded`: the step with simulation's seeded torch generator (SeededRandom, noise
  drawn on the CPU);
- `dp_secure`: the step with a deployed site's noise (SecureRandom: ChaCha20; on a
  GPU the keystream and Gaussians are made on the GPU, fedsilo.task.rng);
- `dp_secure_<precision>` for each other `--precisions` entry: the secure step with
  the forward and backward passes under autocast (fedsilo.task.train), and
  `plain_<precision>`, the plain step under the same autocast.
Each ratio is over `plain` (fp32) measured in the same alternation. Models: the
26 k-parameter tanh CNN on 28x28 inputs and the digits task's 64 -> W -> W -> 10 tanh
MLP with W = 4096 (17.1 M parameters) and 8192 (67.7 M) (bench.big_tasks), batch 256.
Goals (issue 28): secure / plain at most 1.3x at 17 M on one CPU thread; on a GPU at
most 1.5x at 17 M and 67 M and 2x for the CNN.

Writes bench/results/dp_noise[_cuda].json: {"rows": [...], "machine": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

from bench.common import interleaved, machine, markdown, write_json

MODELS = ("cnn", "mlp_17m", "mlp_67m")
GOALS = {("cpu", "mlp_17m"): 1.3, ("cuda", "mlp_17m"): 1.5, ("cuda", "mlp_67m"): 1.5}
GOALS[("cuda", "cnn")] = 2.0


def build(name: str) -> tuple[Any, tuple[int, ...]]:
    """The model and one example's shape."""
    from bench.big_tasks import mlp_17m, mlp_67m
    from fedsilo.task.builtin import builtin_task

    if name == "cnn":
        return builtin_task("fashion-mnist", "cnn").build(seed=0), (1, 28, 28)
    task = {"mlp_17m": mlp_17m, "mlp_67m": mlp_67m}[name]
    return task.build(seed=0), (64,)


def steps(
    name: str, device: str, batch: int, precisions: list[str]
) -> dict[str, Callable[[], None]]:
    import torch
    from torch import nn

    from fedsilo.task.rng import SecureRandom, SeededRandom
    from fedsilo.task.train import PRECISIONS, DPTrainer

    where = torch.device(device)
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    model, shape = build(name)
    x = torch.randn(batch, *shape, generator=gen).to(where)
    y = torch.randint(0, 10, (batch,), generator=gen).to(where)

    def plain_step(precision: str) -> Callable[[], None]:
        m, _ = build(name)
        m = m.to(where)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        half = PRECISIONS[precision]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(where.type, dtype=half) if half else contextlib.nullcontext()
            with ctx:
                loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            sync()

        return step

    def dp_step(sigma: float, rng: Any, precision: str = "fp32") -> Callable[[], None]:
        m, _ = build(name)
        trainer = DPTrainer(
            m,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            lr=0.01,
            rng=rng,
            device=where,
            precision=precision,
        )

        def step() -> None:
            trainer.step(x, y)
            sync()

        return step

    del model
    out = {
        "plain": plain_step("fp32"),
        "dp_no_noise": dp_step(0.0, SeededRandom(0)),
        "dp_seeded": dp_step(1.0, SeededRandom(0)),
        "dp_secure": dp_step(1.0, SecureRandom()),
    }
    for precision in precisions:
        if precision != "fp32":
            out[f"plain_{precision}"] = plain_step(precision)
            out[f"dp_secure_{precision}"] = dp_step(1.0, SecureRandom(), precision)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", default="cnn,mlp_17m")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=10, help="alternations of single steps")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list: fp32, bf16, fp16")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    precisions = args.precisions.split(",")
    rows = []
    for name in args.models.split(","):
        t = interleaved(steps(name, args.device, args.batch_size, precisions), reps=args.reps)
        row: dict[str, Any] = {"model": name, "device": args.device}
        row.update({f"{k}_ms": v * 1000 for k, v in t.items()})
        row.update({f"{k}_x": v / t["plain"] for k, v in t.items() if k != "plain"})
        goal = GOALS.get((args.device, name))
        row["goal_x"] = goal
        row["met"] = None if goal is None else row["dp_secure_x"] <= goal
        rows.append(row)
        print(f"{name}: secure / plain {row['dp_secure_x']:.2f}x", file=sys.stderr, flush=True)
    cols = ["model", "plain_ms", "dp_no_noise_x", "dp_seeded_x", "dp_secure_x"]
    cols += [c for c in rows[0] if c.startswith(("dp_secure_", "plain_")) and c.endswith("_x")]
    cols += ["goal_x", "met"]
    cols = list(dict.fromkeys(cols))
    print(markdown(rows, cols))
    info = {**machine(), "device": args.device, "batch_size": args.batch_size}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    name = "dp_noise" if args.device == "cpu" else "dp_noise_cuda"
    path = write_json(name, {"rows": rows, "machine": info})
    print(f"\nwrote {path}; machine: {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
