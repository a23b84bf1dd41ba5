"""Run configuration: Flower run config parsed once, at the edge, into a frozen dataclass.

The keys are the kebab-case keys of `[tool.flwr.app.config]` in pyproject.toml;
`fedsilo simulate` flags map 1:1 onto them. Unknown keys and invalid values are
errors raised before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsilo.errors import ConfigError

DATASETS = ("digits", "fashion-mnist", "mnist")
MODELS = ("auto", "mlp", "cnn", "scatnet")
DEVICES = ("auto", "cpu", "cuda")
ACCOUNTANTS = ("prv", "rdp")
DP_MODES = ("local", "distributed")
# How a local-DP site's update, and the global model sent to it, cross the wire
# (fedsilo.task.codec)
UPDATE_CODECS = ("float32", "bf16", "int8")
PRECISIONS = ("fp32", "bf16", "fp16")  # fedsilo.task.train.PRECISIONS
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The most noise shares distributed DP may assume: the largest SecAgg+ neighbourhood a
# sparse graph guarantees (fedsilo.privacy.secagg); a larger dp-min-sites could never be met.
MAX_MIN_SITES = 63
MAX_SEED = 2**63 - 1  # seeds NumPy (>= 0) and torch (a 64-bit integer) both take


@dataclass(frozen=True)
class Partition:
    """How a dataset is split across simulated sites."""

    kind: str  # "iid" | "dirichlet" | "shards"
    alpha: float = 0.0  # Dirichlet concentration; smaller is more skewed
    shards: int = 0  # label-sorted shards per site

    @staticmethod
    def parse(text: str) -> Partition:
        """Parse `iid`, `dirichlet:ALPHA` or `shards:K`."""
        kind, _, arg = text.strip().partition(":")
        if kind == "iid" and not arg:
            return Partition("iid")
        if kind == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                alpha = math.nan
            if not alpha > 0 or not math.isfinite(alpha):
                raise ConfigError(
                    f"`partition` dirichlet alpha must be a number > 0. Found {text!r}; "
                    "use e.g. dirichlet:0.5."
                )
            return Partition("dirichlet", alpha=alpha)
        if kind == "shards":
            if not arg.isdigit() or int(arg) < 1:
                raise ConfigError(
                    f"`partition` shards must be an integer >= 1. Found {text!r}; "
                    "use e.g. shards:2."
                )
            return Partition("shards", shards=int(arg))
        raise ConfigError(f"Unknown `partition` {text!r}. Use iid, dirichlet:ALPHA or shards:K.")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        return "iid"


AGGREGATIONS = "fedavg, median, trimmed-mean:F, krum:F or norm-bound:B"


@dataclass(frozen=True)
class Aggregation:
    """How the server combines a local-DP round's site models (fedsilo.server.robust)."""

    kind: str  # "fedavg" | "median" | "trimmed-mean" | "krum" | "norm-bound"
    f: int = 0  # trimmed-mean: values cut at each end of a coordinate; krum: sites tolerated
    bound: float = 0.0  # norm-bound: the largest L2 norm of a site's update

    @staticmethod
    def parse(text: str) -> Aggregation:
        """Parse `fedavg`, `median`, `trimmed-mean:F`, `krum:F` or `norm-bound:B`."""
        kind, _, arg = text.strip().partition(":")
        if kind in ("fedavg", "median") and not arg:
            return Aggregation(kind)
        if kind in ("trimmed-mean", "krum"):
            if not arg.isdigit() or int(arg) < 1:
                raise ConfigError(
                    f"`aggregation` {kind}:F needs F, the hostile sites to tolerate, as an "
                    f"integer >= 1. Found {text!r}; use e.g. {kind}:1."
                )
            return Aggregation(kind, f=int(arg))
        if kind == "norm-bound":
            try:
                bound = float(arg)
            except ValueError:
                bound = math.nan
            if not (bound > 0 and math.isfinite(bound)):
                raise ConfigError(
                    f"`aggregation` norm-bound:B needs B, the largest L2 norm of a site's "
                    f"update, as a finite number > 0. Found {text!r}; use e.g. norm-bound:5."
                )
            return Aggregation(kind, bound=bound)
        raise ConfigError(f"Unknown `aggregation` {text!r}. Use {AGGREGATIONS}.")

    @property
    def min_replies(self) -> int:
        """The fewest replies the rule is defined on (and, for F, robust on)."""
        if self.kind == "trimmed-mean":
            return 2 * self.f + 1  # something left after cutting F at each end
        if self.kind == "krum":
            return 2 * self.f + 3  # Krum's n > 2F + 2 (Blanchard et al., 2017)
        return 1

    def __str__(self) -> str:
        if self.kind in ("trimmed-mean", "krum"):
            return f"{self.kind}:{self.f}"
        if self.kind == "norm-bound":
            return f"norm-bound:{self.bound:g}"
        return self.kind


