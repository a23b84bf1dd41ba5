"""A site's DP training round: plan, calibrate, train, account. No Flower.

Local DP: the noise multiplier is calibrated once per run, by the site, so that its
whole planned training (rounds x local epochs x steps per epoch), composed with
whatever it had already spent, stays within `target-epsilon` at `target-delta`.
Distributed DP: the noise multiplier is the run's (`noise-multiplier`, calibrated once
when the run was planned, fedsilo.privacy.distributed.planned), the same at every
site; the site samples at its own rate, at most `dp-max-sample-rate`, and checks that
the run's noise keeps that rate within the target before it spends. Every round
appends one SampledGaussianEvent; the reported epsilon is recomputed from all
events, so it accumulates across rounds and process restarts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.privacy.accountant import calibrate_noise, epsilon
from fedsilo.privacy.distributed import (
    Quantizer,
    check_run_noise,
    check_shares,
    noisy_integer_sum,
)
from fedsilo.privacy.events import SampledGaussianEvent
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.task.api import Task
from fedsilo.task.data import Dataset
from fedsilo.task.features import cached_features
from fedsilo.task.rng import SiteRandom
from fedsilo.task.train import (
    DPTrainer,
    check_private_state,
    resolve_device,
    sample_rate,
    steps_per_epoch,
)


@dataclass(frozen=True)
class DPPlan:
    """The site's DP schedule for one run, fixed at its first round."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, object]) -> DPPlan:
        return DPPlan(
            noise_multiplier=float(str(d["noise_multiplier"])),
            sample_rate=float(str(d["sample_rate"])),
            steps_per_round=int(str(d["steps_per_round"])),
            rounds=int(str(d["rounds"])),
        )


@dataclass(frozen=True)
class RoundResult:
    """What a site reports after one round."""

    state_dict: dict[str, torch.Tensor]
    examples: int
    event: SampledGaussianEvent
    epsilon: float  # cumulative, over every event including this round's


# The most DP-SGD steps one run may plan: calibrating 10^5 steps takes seconds, 10^6
# a minute, and 4 * 10^9 (--local-epochs 100000000) exhausts memory in the accountant.
MAX_RUN_STEPS = 100_000


def plan_run(cfg: RunConfig, n_examples: int, prior: Sequence[SampledGaussianEvent]) -> DPPlan:
    """The site's plan for the run: local DP calibrates sigma so prior spend plus this
    run's planned steps fit the target; distributed DP takes the run's (`run_plan`).

    Raises:
        ConfigError: the run plans more than MAX_RUN_STEPS steps.
        PrivacyError: distributed DP whose run noise does not keep this site within target.
    """
    if cfg.distributed:
        return run_plan(cfg, n_examples)
    q = sample_rate(n_examples, cfg.batch_size)
    per_round = steps_per_round(cfg, n_examples)
    if per_round * cfg.rounds > MAX_RUN_STEPS:
        raise ConfigError(
            f"The run plans {per_round * cfg.rounds:,} DP-SGD steps at a site of "
            f"{n_examples:,} examples (rounds {cfg.rounds} x local-epochs {cfg.local_epochs} "
            f"x {steps_per_epoch(n_examples, cfg.batch_size)} steps per epoch); fedsilo plans "
            f"at most {MAX_RUN_STEPS:,}. Lower --rounds or --local-epochs, or raise --batch-size."
        )
    sigma = calibrate_noise(
        target_epsilon=cfg.target_epsilon,
        delta=cfg.target_delta,
        sample_rate=q,
        steps=per_round * cfg.rounds,
        accountant=cfg.accountant,
        prior=prior,
    )
    return DPPlan(
        noise_multiplier=sigma, sample_rate=q, steps_per_round=per_round, rounds=cfg.rounds
    )


def run_plan(cfg: RunConfig, n_examples: int) -> DPPlan:
    """A distributed-DP site's plan: the run's noise multiplier, one step a round, at the
    site's own sample rate capped at dp-max-sample-rate; refused before any spend unless
    the run's noise keeps that rate within target-epsilon over the planned rounds.

    Raises:
        PrivacyError: the run config carries no noise multiplier, or one too small.
    """
    q = site_sample_rate(cfg, n_examples)
    check_run_noise(cfg, sample_rate=q)
    return DPPlan(
        noise_multiplier=cfg.noise_multiplier, sample_rate=q, steps_per_round=1, rounds=cfg.rounds
    )


def site_sample_rate(cfg: RunConfig, n_examples: int) -> float:
    """The site's Poisson sampling rate: batch-size / its examples (at most 1); with
    distributed DP at most dp-max-sample-rate, the rate the run's noise was planned for."""
    q = sample_rate(n_examples, cfg.batch_size)
    return min(q, cfg.dp_max_sample_rate) if cfg.distributed else q


def steps_per_round(cfg: RunConfig, n_examples: int) -> int:
    """DP-SGD steps a round takes: local-epochs x round(N / batch-size); 1 with distributed DP."""
    if cfg.distributed:
        return 1
    return cfg.local_epochs * steps_per_epoch(n_examples, cfg.batch_size)


def feature_cache_dir(ledger_path: Path) -> Path:
    """Where a site keeps features of its own data between rounds: beside its ledger.

    It holds derived data of the site's examples, so it lives with the site's other
    private state, on the site, never sent anywhere.
    """
    return ledger_path.parent / "feature-cache"


