"""Robust aggregation: combine a local-DP round's site models against hostile sites. No Flower.

A hostile site can send any well-formed model; under plain FedAvg one site sending its
update times -10 steers the global model wherever it likes. The rules here bound
what F hostile sites of n can do:

- `median`: the coordinate-wise median of the sites' models (unweighted).
- `trimmed-mean:F`: per coordinate, cut the F largest and the F smallest values and
  average the rest (unweighted; n >= 2F + 1).
- `krum:F`: multi-Krum (Blanchard et al., NeurIPS 2017): score each update by the sum
  of squared distances to its n - F - 2 nearest others, keep the n - F lowest scores
  and average them at their FedAvg weights (n >= 2F + 3).
- `norm-bound:B`: scale each site's update (its model minus the global model it was
  sent) to an L2 norm of at most B, then average at the FedAvg weights.

**No privacy cost.** With local DP every site's model is already a DP release (its
noise added at the site): whatever the server computes from the releases is
post-processing and spends nothing. With distributed DP the server sees only the
secure sum, so no rule here applies (fedsilo.config refuses them there).

Every rule works on updates (model minus the global model of the round), one tensor
at a time, so memory stays at n copies of the largest tensor. What a rule did to a
site is returned as a reason (`flagged`), kept in the round's record and the summary:
sites Krum left out, sites whose update norm-bound scaled down, and sites whose values
trimmed-mean cut in most coordinates. Tensors that are not floating point (counters)
take the global model's value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedsilo.config import Aggregation

State = dict[str, torch.Tensor]
Updates = Callable[[str], torch.Tensor]  # a key's updates, stacked by site (sites x shape)


def aggregate(
    rule: Aggregation,
    global_state: Mapping[str, torch.Tensor],
    models: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, int],
) -> tuple[State, dict[str, str]]:
    """The round's new global model under `rule`, and why each flagged site was flagged.

    Args:
        rule: a robust rule (not fedavg, which Flower's FedAvg computes).
        global_state: the model the round sent to every site.
        models: each replying site's model (the reply book validated its keys, shapes
            and dtypes against `global_state`), by site.
        weights: each site's FedAvg weight (fedsilo.server.strategy.bounded_weights).

    Raises:
        ValueError: fewer models than the rule needs (rule.min_replies).
    """
    sites = sorted(models)
    if len(sites) < rule.min_replies:
        raise ValueError(
            f"aggregation {rule} needs at least {rule.min_replies} replies, got {len(sites)}"
        )
    keys = [k for k, t in global_state.items() if torch.is_floating_point(t)]

    def updates(key: str) -> torch.Tensor:
        base = global_state[key].to(torch.float64)
        return torch.stack([models[s][key].to(torch.float64) - base for s in sites])

    if rule.kind in ("median", "trimmed-mean"):
        cut = rule.f if rule.kind == "trimmed-mean" else 0
        combined, cut_counts = {}, torch.zeros(len(sites), dtype=torch.int64)
        total = 0
        for key in keys:
            u = updates(key).reshape(len(sites), -1)
            combined[key], counts = _coordinatewise(u, rule.kind, cut)
            cut_counts += counts
            total += u.shape[1]
        # An honest site's values are cut in about 2F/n of the coordinates (its noise
        # makes it extreme at random); one far from the others, in nearly all. A site cut
        # in more than halfway from 2F/n to all of them is flagged.
        expected = 2 * cut / len(sites)
        flagged = {
            s: f"trimmed-mean:{cut} cut its values in {n / total:.0%} of coordinates "
            f"(an honest site's share is about {expected:.0%})"
            for s, n in zip(sites, cut_counts.tolist(), strict=True)
            if cut and total and n / total > (1 + expected) / 2
        }
        return _apply(global_state, combined), flagged
    if rule.kind == "krum":
        kept, flagged = _krum(sites, keys, updates, rule.f)
        return _apply(global_state, _mean(kept, keys, updates, sites, weights)), flagged
    if rule.kind == "norm-bound":
        norms = torch.zeros(len(sites), dtype=torch.float64)
        for key in keys:
            norms += updates(key).reshape(len(sites), -1).square().sum(dim=1)
        norms = norms.sqrt()
        scale = {
            s: min(1.0, rule.bound / n) if n > 0 else 1.0
            for s, n in zip(sites, norms.tolist(), strict=True)
        }
        flagged = {
            s: f"norm-bound:{rule.bound:g} scaled its update from norm {n:.3g} to {rule.bound:g}"
            for s, n in zip(sites, norms.tolist(), strict=True)
            if n > rule.bound
        }
        return _apply(global_state, _mean(sites, keys, updates, sites, weights, scale)), flagged
    raise ValueError(f"aggregation {rule} is not a robust rule")


def _coordinatewise(u: torch.Tensor, kind: str, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Median or trimmed mean over dim 0 of `u` (sites x coordinates), and how many of
    each site's coordinates were cut."""
    n = u.shape[0]
    values, order = u.sort(dim=0)
    if kind == "median":
        mid = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        return mid, torch.zeros(n, dtype=torch.int64)
    kept = values[cut : n - cut].mean(dim=0)
    counts = torch.zeros(n, dtype=torch.int64)
    if cut:
        trimmed = torch.cat([order[:cut], order[n - cut :]]).reshape(-1)
        counts = torch.bincount(trimmed, minlength=n)
    return kept, counts


def _krum(
    sites: list[str], keys: list[str], updates: Updates, f: int
) -> tuple[list[str], dict[str, str]]:
    """Multi-Krum's kept sites (the n - f lowest scores) and why the others were left out."""
    n = len(sites)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for key in keys:
        u = updates(key).reshape(n, -1)
        dist += torch.cdist(u, u).square()
    nearest = n - f - 2
    scores = dist.sort(dim=1).values[:, 1 : nearest + 1].sum(dim=1)  # [:, 0] is itself
    order = scores.argsort().tolist()
    kept = sorted(sites[i] for i in order[: n - f])
    worst_kept = max(scores[i].item() for i in order[: n - f])
    flagged = {
        sites[i]: f"krum:{f} left its update out: far from the others (score "
        f"{scores[i].item():.3g}; the largest kept {worst_kept:.3g})"
        for i in order[n - f :]
    }
    return kept, flagged


def _mean(
    chosen: list[str],
    keys: list[str],
    updates: Updates,
    sites: list[str],
    weights: Mapping[str, int],
    scale: Mapping[str, float] | None = None,
) -> State:
    """The weighted mean of the `chosen` sites' updates (each times its `scale`)."""
    total = sum(weights[s] for s in chosen)
    coef = torch.tensor(
        [weights[s] * (scale or {}).get(s, 1.0) / total if s in chosen else 0.0 for s in sites],
        dtype=torch.float64,
    )
    out = {}
    for key in keys:
        u = updates(key)
        out[key] = torch.tensordot(coef, u, dims=1)
    return out


def _apply(global_state: Mapping[str, torch.Tensor], combined: Mapping[str, torch.Tensor]) -> State:
    """The global model plus each combined update (in the model's dtypes and shapes)."""
    out = {}
    for key, base in global_state.items():
        if key in combined:
            out[key] = (base.to(torch.float64) + combined[key].reshape(base.shape)).to(base.dtype)
        else:
            out[key] = base.clone()
    return out