@dataclass(frozen=True)
class RunConfig:
    """One federated run, as the server asks for it. Defaults are the `make demo` job."""

    task: str = ""  # PACKAGE.MODULE:OBJECT of a fedsilo.task.Task; "" = built-in (dataset, model)
    dataset: str = "digits"  # embedded in scikit-learn: works offline everywhere
    data_dir: str = ""  # "" = the dataset's default location
    model: str = "auto"  # auto = mlp for digits, scatnet (best under DP) for 28x28 images
    rounds: int = 3  # enough for digits to pass 70% at epsilon 8
    local_epochs: int = 2  # digits: 2 passes per round reach ~87% in 3 rounds at epsilon 8
    batch_size: int = 64  # expected Poisson batch; sample rate = batch / site examples
    lr: float = 1.0  # clipped, noised, averaged grads are small: DP-SGD wants a large lr
    momentum: float = 0.0  # plain DP-SGD by default; momentum is post-processing
    target_epsilon: float = 8.0  # per site, for the whole planned run
    target_delta: float = 1e-5  # well below 1 / (site examples) for the datasets here
    max_grad_norm: float = 1.0  # per-sample clip norm C
    accountant: str = "prv"  # PRV is tight; rdp is the conservative alternative
    partition: str = "iid"  # simulation only: how virtual sites split the dataset
    seed: int = 0  # model init and partitioning; sampling and noise only at simulated sites
    device: str = "auto"  # cuda when present, else cpu
    min_sites: int = 1  # the run stops cleanly below this many replying sites
    run_dir: str = ""  # "" = runs/<timestamp>
    eval_data: str = ""  # server only: held-out file in the site data format; "" = test split
    # fedsilo's identity of the run, chosen when it starts and kept when it resumes: sites
    # key their ledger spends and their fixed noise plan on it ("" = Flower's run id).
    run_id: str = ""
    resume: bool = False  # server only: continue RUN_DIR from its last completed round
    # local: every site adds all the noise its guarantee needs (trusts no one).
    # distributed: one DP-SGD step per round on the sites' pooled Poisson batch; each site
    # adds a share of the noise and secure aggregation hides all but the sum
    # (fedsilo.privacy.distributed); local-epochs is then not used.
    dp: str = "local"
    dp_min_sites: int = 0  # distributed: the honest sites whose noise shares the run assumes
    # distributed: the largest Poisson sampling rate any site uses (batch-size / the
    # smallest site's examples, at most 1). The run's one noise multiplier is calibrated
    # for it; a site whose own rate is larger samples at this one instead, so no site
    # spends more than planned. 0 = none (local DP, or not yet planned).
    dp_max_sample_rate: float = 0.0
    # distributed: the multiplier the secure sum carries, the same for every site:
    # calibrated once when the run is planned (fedsilo.privacy.distributed.planned) from
    # target-epsilon, target-delta, rounds and dp-max-sample-rate. 0 = local DP, or a run
    # not yet planned, which the server and the sites refuse.
    noise_multiplier: float = 0.0
    # How the server combines the sites' models (local DP): fedavg, or a robust rule
    # against hostile sites (fedsilo.server.robust). Post-processing of DP releases.
    aggregation: str = "fedavg"
    # How a local-DP site sends its model (fedsilo.task.codec): float32, the model; bf16 or
    # int8 (stochastic rounding), its update compressed. Post-processing of DP releases.
    update_codec: str = "float32"
    # How the server sends a local-DP site the global model (fedsilo.task.codec):
    # float32, or bf16 or int8 (round to nearest); the server keeps it in full precision.
    model_codec: str = "float32"
    # The sites' training arithmetic (fedsilo.task.train): fp32, or bf16/fp16 autocast
    # with the per-example norms, clipping and noise kept in float32 (DP's math).
    precision: str = "fp32"

    @property
    def distributed(self) -> bool:
        """Distributed DP (`dp` distributed): the run's one place that reads the mode's name."""
        return self.dp == "distributed"

    @property
    def partition_spec(self) -> Partition:
        return Partition.parse(self.partition)

    @property
    def aggregation_rule(self) -> Aggregation:
        return Aggregation.parse(self.aggregation)

    def to_flwr(self) -> dict[str, bool | int | float | str]:
        """The kebab-case Flower run config for this object."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def from_flwr(raw: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
        """Parse and validate a Flower run config (kebab-case keys)."""
        fields = {f.name: f for f in dataclasses.fields(RunConfig)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(k.replace("_", "-") for k in fields))
                raise ConfigError(f"Unknown key `{key}` in {source}. Known keys: {known}.")
            values[name] = _coerce(key, value, fields[name].type, source)
        missing = sorted(k.replace("_", "-") for k in fields if k not in values)
        if missing:
            # Never fill privacy parameters in silently: a site must train on what was asked.
            raise ConfigError(
                f"Missing key(s) {', '.join(missing)} in {source}. The fedsilo app manifest "
                "(pyproject.toml [tool.flwr.app.config]) defines them all; is it installed?"
            )
        cfg = RunConfig(**values)
        cfg.validate(source=source)
        return cfg

    def validate(self, *, source: str = "run config") -> None:
        """Raise ConfigError naming the first invalid value and the fix."""
        self._check_task(source)
        # The DP mode first: with --dp distributed min-sites defaults to dp-min-sites, so
        # a bad dp-min-sites is named as itself, not as min-sites.
        self._check_dp_mode(source)
        self._check_counts(source)
        self._check_training(source)
        try:
            self.partition_spec  # noqa: B018  (raises ConfigError when malformed)
            rule = self.aggregation_rule
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {source})") from None
        self._check_aggregation(rule, source)

    def _check_aggregation(self, rule: Aggregation, source: str) -> None:
        """A robust rule or an update codec: local DP only; enough replies for the rule."""
        if self.update_codec != "float32" and self.distributed:
            raise _bad(
                source,
                "update-codec",
                "float32 with --dp distributed",
                self.update_codec,
                "A distributed-DP site sends its noised gradient sum as integers of the secure "
                "sum's ring, never its model; the codecs compress local-DP updates. Drop "
                "--update-codec, or use --dp local.",
            )
        if self.model_codec != "float32" and self.distributed:
            raise _bad(
                source,
                "model-codec",
                "float32 with --dp distributed",
                self.model_codec,
                "A distributed-DP round's model step is taken from the secure sum alone; "
                "the model codecs serve local DP. Drop --model-codec, or use --dp local.",
            )
        if rule.kind != "fedavg" and self.distributed:
            raise _bad(
                source,
                "aggregation",
                "fedavg with --dp distributed",
                self.aggregation,
                "The server sees only the secure sum, never a site's update, so no robust "
                "rule can apply. What bounds a hostile site there: each site clips every "
                "example's gradient to max-grad-norm before summing, so one site moves the "
                "sum by at most its batch times that norm, and a site's reply outside the "
                "ring's range is refused. Use --dp local for a robust rule.",
            )
        if self.min_sites < rule.min_replies:
            raise _bad(
                source,
                "min-sites",
                f">= {rule.min_replies} with aggregation {rule}",
                self.min_sites,
                f"{rule.kind} is only defined (and robust to {rule.f} hostile sites) with at "
                f"least {rule.min_replies} replies in a round; raise min-sites or lower F.",
            )

    def _check_task(self, source: str) -> None:
        """The task (or the built-in dataset and model), the run id and the choices."""
        if self.task:
            module, sep, attr = self.task.partition(":")
            if not (sep and module and attr.isidentifier()):
                raise _bad(
                    source,
                    "task",
                    "PACKAGE.MODULE:OBJECT",
                    self.task,
                    "E.g. breast_cancer.task:task.",
                )
            if self.dataset != RunConfig.dataset or self.model != RunConfig.model:
                raise ConfigError(
                    f"`task` {self.task} brings its own data and model; drop `dataset` and "
                    f"`model` (found {self.dataset!r}, {self.model!r} in {source})."
                )
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            raise _bad(source, "run-id", "1-64 letters, digits, '-' or '_'", self.run_id)
        for key, value, allowed in (
            ("dataset", self.dataset, DATASETS),
            ("model", self.model, MODELS),
            ("device", self.device, DEVICES),
            ("accountant", self.accountant, ACCOUNTANTS),
            ("update-codec", self.update_codec, UPDATE_CODECS),
            ("model-codec", self.model_codec, UPDATE_CODECS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise _bad(source, key, f"one of {', '.join(allowed)}", value)

    def _check_counts(self, source: str) -> None:
        for key, value in (
            ("rounds", self.rounds),
            ("local-epochs", self.local_epochs),
            ("batch-size", self.batch_size),
            ("min-sites", self.min_sites),
        ):
            if value < 1:
                raise _bad(source, key, "an integer >= 1", value)
        if not 0 <= self.seed <= MAX_SEED:  # what NumPy's and torch's generators accept
            raise _bad(source, "seed", f"an integer in 0..{MAX_SEED}", self.seed)

    def _check_dp_mode(self, source: str) -> None:
        """The DP mode and the keys only distributed DP uses."""
        if self.dp not in DP_MODES:
            raise _bad(source, "dp", "local or distributed", self.dp)
        if not self.distributed:
            for key, given in (
                ("dp-min-sites", self.dp_min_sites),
                ("dp-max-sample-rate", self.dp_max_sample_rate),
                ("noise-multiplier", self.noise_multiplier),
            ):
                if given:
                    raise _bad(source, key, "0 with --dp local", given)
            return
        if self.dp_min_sites < 2:
            raise _bad(
                source,
                "dp-min-sites",
                "an integer >= 2 with --dp distributed",
                self.dp_min_sites,
                "It is how many sites' noise shares the guarantee assumes are in every sum "
                "(sites that do not drop out or collude with the server); e.g. the number "
                "of sites.",
            )
        if self.min_sites < self.dp_min_sites:
            raise _bad(
                source,
                "min-sites",
                f">= dp-min-sites ({self.dp_min_sites}) with --dp distributed",
                self.min_sites,
                "A round with fewer sites than the noise assumes is refused by the sites; "
                "raise min-sites.",
            )
        if self.dp_min_sites > MAX_MIN_SITES:
            raise _bad(
                source,
                "dp-min-sites",
                f"at most {MAX_MIN_SITES} with --dp distributed",
                self.dp_min_sites,
                f"Secure aggregation (SecAgg+) guarantees each site a neighbourhood of only "
                f"{MAX_MIN_SITES} sites, so no site could verify that a sum holds more noise "
                "shares; lower dp-min-sites.",
            )
        if not 0 < self.dp_max_sample_rate <= 1:
            raise _bad(
                source,
                "dp-max-sample-rate",
                "in (0, 1] with --dp distributed",
                self.dp_max_sample_rate,
                "It is the largest sampling rate any site uses: batch-size / the smallest "
                "site's examples (at most 1). The run's noise is calibrated for it.",
            )
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise _bad(
                source,
                "noise-multiplier",
                "a finite number >= 0 with --dp distributed (0 = not yet planned)",
                self.noise_multiplier,
            )

    def _check_training(self, source: str) -> None:
        """The optimiser and the DP-SGD parameters every site trains with."""
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad(source, "lr", "a number > 0", self.lr)
        if not 0 <= self.momentum < 1:
            raise _bad(source, "momentum", "in [0, 1)", self.momentum)
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise _bad(
                source,
                "target-epsilon",
                "a finite number > 0",
                self.target_epsilon,
                "Differential privacy cannot be turned off by a zero or infinite budget.",
            )
        if not 0 < self.target_delta < 1:
            raise _bad(
                source,
                "target-delta",
                "in (0, 1)",
                self.target_delta,
                "Use a value below 1 / (examples per site), e.g. 1e-5.",
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise _bad(source, "max-grad-norm", "a finite number > 0", self.max_grad_norm)


def _bad(source: str, key: str, rule: str, value: object, fix: str = "") -> ConfigError:
    """`key` must be `rule`: the error for an invalid value, with its fix."""
    msg = f"`{key}` must be {rule}. Found {value!r} in {source}."
    return ConfigError(f"{msg} {fix}".strip())


def check_port(port: int, *, flag: str) -> int:
    """`port` when it is a TCP port a server can listen on and a site can dial (1..65535)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"`{flag}` must be a port number in 1..65535. Found {port}.")
    return port


def new_run_id() -> str:
    """A fresh run identity: 128 random bits, so no two runs a site trains share one."""
    return secrets.token_hex(16)


def _coerce(key: str, value: Any, type_name: Any, source: str) -> Any:
    """Coerce a TOML/CLI value to the field's declared type, or raise ConfigError."""
    target = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"`{key}` must be of type {target.__name__}. Found {value!r} in {source}.")
