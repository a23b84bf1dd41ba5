"""Aggregation: FedAvg over the reply book's valid replies, at bounded weights.

`SiteReports` wraps any Flower strategy (as Flower's DP wrappers do): it hands the
wrapped strategy only the replies the reply book (fedsilo.server.replies.ReplyBook:
names from identities, validation, failures and refusals) accepted, ordered by site
name (deterministic aggregation), each weighed by `bounded_weights`.

**A site cannot inflate its weight.** FedAvg weighs a site by its example count,
which the site reports. The count a site reports in its first accepted round is its
*commitment* for the run; later rounds weigh it by min(reported, committed), and no
site weighs more than WEIGHT_CAP_RATIO times the median commitment of the round's
sites. A site claiming 10^12 examples thus moves the average at most as much as
WEIGHT_CAP_RATIO ordinary sites would (with at least three sites; with one or two,
a median is no bound and each such site simply gets its share).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import numpy
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedsilo import protocol
from fedsilo.config import Aggregation
from fedsilo.flwr_adapter.arrays import tensor_views
from fedsilo.server import robust
from fedsilo.server.records import Failure, Flagged, Refusal, RoundRecord
from fedsilo.server.replies import Codec, InvalidReply, ReplyBook, SiteReport, Spec, spec_of
from fedsilo.task import codec

FEDAVG = Aggregation("fedavg")
WEIGHT_CAP_RATIO = 4.0  # no site weighs more than 4x the median site of its round


def bounded_weights(reports: Sequence[SiteReport], committed: Mapping[str, int]) -> dict[str, int]:
    """Each site's FedAvg weight in a round: min(reported, committed, cap), at least 1.

    The cap is WEIGHT_CAP_RATIO times the median commitment of the round's sites when
    there are at least three; with one or two a median bounds nothing and there is none.

    Args:
        reports: the round's accepted reports, one per site; `examples` is its reported count.
        committed: each site's commitment (its first accepted count), for every site
            in `reports`.

    Returns:
        The weight of each site of `reports`, by site.

    Raises:
        InvalidReply: a site has two reports or no commitment, or a count is not an
            integer >= 1 (the reply book never accepts such a reply).
    """
    counts: dict[str, tuple[int, int]] = {}
    for report in reports:
        site = report.site
        if site in counts:
            raise InvalidReply(f"site {site!r} has two reports in one round")
        if site not in committed:
            raise InvalidReply(f"site {site!r} has no committed example count")
        for what, count in (("reported", report.examples), ("committed", committed[site])):
            if type(count) is not int or count < 1:
                raise InvalidReply(
                    f"site {site!r}'s {what} example count must be an integer >= 1, not {count!r}"
                )
        counts[site] = (report.examples, committed[site])
    cap = math.inf
    if len(counts) >= 3:
        cap = WEIGHT_CAP_RATIO * statistics.median(c for _, c in counts.values())
    return {site: max(1, int(min(r, c, cap))) for site, (r, c) in counts.items()}


def weighed(reply: Message, weight: int) -> Message:
    """A copy of `reply` that FedAvg weighs by `weight`; the site's own reply stays as sent."""
    sent = cast(MetricRecord, reply.content[protocol.METRICS])  # the book checked its type
    metrics = MetricRecord(dict(sent))
    metrics[protocol.NUM_EXAMPLES] = weight
    content = RecordDict({**dict(reply.content), protocol.METRICS: metrics})
    out = copy.copy(reply)
    out.content = content
    return out


