"""Accuracy at a given epsilon: Fashion-MNIST, 10 sites, IID and Dirichlet(0.5).

Run: `python -m bench.utility [--epsilons 3] [--partitions iid] [--rounds 10] ...`
(`--update-codecs float32,bf16,int8,int8:int8`: each DP cell once per update codec, or
UPDATE:MODEL pair with a --model-codec too, with the MB a site sent and received a round;
`--precisions fp32,bf16`: each DP cell once per `--precision` of the sites' training.)

Each DP cell is a real `fedsilo simulate --json` run (the product: Flower engine,
ClientApp, ServerApp, accountant) with the Fashion-MNIST settings below; it reports
the central test accuracy, the largest epsilon any site reports and the wall time.

`none` (no DP) is a benchmark-only baseline, never a product flag: plain FedAvg in
this process over the same sites, model, batch size, local epochs and rounds, each
site running ordinary mini-batch SGD (no clipping, no noise).

`--validate` is for tuning: every cell then runs in this process on a validation
split carved from the *train* set (10%, seeded) instead of the test set, with the
same DP-SGD code (fedsilo.task.train.DPTrainer) and the calibrated noise of the
product. The test set is only ever read by the final, untuned runs.

Writes bench/results/utility.json: {"rows": [{"partition", "target_epsilon",
"accuracy", "epsilon", "wall_s", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import codec_flags, machine, markdown, write_json

# The Fashion-MNIST settings tuned on the validation split (README, Performance).
FM = {
    "model": "scatnet",
    "sites": 10,
    "rounds": 10,
    "local_epochs": 4,
    "batch_size": 256,
    "lr": 2.0,
    "momentum": 0.9,
    "max_grad_norm": 0.1,
}
# Distributed DP (--dp distributed): central DP-SGD's regime, one step per round on the
# sites' pooled Poisson batch (10 x 819 = 8190, Tramer and Boneh's batch size), 60 epochs
# of the pooled data (round(60 / (819 / 6000)) = 440 rounds), tuned with
# `--validate --dp distributed` runs (the same step in this process, validation split).
DIST = {
    "model": "scatnet",
    "sites": 10,
    "rounds": 440,
    "local_epochs": 1,
    "batch_size": 819,
    "lr": 8.0,
    "momentum": 0.9,
    "max_grad_norm": 0.1,
}
NODP_LR = 0.05  # plain SGD on unclipped gradients wants a smaller step (validation)
VALIDATION_FRACTION = 0.1


def simulate(
    partition: str,
    eps: float,
    hp: dict[str, Any],
    dp: str = "local",
    codec: str = "float32",
    precision: str = "fp32",
) -> dict[str, Any]:
    """One `fedsilo simulate` run (the product), timed from outside; with the MB a site
    sent a round (its status file: fedsilo.clients.site_status)."""
    with tempfile.TemporaryDirectory(prefix="fedsilo-utility-") as out:
        cmd = [sys.executable, "-m", "fedsilo", "simulate", "--json", "--out", out, "--dp", dp]
        cmd += [*codec_flags(codec), "--precision", precision]
        cmd += ["--dataset", "fashion-mnist", "--sites", str(hp["sites"])]
        cmd += ["--partition", partition, "--target-epsilon", str(eps)]
        cmd += ["--max-grad-norm", str(hp["max_grad_norm"])]
        for key in ("model", "rounds", "local_epochs", "batch_size", "lr", "momentum"):
            cmd += [f"--{key.replace('_', '-')}", str(hp[key])]
        if dp == "distributed" and hp.get("dp_max_sample_rate"):
            cmd += ["--dp-max-sample-rate", str(hp["dp_max_sample_rate"])]
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.monotonic() - t0
        sent = [
            json.loads(f.read_text()) for f in sorted((Path(out) / "ledgers").glob("*.status.json"))
        ]
    if done.returncode != 0:
        raise SystemExit(f"simulate failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    answers = max(1, sum(s["messages"]["answered"] for s in sent))
    mb_sent = sum(s["bytes_sent_total"] for s in sent) / answers / 2**20
    mb_received = sum(s["bytes_received_total"] for s in sent) / answers / 2**20
    return {
        "dp": dp,
        "precision": precision,
        "update_codec": codec_flags(codec)[1],
        "model_codec": codec_flags(codec)[3],
        "mb_sent_per_site_round": mb_sent,
        "mb_received_per_site_round": mb_received,
        "completed_rounds": len(summary["rounds"]),
        "accuracy": summary["final"]["accuracy"],
        "epsilon": max(s["epsilon"] for s in summary["sites"]),
        # distributed DP's one noise multiplier is planned for the smallest site's rate,
        # so larger sites spend less than the target: the smallest spend, beside the largest
        "min_epsilon": min(s["epsilon"] for s in summary["sites"]),
        "wall_s": wall,
        "per_round_accuracy": [r["accuracy"] for r in summary["rounds"]],
    }


def fedavg_in_process(
    partition: str, eps: float | None, hp: dict[str, Any], *, validate: bool, seed: int = 0
) -> dict[str, Any]:
    """FedAvg over `sites` sites in this process: DP-SGD sites (eps) or plain SGD (None)."""
    import numpy as np
    import torch

    from fedsilo.clients.dp_train import plan_run
    from fedsilo.config import RunConfig
    from fedsilo.privacy.accountant import epsilon
    from fedsilo.privacy.events import SampledGaussianEvent
    from fedsilo.simulations.partition import partition_indices
    from fedsilo.task.builtin import builtin_task
    from fedsilo.task.data import load_dataset
    from fedsilo.task.features import featurize
    from fedsilo.task.rng import SeededRandom
    from fedsilo.task.train import DPTrainer, evaluate

    torch.set_num_threads(1)
    t0 = time.monotonic()
    train = load_dataset("fashion-mnist", "train")
    if validate:
        order = np.random.default_rng(seed + 777).permutation(len(train))
        n_val = int(len(train) * VALIDATION_FRACTION)
        held_out, train = train.subset(order[:n_val]), train.subset(order[n_val:])
    else:
        held_out = load_dataset("fashion-mnist", "test")
    cfg = RunConfig(
        dataset="fashion-mnist",
        model=hp["model"],
        rounds=hp["rounds"],
        local_epochs=hp["local_epochs"],
        batch_size=hp["batch_size"],
        lr=hp["lr"],
        momentum=hp["momentum"],
        max_grad_norm=hp["max_grad_norm"],
        target_epsilon=eps if eps is not None else 1.0,
        partition=partition,
        seed=seed,
    )
    parts = partition_indices(train.y.numpy(), hp["sites"], cfg.partition_spec, seed=seed)
    sites = [train.subset(p) for p in parts]
    plans = {}
    if eps is not None:
        for n in sorted({len(s) for s in sites}):
            plans[n] = plan_run(cfg, n, prior=[])

    task = builtin_task("fashion-mnist", hp["model"])

    def new_model() -> torch.nn.Module:
        return task.build(seed=seed)

    model = new_model()
    front = task.build_front()
    if front is not None:  # as the product does: the fixed front once per dataset
        sites = [featurize(front, s) for s in sites]
        held_out = featurize(front, held_out)
    curve, spent = [], 0.0
    for rnd in range(1, hp["rounds"] + 1):
        states, weights = [], []
        for i, data in enumerate(sites):
            local = new_model()
            local.load_state_dict(model.state_dict())
            rng = SeededRandom((seed * 1_000_003 + i) * 10_007 + rnd)  # as fedsilo simulate
            plan = plans.get(len(data))
            trainer = DPTrainer(
                local,
                noise_multiplier=plan.noise_multiplier if plan else 0.0,
                max_grad_norm=hp["max_grad_norm"] if plan else float("inf"),
                expected_batch_size=hp["batch_size"],
                lr=hp["lr"] if plan else hp.get("nodp_lr", NODP_LR),
                momentum=hp["momentum"],
                rng=rng,
            )
            trainer.train_epochs(data, hp["local_epochs"])
            states.append(local.state_dict())
            weights.append(len(data))
        total = sum(weights)
        avg = {
            k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
            for k in states[0]
        }
        model.load_state_dict(avg)
        curve.append(evaluate(model, held_out)[1])
    if plans:
        spent = max(
            epsilon(
                [
                    SampledGaussianEvent(
                        noise_multiplier=p.noise_multiplier,
                        sample_rate=p.sample_rate,
                        steps=p.steps_per_round * p.rounds,
                    )
                ],
                delta=cfg.target_delta,
            )
            for p in plans.values()
        )
    return {
        "accuracy": curve[-1],
        "epsilon": spent if plans else float("inf"),
        "wall_s": time.monotonic() - t0,
        "per_round_accuracy": curve,
    }


def distributed_in_process(
    partition: str, eps: float, hp: dict[str, Any], *, seed: int = 0
) -> dict[str, Any]:
    """Tuning for --dp distributed on the validation split: the same step in this process.

    Each site Poisson-samples its share at q = batch / its examples and clips per example;
    the pooled sum gets Gaussian noise of the calibrated sigma (the discrete Gaussian
    shares' sum, at the product's integer scale, is this up to rounding) and one SGD step
    with momentum is taken on it divided by the pooled expected batch. No secure
    aggregation: it changes what the server sees, not the sum.
    """
    import numpy as np
    import torch

    from fedsilo.privacy.accountant import calibrate_noise
    from fedsilo.simulations.partition import partition_indices
    from fedsilo.task.builtin import builtin_task
    from fedsilo.task.data import load_dataset
    from fedsilo.task.features import featurize
    from fedsilo.task.rng import SeededRandom
    from fedsilo.task.train import DPTrainer, evaluate, sample_rate

    torch.set_num_threads(1)
    t0 = time.monotonic()
    train = load_dataset("fashion-mnist", "train")
    order = np.random.default_rng(seed + 777).permutation(len(train))
    n_val = int(len(train) * VALIDATION_FRACTION)
    held_out, train = train.subset(order[:n_val]), train.subset(order[n_val:])
    from fedsilo.config import Partition

    parts = partition_indices(train.y.numpy(), hp["sites"], Partition.parse(partition), seed=seed)
    task = builtin_task("fashion-mnist", hp["model"])
    front = task.build_front()
    assert front is not None
    sites = [featurize(front, train.subset(p)) for p in parts]
    held_out = featurize(front, held_out)
    rates = [sample_rate(len(s), hp["batch_size"]) for s in sites]
    sigma = max(
        calibrate_noise(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=hp["rounds"])
        for q in rates
    )
    model = task.build(seed=seed)
    pooled = sum(min(hp["batch_size"], len(s)) for s in sites)
    trainer = DPTrainer(
        model,
        noise_multiplier=sigma,
        max_grad_norm=hp["max_grad_norm"],
        expected_batch_size=pooled,
        lr=hp["lr"],
        momentum=hp["momentum"],
        rng=SeededRandom(seed + 1),
    )
    curve = []
    for rnd in range(1, hp["rounds"] + 1):
        picks = [
            s.subset(trainer.rng.bernoulli_mask(len(s), q).nonzero(as_tuple=True)[0].numpy())
            for s, q in zip(sites, rates, strict=True)
        ]
        trainer.step(torch.cat([p.x for p in picks]), torch.cat([p.y for p in picks]))
        if rnd % max(1, hp["rounds"] // 10) == 0 or rnd == hp["rounds"]:
            curve.append(evaluate(model, held_out)[1])
    return {
        "accuracy": curve[-1],
        "epsilon": eps,
        "wall_s": time.monotonic() - t0,
        "per_round_accuracy": curve,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilons", default="1,3,8,none", help="comma list; `none` = no DP")
    p.add_argument("--partitions", default="iid,dirichlet:0.5")
    p.add_argument("--validate", action="store_true", help="tune: in-process, validation split")
    p.add_argument("--name", default="utility", help="results file name")
    for key, value in FM.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--nodp-lr", type=float, default=NODP_LR, help="lr of the no-DP baseline")
    p.add_argument(
        "--dp-max-sample-rate",
        type=float,
        default=0.0,
        help="--dp distributed: the rate the run's one noise multiplier is planned for; sites "
        "whose own rate is larger sample at it (default 0: the smallest site's, as simulate)",
    )
    p.add_argument(
        "--dp",
        default="local",
        choices=("local", "distributed"),
        help="the DP mode of the DP cells; distributed uses DIST's settings (one step per round)",
    )
    p.add_argument(
        "--update-codecs",
        default="float32",
        help="comma list of --update-codec values for the DP cells (local DP): float32, bf16, "
        "int8, or UPDATE:MODEL pairs that set --model-codec too (int8:int8); each row also "
        "gives the MB a site sent and received a round",
    )
    p.add_argument(
        "--precisions",
        default="fp32",
        help="comma list of --precision values for the DP cells (simulate): fp32, bf16, fp16",
    )
    args = p.parse_args(argv)
    if args.dp == "distributed":  # its own regime: flags left at FM's defaults take DIST's
        for key, value in DIST.items():
            if getattr(args, key) == FM[key]:
                setattr(args, key, value)
    hp = {k: getattr(args, k) for k in FM}
    hp["nodp_lr"] = args.nodp_lr
    hp["dp_max_sample_rate"] = args.dp_max_sample_rate
    rows = []
    for partition in args.partitions.split(","):
        for e, codec, precision in [
            (e, c, pr)
            for e in args.epsilons.split(",")
            for c in args.update_codecs.split(",")
            for pr in args.precisions.split(",")
        ]:
            eps = None if e == "none" else float(e)
            if (codec != "float32" or precision != "fp32") and (eps is None or args.validate):
                continue  # codecs and precisions are the product's: simulate cells only
            if args.validate and args.dp == "distributed" and eps is not None:
                res = distributed_in_process(partition, eps, hp)
                how = "in-process central step (validation)"
            elif eps is None or args.validate:
                res = fedavg_in_process(partition, eps, hp, validate=args.validate)
                how = "in-process FedAvg" + (" (validation)" if args.validate else "")
            else:
                res = simulate(partition, eps, hp, dp=args.dp, codec=codec, precision=precision)
                how = f"fedsilo simulate --dp {args.dp} --precision {precision}"
                how += f" --update-codec {res['update_codec']}"
                how += f" --model-codec {res['model_codec']}"
            row = {"partition": partition, "target_epsilon": e, **res, "how": how, **hp}
            rows.append(row)
            print(
                f"{partition} eps={e}: acc {res['accuracy']:.4f} "
                f"eps {res['epsilon']:.3f} {res['wall_s']:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    cols = ["partition", "target_epsilon", "accuracy", "epsilon", "min_epsilon", "rounds"]
    cols += ["mb_sent_per_site_round", "mb_received_per_site_round", "wall_s", "how"]
    print(markdown(rows, cols))
    path = write_json(args.name, {"rows": rows, "machine": machine(), "pid": os.getpid()})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
