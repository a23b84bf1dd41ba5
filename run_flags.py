"""The run config as the commands build it: one set of flags, one builder, one resume rule.

`fedsilo simulate` and `fedsilo server start` build every RunConfig here, in layers:
the defaults (RunConfig's, and the command's min-sites), then a run-config file
(`server start --config`), then the flags the user gave. Every run flag is declared
once, in FLAGS, and defaults to None so that a flag the user gave is told from one
they did not, whatever its value.

On `--resume RUN_DIR` the recorded config.json takes the defaults' and the file's
place. Every run-config field but one was fixed when the run started (its sites'
noise plans and ledgers depend on it): a flag equal to the recorded value is
accepted, one that differs is an error naming it and the recorded value. `--rounds`
may grow (local DP): the ServerApp records the new plan, and each site trains the
extra rounds, at the noise it planned, only if its policy allows more rounds
(allow-more-rounds) and they fit its budget. Where the sites run (`simulate
--ray-address`) is not part of the run config and may change.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.config import DP_MODES, PRECISIONS, UPDATE_CODECS, Aggregation, RunConfig, new_run_id
from fedsilo.errors import ConfigError
from fedsilo.privacy.distributed import planned
from fedsilo.server.run_dir import default_run_dir

DEFAULTS = RunConfig()
# Keys fedsilo sets itself, never a user's flag or file.
MANAGED = {
    "run-id": "a new run gets a fresh run id",
    "resume": "a new run gets a fresh run id",
    "noise-multiplier": "it is calibrated from target-epsilon, rounds and dp-max-sample-rate",
}


@dataclass(frozen=True)
class Flag:
    """One run-config key as a command-line flag."""

    key: str  # the run-config key; the flag is --KEY
    group: str  # "task", "dp" or "run": the --help section
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    simulation_only: bool = False  # not offered by `server start`
    deployment_only: bool = False  # not offered by `simulate`

    @property
    def name(self) -> str:
        return self.key.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag(
        "task",
        "task",
        "your own model and data: an installed fedsilo.task.Task, e.g. "
        "breast_cancer.task:task (installed here and at every site); default: the built-in "
        "task --dataset and --model name",
        metavar="PACKAGE.MODULE:OBJECT",
    ),
    Flag("dataset", "task", "built-in task: digits (embedded), fashion-mnist or mnist (IDX files)"),
    Flag("data-dir", "task", "directory of IDX files (default: /usr/share/datasets/<dataset>)"),
    Flag(
        "model",
        "task",
        "built-in task's model: auto (scatnet for 28x28 images, mlp for digits), mlp, cnn or "
        "scatnet",
    ),
    Flag(
        "partition",
        "task",
        "iid, dirichlet:ALPHA (non-IID labels) or shards:K",
        simulation_only=True,
    ),
    Flag(
        "eval-data",
        "task",
        "central evaluation on this file (the task's site data format); default: the task's "
        "public test split",
        deployment_only=True,
    ),
    Flag("rounds", "task", "federated rounds"),
    Flag("local-epochs", "task", "passes over a site's data per round (local DP)"),
    Flag("batch-size", "task", "expected Poisson batch size per step"),
    Flag("lr", "task", "learning rate"),
    Flag("momentum", "task", "SGD momentum"),
    Flag("target-epsilon", "dp", "each site's epsilon for the whole run"),
    Flag("target-delta", "dp", "each site's delta"),
    Flag("max-grad-norm", "dp", "per-sample clip norm C"),
    Flag("accountant", "dp", "prv (tight) or rdp"),
    Flag(
        "dp",
        "dp",
        "local: each site adds all the noise its guarantee needs and trusts no one. "
        "distributed: secure aggregation (SecAgg+) and a noise share per site (each site must "
        "allow it in its policy, distributed-min-sites): the server sees only the sum, which "
        "carries central DP-SGD's noise if at least --dp-min-sites sites take part and none "
        "colludes with the server; one DP-SGD step per round (--local-epochs unused), so use "
        "many rounds and a large --batch-size",
        choices=DP_MODES,
    ),
    Flag(
        "dp-min-sites",
        "dp",
        "with --dp distributed: the honest sites whose noise shares every sum must hold; each "
        "site adds 1/M of the noise variance (default: --min-sites if given, else every site)",
        metavar="M",
    ),
    Flag(
        "dp-max-sample-rate",
        "dp",
        "with --dp distributed: the largest Poisson sampling rate any site uses, batch-size / "
        "the smallest site's examples (at most 1). The sum carries one noise multiplier, the "
        "same for every site, calibrated once for this rate; a site whose own rate is larger "
        "samples at Q instead, so none spends more than planned (simulate: default from the "
        "partition; server start: required)",
        metavar="Q",
    ),
    Flag(
        "min-sites",
        "dp",
        "the run stops when fewer sites reply in a round (default: simulate 1, server start "
        "every site of the kit; with --dp distributed, --dp-min-sites: a smaller sum would "
        "not carry the assumed noise)",
        metavar="N",
    ),
    Flag(
        "aggregation",
        "robust",
        "fedavg; or against hostile sites, with --dp local: median (coordinate-wise), "
        "trimmed-mean:F (cut the F largest and smallest values of each coordinate), krum:F "
        "(average the n-F updates closest to the others) or norm-bound:B (scale each site's "
        "update to an L2 norm of at most B). The server applies it to the sites' already "
        "noised models: post-processing, no privacy cost. min-sites defaults to what the "
        "rule needs (2F+1, 2F+3)",
        metavar="RULE",
    ),
    Flag(
        "update-codec",
        "run",
        "how a site sends its model, with --dp local: float32 (the model itself), bf16 (its "
        "update, half the bytes) or int8 (its update per tensor: a scale and stochastically "
        "rounded 8-bit values, unbiased; a quarter of the bytes). The site compresses its "
        "already-noised model: post-processing, no privacy cost",
        choices=UPDATE_CODECS,
    ),
    Flag(
        "model-codec",
        "run",
        "how the server sends each site the global model, with --dp local: float32, bf16 "
        "(half the bytes) or int8 (per tensor: a scale and 8-bit values rounded to nearest; "
        "a quarter). The server keeps its model in full precision and makes up the "
        "rounding when it aggregates, so the error never builds up over rounds",
        choices=UPDATE_CODECS,
    ),
    Flag(
        "precision",
        "run",
        "the sites' training arithmetic: fp32; bf16 (autocast: CPUs with bf16 support and "
        "GPUs) or fp16 (GPUs only). The per-example norms, clipping and noise stay in "
        "float32, so no clipped gradient exceeds --max-grad-norm",
        choices=PRECISIONS,
    ),
    Flag("seed", "run", "model initialisation and partitioning"),
    Flag("device", "run", "auto, cpu or cuda"),
)
GROUPS = {
    "task": "task",
    "dp": "differential privacy (per site, for the whole run)",
    "robust": "robust aggregation (hostile sites)",
    "run": "run",
}


def add_run_flags(parser: argparse.ArgumentParser, *, simulation: bool) -> None:
    """Add every run flag `simulate` (or `server start`) offers, in its --help group."""
    groups = {g: parser.add_argument_group(title) for g, title in GROUPS.items()}
    for flag in FLAGS:
        if (flag.simulation_only and not simulation) or (flag.deployment_only and simulation):
            continue
        default = getattr(DEFAULTS, flag.name)
        explained = default == "" or flag.key in ("min-sites", "dp-min-sites", "dp-max-sample-rate")
        shown = "" if explained else f" (default {default})"
        groups[flag.group].add_argument(
            f"--{flag.key}",
            type={"int": int, "float": float}.get(str(_field(flag.name).type), str),
            default=None,
            metavar=flag.metavar,
            choices=flag.choices,
            help=flag.help + shown,
        )


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The run flags the user gave (kebab-case keys), paths made absolute."""
    values = {
        f.key: getattr(args, f.name) for f in FLAGS if getattr(args, f.name, None) is not None
    }
    if "eval-data" in values:
        values["eval-data"] = str(Path(values["eval-data"]).resolve())
    if getattr(args, "out", None):
        values["run-dir"] = str(Path(args.out).resolve())
    return values