def streams(strategy: Strategy) -> bool:
    """Whether SiteReports may average the models itself (`weighted_mean`): the wrapped
    strategy is FedAvg with FedAvg's own aggregation (a subclass that changes it, a
    server optimiser say, aggregates as it defines)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def weighted_mean(
    shares: Iterable[tuple[float, Message]], model: Callable[[Message], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """FedAvg's weighted mean of the replies' models, one reply at a time, in place.

    Each reply's model is read (decoded from its update codec) only when its turn
    comes, scaled in place and added to the running sum, then dropped: the server holds
    the replies as they came (their wire bytes), the sum, and one model, never every
    site's model at once (a 67 M-parameter float32 model is 270 MB a site). The result
    is bit for bit Flower's `aggregate_arrayrecords` (value * share, summed in reply
    order in the arrays' dtype; integer arrays as numpy promotes them, to float64).
    `model` returns tensors of its own (they are scaled in place).
    """
    total: dict[str, torch.Tensor] = {}
    for share, msg in shares:  # a reply's model lives only in the call: dropped before the next
        _add_scaled(total, model(msg), share)
    return total


def decoded_mean(
    shares: Iterable[tuple[float, Message]], decoder: Codec
) -> dict[str, torch.Tensor]:
    """`weighted_mean` of replies sent under an update codec, decoding each coded tensor a
    piece at a time into the running sum (Codec.pieces): the server holds the replies'
    wire tensors, the sum and one piece, never a decoded model (a 67 M-parameter model is
    270 MB). Bit for bit `weighted_mean` of the decoded models: the same operations on
    each value, in the same order."""
    total: dict[str, torch.Tensor] = {}
    for share, msg in shares:
        wire = cast(ArrayRecord, msg.content[protocol.ARRAYS]).to_torch_state_dict()
        for key, ref in decoder.global_state.items():
            if not decoder.coded(key):
                _add_scaled(total, {key: wire[key]}, share)
                continue
            first = key not in total
            if first:
                total[key] = torch.empty(ref.shape, dtype=ref.dtype)
            flat = total[key].view(-1)
            for start, piece in decoder.pieces(wire, key):
                piece.mul_(share)
                if first:
                    flat[start : start + piece.numel()] = piece
                else:
                    flat[start : start + piece.numel()].add_(piece)
    return total


def _add_scaled(
    total: dict[str, torch.Tensor], state: dict[str, torch.Tensor], share: float
) -> None:
    """total += state * share, key by key (`state`'s float tensors are scaled in place)."""
    for key, tensor in state.items():
        if tensor.is_floating_point():
            part = tensor.mul_(share)
        else:  # numpy: an integer array times a Python float is float64
            part = torch.from_numpy(numpy.asarray(tensor.numpy() * share))
        if key in total:
            total[key].add_(part)
        else:
            total[key] = part


class SiteReports(Strategy):
    """Wrap a strategy: aggregate the reply book's valid replies at bounded weights."""

    def __init__(
        self,
        inner: FedAvg,
        names: Callable[[], Mapping[int, str]] | None = None,
        rule: Aggregation = FEDAVG,
        update_codec: str = "float32",
        model_codec: str = "float32",
    ) -> None:
        """`names()` maps authenticated node ids to site names (re-read for unknown nodes);
        `rule` combines the replies (fedavg: `inner`'s; else fedsilo.server.robust, with
        `inner`'s weighted mean of the metrics); `update_codec` is how sites send their
        models (fedsilo.task.codec): replies are decoded before anything reads them;
        `model_codec` is how the global model goes to them."""
        self.inner = inner
        self.book = ReplyBook(names)
        self.rule = rule
        self.update_codec = update_codec
        self.model_codec = model_codec
        self._sent: list[Message] = []  # this round's train messages (ids set on sending)
        self._spec: Spec = {}
        self._global: ArrayRecord | None = None  # the model this round sent, as sites read it
        # The full-precision model minus the one sites read (model_codec's rounding),
        # added back to what the round aggregates.
        self._shift: dict[str, torch.Tensor] = {}

    # The book's records, as the run's metrics lines and summary read them.

    @property
    def reports(self) -> Mapping[str, SiteReport]:
        return self.book.reports

    @property
    def failures(self) -> Sequence[Failure]:
        return self.book.failures

    @property
    def refusals(self) -> Sequence[Refusal]:
        return self.book.refusals

    @property
    def last_round_sites(self) -> Sequence[str]:
        return self.book.last_round_sites

    @property
    def flagged(self) -> Sequence[Flagged]:
        return self.book.flagged

    @property
    def committed(self) -> Mapping[str, int]:
        return self.book.committed

    def restore(self, records: Iterable[RoundRecord]) -> None:
        """Take up where a stopped server left off (ReplyBook.restore)."""
        self.book.restore(records)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._spec = spec_of(arrays)
        self._global, self._shift, sent = arrays, {}, arrays
        if self.model_codec != "float32":
            state = tensor_views(arrays)
            wire = codec.encode_model(self.model_codec, state)
            read = codec.decode_model(wire)
            seen = {k: read[k].to(t.dtype) for k, t in state.items()}
            self._shift = {k: t - seen[k] for k, t in state.items() if t.is_floating_point()}
            self._global, sent = ArrayRecord(seen), ArrayRecord(wire)
        self._sent = list(self.inner.configure_train(server_round, sent, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, metrics = self._aggregate(server_round, replies)
        if state is None:
            return None, metrics
        for key, shift in self._shift.items():  # back to full precision (model_codec)
            state[key].add_(shift.to(state[key].dtype))
        return ArrayRecord(state), metrics

    def _aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        # The global model as tensors, once: what a codec decodes against, a rule's start.
        coded = self.update_codec != "float32"
        robust_rule = self.rule.kind != "fedavg"
        global_state = (
            tensor_views(self._global)
            if self._global is not None and (coded or robust_rule)
            else None
        )
        decoder = None
        if coded and global_state is not None:
            decoder = Codec(self.update_codec, global_state)
        valid = self.book.train_replies(server_round, self._sent, replies, self._spec, decoder)
        if not valid:
            return None, None
        weights = bounded_weights([report for report, _ in valid], self.book.committed)
        weighted = [weighed(msg, weights[report.site]) for report, msg in valid]

        def model(msg: Message) -> dict[str, torch.Tensor]:
            """A reply's model, decoded (the book checked that it decodes)."""
            state = cast(ArrayRecord, msg.content[protocol.ARRAYS]).to_torch_state_dict()
            return decoder.decoded(state) if decoder is not None else state

        if not robust_rule and not streams(self.inner):
            if decoder is not None:  # the wrapped strategy reads models, not wire arrays
                for msg in weighted:  # `weighed` copies: the sites' replies stay as sent
                    msg.content[protocol.ARRAYS] = ArrayRecord(model(msg))
            arrays, metrics = self.inner.aggregate_train(server_round, weighted)
            return (None if arrays is None else arrays.to_torch_state_dict()), metrics
        if robust_rule and (global_state is None or len(valid) < self.rule.min_replies):
            return None, None  # the round stops: fewer than min-sites
        # The model is combined here; the wrapped FedAvg's weighted mean is kept for the
        # metrics only.
        metrics = self.inner.train_metrics_aggr_fn(
            [msg.content for msg in weighted], self.inner.weighted_by_key
        )
        if not robust_rule:
            total = sum(weights.values())
            share = {report.site: weights[report.site] / total for report, _ in valid}
            shares = [(share[r.site], msg) for r, msg in valid]
            if decoder is not None:
                return decoded_mean(shares, decoder), metrics
            return weighted_mean(shares, model), metrics
        assert global_state is not None  # checked above
        models = {report.site: model(msg) for report, msg in valid}
        state, flagged = robust.aggregate(self.rule, global_state, models, weights)
        self.book.flag(server_round, flagged)
        return dict(state), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