def site_model(
    cfg: RunConfig, task: Task, global_state: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """The run's model, with the global weights when given."""
    model = task.build(seed=cfg.seed)
    if global_state is not None:
        model.load_state_dict(dict(global_state))
    return model


# Fronts built in this process: (task name, front factory) -> (factory, front, key). A
# front is fixed and parameter-free, so one object serves every round; building
# scatnet's filters takes ~0.07 s, which a distributed-DP round (one step) would pay.
_FRONTS: dict[tuple[str, int], tuple[object, nn.Module, str]] = {}


def _front(task: Task) -> tuple[nn.Module, str] | None:
    """The task's fixed front and its cache key, built once per process."""
    if task.front is None:
        return None
    memo = (task.name, id(task.front))
    if memo not in _FRONTS or _FRONTS[memo][0] is not task.front:
        front = task.build_front()
        assert front is not None
        if len(_FRONTS) >= 8:
            _FRONTS.clear()
        _FRONTS[memo] = (task.front, front, task.front_key(front))
    _, front, key = _FRONTS[memo]
    return front, key


def site_trainer(
    cfg: RunConfig,
    task: Task,
    data: Dataset,
    plan: DPPlan,
    rng: SiteRandom,
    global_state: Mapping[str, torch.Tensor] | None = None,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    data_id: str | None = None,
    mmap: bool = False,
) -> tuple[nn.Module, DPTrainer, Dataset]:
    """The site's model, its DP-SGD trainer, and the data it trains on.

    A task with a fixed front (scatnet) trains its model on the front's features,
    computed once per dataset and kept in `cache_dir` across rounds; other tasks train
    on `data`. Either way each example is one row, so Poisson sampling, clipping and
    the accounting are unchanged. `data_id`: the data's fingerprint
    (fedsilo.privacy.fingerprint), when the caller has computed it; the cache is named
    after it. `device`: the site's choice (auto, cpu or cuda).
    """
    model = site_model(cfg, task, global_state)
    check_private_state(model)  # everything in the state dict is sent
    where = resolve_device(device)
    built = _front(task)
    if built is not None:
        front, key = built
        data_id = data_id or (fingerprint(data) if cache_dir is not None else "")
        data = cached_features(
            front,
            data,
            cache_dir,
            front_key=key,
            data_id=data_id,
            device=where,
            mmap=mmap,
        )
    trainer = DPTrainer(
        model,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        rng=rng,
        device=where,
        loss=task.loss,
        precision=cfg.precision,
    )
    return model, trainer, data


def train_round(
    cfg: RunConfig,
    task: Task,
    data: Dataset,
    global_state: Mapping[str, torch.Tensor],
    plan: DPPlan,
    prior: Sequence[SampledGaussianEvent],
    rng: SiteRandom,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    data_id: str | None = None,
) -> RoundResult | DistributedResult:
    """Train one round from the global model with DP-SGD, and account for it.

    With distributed DP (cfg.dp) the round is one step whose result is the site's
    contribution to the secure sum (`DistributedResult`), not a model.
    """
    distributed = cfg.distributed
    model, trainer, train_data = site_trainer(
        cfg,
        task,
        data,
        plan,
        rng,
        global_state,
        device=device,
        cache_dir=cache_dir,
        data_id=data_id,
        mmap=distributed,  # one Poisson batch per round: read only its rows
    )
    if distributed:
        return _distributed_step(cfg, model, trainer, train_data, plan, prior, rng, len(data))
    stats = trainer.train_epochs(train_data, cfg.local_epochs)
    event = SampledGaussianEvent(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=stats.steps
    )
    eps = epsilon([*prior, event], delta=cfg.target_delta, accountant=cfg.accountant)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return RoundResult(state_dict=state, examples=len(data), event=event, epsilon=eps)


@dataclass(frozen=True)
class DistributedResult:
    """A site's distributed-DP contribution for one round: never leaves the site unmasked."""

    vector: np.ndarray  # int64: quantized clipped-gradient sum plus the site's noise share
    examples: int
    event: SampledGaussianEvent
    epsilon: float


def flat_parameters(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """The order distributed DP flattens a model's parameters in: its state dict's."""
    params = dict(model.named_parameters())
    return [(k, params[k].shape) for k in model.state_dict() if k in params]


def _distributed_step(
    cfg: RunConfig,
    model: nn.Module,
    trainer: DPTrainer,
    train_data: Dataset,
    plan: DPPlan,
    prior: Sequence[SampledGaussianEvent],
    rng: SiteRandom,
    examples: int,
) -> DistributedResult:
    """One distributed-DP step: the clipped gradient sum of a Poisson batch, quantized, plus
    this site's discrete Gaussian noise share (fedsilo.privacy.distributed)."""
    order = flat_parameters(model)
    if len(order) != len(model.state_dict()):
        raise ConfigError(
            "distributed DP sums gradients of parameters only; this model's state dict holds "
            "other tensors too."
        )
    quantizer = Quantizer(dim=sum(math.prod(shape) for _, shape in order), clip=cfg.max_grad_norm)
    share = check_shares(quantizer, plan.noise_multiplier, cfg.dp_min_sites)
    idx = rng.bernoulli_mask(len(train_data), plan.sample_rate).nonzero(as_tuple=True)[0]
    params = dict(model.named_parameters())
    model.train()
    if idx.numel():
        x = train_data.x[idx].to(trainer.device)
        y = train_data.y[idx].to(trainer.device)
        sums, _, _ = trainer.clipped_grad_sums(x, y)
        flat = torch.cat([sums[params[k]].reshape(-1).cpu() for k, _ in order])
    else:  # an empty Poisson batch: the site still sends its noise share
        flat = torch.zeros(quantizer.dim)
    vector = noisy_integer_sum(flat, quantizer, share, rng)
    event = SampledGaussianEvent(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=1
    )
    eps = epsilon([*prior, event], delta=cfg.target_delta, accountant=cfg.accountant)
    return DistributedResult(vector, examples, event, eps)