@dataclass(frozen=True)
class Layer:
    """Run-config values (kebab-case keys) from one source, named in errors."""

    values: Mapping[str, Any]
    source: str


def build(
    *layers: Layer,
    sites: int,
    min_sites: int,
    sample_rate: Callable[[RunConfig], float] | None = None,
) -> RunConfig:
    """A new run's config, validated and planned: RunConfig's defaults, then `layers`
    in order (later wins).

    Args:
        sites: the sites the run has (the kit's, or the simulation's): distributed DP's
            default dp-min-sites when no layer sets it or min-sites.
        min_sites: the command's default min-sites (local DP; with distributed DP the
            default is dp-min-sites).
        sample_rate: dp-max-sample-rate for a distributed run no layer gave it to (from
            the sites' data); None: it must be given.
    """
    values: dict[str, Any] = DEFAULTS.to_flwr()
    for layer in layers:
        for key in layer.values:
            if key not in values:
                known = ", ".join(sorted(values))
                raise ConfigError(f"Unknown key `{key}` in {layer.source}. Known keys: {known}.")
            if key in MANAGED:
                raise ConfigError(
                    f"`{key}` is fedsilo's to set ({MANAGED[key]}); drop it from "
                    f"{layer.source}. To continue a run use --resume RUN_DIR."
                )
        values.update(layer.values)
    chosen = {key for layer in layers for key in layer.values}
    source = " and ".join(layer.source for layer in layers) or "the defaults"
    distributed = values["dp"] == "distributed"
    if distributed and "dp-min-sites" not in chosen:
        values["dp-min-sites"] = values["min-sites"] if "min-sites" in chosen else sites
    if "min-sites" not in chosen:
        values["min-sites"] = (
            values["dp-min-sites"] if distributed else max(min_sites, _rule_min(values))
        )
    values["run-id"] = new_run_id()
    values["run-dir"] = str(Path(values["run-dir"] or default_run_dir()).resolve())
    if distributed and not values["dp-max-sample-rate"]:
        if sample_rate is None:
            raise ConfigError(
                "--dp distributed needs --dp-max-sample-rate: the largest Poisson sampling "
                "rate any site uses, batch-size / the smallest site's examples (e.g. "
                "batch-size 64 and a smallest site of 1,000 examples: 0.064). The run's one "
                "noise multiplier is calibrated for it, so that no site spends more than "
                "target-epsilon; a site whose own rate is larger samples at this rate instead."
            )
        # Everything else is checked before the sites' data is read for the rate.
        probe = RunConfig.from_flwr({**values, "dp-max-sample-rate": 1.0}, source=source)
        values["dp-max-sample-rate"] = sample_rate(probe)
    return planned(RunConfig.from_flwr(values, source=source))


