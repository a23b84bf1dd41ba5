"""DP site training step against a plain PyTorch step: same model, data and batch size.

Run: `python -m bench.dp_throughput [--threads 1] [--reps 5] [--batch-size 256]`.

For each model (the digits MLP, the 26k-parameter tanh CNN on 28x28 inputs, and
scatnet's linear head on scattering features computed once, as sites train it) and
each per-sample gradient method, a fresh subprocess times the method's DP-SGD step
and a plain SGD step on the same batch, alternating single steps `--reps` times (medians) (the
machine may be shared; ratios from one process are what to compare). Methods:

- `fedsilo`: the product's `DPTrainer.step` (fedsilo.task.clipping: ghost norms and
  book-keeping for Linear layers, per-sample products for Conv2d) with a deployed
  site's noise (fedsilo.task.rng.SecureRandom, ChaCha20); the same process also times
  the step with simulation's seeded torch generator (`SeededRandom`), alternating with
  the other two, and reports `secure_vs_seeded`, the cost of the secure source;
- `opacus-hooks`: Opacus GradSampleModule hooks + DPOptimizer (fedsilo before this);
- `opacus-functorch`: the same with `force_functorch=True`;
- `opacus-ghost`: Opacus fast gradient clipping (ghost clipping, two backward passes);
- `torch-func-vmap`: `torch.func.vmap(grad(...))` per-sample gradients, clipped and
  summed by hand.

Peak memory is the subprocess's peak RSS after its plain steps and after all steps.
Writes bench/results/dp_throughput.json: {"rows": [{"model", "method",
"plain_samples_per_s", "dp_samples_per_s", "ratio", ...}], "machine": {...}}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

from bench.common import interleaved, machine, markdown, peak_rss_mb, write_json

MODELS = {"mlp": (64,), "cnn": (1, 28, 28), "scatnet": (1, 28, 28)}
METHODS = ("fedsilo", "opacus-hooks", "opacus-functorch", "opacus-ghost", "torch-func-vmap")


def make_steps(model_name: str, method: str, batch: int) -> dict[str, Callable[[], None]]:
    """The steps to alternate: "plain" and "dp" (and "dp_seeded" for fedsilo)."""
    import torch
    from torch import nn

    from fedsilo.task.builtin import builtin_task
    from fedsilo.task.rng import SecureRandom, SeededRandom
    from fedsilo.task.train import DPTrainer

    shape = MODELS[model_name]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    task = builtin_task("digits" if shape == (64,) else "fashion-mnist", model_name)
    plain_model, dp_model = task.build(seed=0), task.build(seed=0)
    front = task.build_front()
    if front is not None:  # scatnet: both train the linear model on features computed once
        with torch.no_grad():
            x = front(x)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01)
    sigma, clip, lr = 1.0, 1.0, 0.01

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain_model(x), y).backward()
        plain_opt.step()

    if method == "fedsilo":
        seeded_model = task.build(seed=0)
        trainer, seeded = (
            DPTrainer(
                m,
                noise_multiplier=sigma,
                max_grad_norm=clip,
                expected_batch_size=batch,
                lr=lr,
                rng=rng,
            )
            for m, rng in ((dp_model, SecureRandom()), (seeded_model, SeededRandom(0)))
        )

        def dp_seeded() -> None:
            seeded.step(x, y)

        def dp() -> None:
            trainer.step(x, y)

        return {"plain": plain, "dp": dp, "dp_seeded": dp_seeded}

    elif method in ("opacus-hooks", "opacus-functorch"):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(
            dp_model, batch_first=True, force_functorch=method == "opacus-functorch"
        )
        opt = DPOptimizer(
            torch.optim.SGD(dp_model.parameters(), lr=lr),
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=batch,
            generator=gen,
        )

        def dp() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(gsm(x), y).backward()
            opt.step()

    elif method == "opacus-ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(dp_model, max_grad_norm=clip)
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(dp_model.parameters(), lr=lr),
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=batch,
            generator=gen,
        )
        crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"))

        def dp() -> None:
            opt.zero_grad(set_to_none=True)
            crit(gsm(x), y).backward()
            opt.step()

    elif method == "torch-func-vmap":
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in dp_model.named_parameters()}

        def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> Any:
            out = functional_call(dp_model, p, (xi.unsqueeze(0),))
            return nn.functional.cross_entropy(out, yi.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def dp() -> None:
            grads = per_sample(params, x, y)
            sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
            factors = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for k, g in grads.items():
                s = torch.einsum("b,b...->...", factors, g)
                s += torch.normal(0.0, sigma * clip, s.shape, generator=gen)
                params[k].sub_(s, alpha=lr / batch)

    else:
        raise SystemExit(f"unknown method {method}")
    return {"plain": plain, "dp": dp}


def measure(model_name: str, method: str, batch: int, reps: int, threads: int) -> dict[str, Any]:
    """One (model, method) pair, in this process: the subprocess entry point."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    steps = make_steps(model_name, method, batch)
    for _ in range(3):
        steps["plain"]()
    plain_rss = peak_rss_mb()
    t = interleaved(steps, reps=reps)
    extra = {"secure_vs_seeded": t["dp"] / t["dp_seeded"]} if "dp_seeded" in t else {}
    return {
        "model": model_name,
        "method": method,
        "plain_samples_per_s": batch / t["plain"],
        "dp_samples_per_s": batch / t["dp"],
        "ratio": t["dp"] / t["plain"],
        "plain_peak_rss_mb": plain_rss,
        "peak_rss_mb": peak_rss_mb(),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn,scatnet")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=60, help="alternations of one plain, one DP step")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: what each simulated site uses)"
    )
    p.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        row = measure(args.one[0], args.one[1], args.batch_size, args.reps, args.threads)
        print(json.dumps(row))
        return 0
    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "bench.dp_throughput", "--one", model_name, method]
            cmd += ["--batch-size", str(args.batch_size), "--reps", str(args.reps)]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                err = (out.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{model_name}/{method}: failed: {err}", file=sys.stderr)
                rows.append({"model": model_name, "method": method, "error": err})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{model_name}/{method}: ratio {rows[-1]['ratio']:.2f}", file=sys.stderr)
    cols = ["model", "method", "plain_samples_per_s", "dp_samples_per_s", "ratio"]
    cols += ["secure_vs_seeded"]
    cols += ["plain_peak_rss_mb", "peak_rss_mb"]
    print(markdown(rows, cols))
    info = {**machine(), "threads": args.threads, "batch_size": args.batch_size}
    path = write_json("dp_throughput", {"rows": rows, "machine": info})
    print(f"\nwrote {path}; machine: {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