def resume(recorded: RunConfig, flags: Layer, *, run_dir: Path) -> RunConfig:
    """The recorded config of the run in `run_dir`, with more rounds if `flags` ask.

    Raises:
        ConfigError: a flag that differs from the recorded value (each named with both),
            fewer rounds, or more rounds for distributed DP.
    """
    before = recorded.to_flwr()
    changed = {k: v for k, v in flags.values.items() if k != "run-dir" and v != before[k]}
    if "run-dir" in flags.values and Path(flags.values["run-dir"]) != run_dir:
        changed["run-dir"] = flags.values["run-dir"]
    rounds = changed.pop("rounds", recorded.rounds)
    if changed:
        said = [
            f"--{'out' if k == 'run-dir' else k} {v} (recorded: {before[k]})"
            for k, v in changed.items()
        ]
        raise ConfigError(
            f"--resume continues {run_dir} with the settings it recorded; "
            f"{', '.join(said)} would change what was fixed when the run started (its "
            "sites' noise plans and ledgers depend on it). Drop "
            f"{'it' if len(said) == 1 else 'them'}, or start a new run."
        )
    if rounds < recorded.rounds:
        raise ConfigError(
            f"--rounds {rounds} is fewer than the {recorded.rounds} rounds {run_dir} "
            "recorded; a resumed run's rounds may only grow. Drop --rounds to finish the run "
            "as planned."
        )
    if rounds > recorded.rounds and recorded.distributed:
        raise ConfigError(
            f"--rounds {rounds}: a distributed-DP run keeps the {recorded.rounds} rounds it "
            "recorded, since its one noise multiplier was calibrated, and checked by every "
            "site, for them. Drop --rounds, or start a new run."
        )
    return dataclasses.replace(recorded, rounds=rounds)


def _rule_min(values: Mapping[str, Any]) -> int:
    """The replies the aggregation rule needs (1 for one that does not parse: refused later)."""
    try:
        return Aggregation.parse(str(values["aggregation"])).min_replies
    except ConfigError:
        return 1


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(RunConfig) if f.name == name)
