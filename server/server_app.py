"""The fedsilo ServerApp: rounds of FedAvg with central evaluation after each.

Each round it sends the global model to every connected site, aggregates the
replies (FedAvg weighted by example count), evaluates the new global model on the
server's own held-out data, and appends a line to RUN_DIR/metrics.jsonl with a
checkpoint. It ends with final_model.pt and summary.json. The same ServerApp runs
in `fedsilo simulate` and under `flower-superlink` in deployment.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsilo import flwr_adapter
from fedsilo.config import RunConfig
from fedsilo.flwr_adapter.arrays import tensor_views
from fedsilo.privacy.distributed import check_run_noise
from fedsilo.privacy.identity import verify_signed
from fedsilo.server.evaluate import Evaluator, global_model, load_eval_data, make_evaluator
from fedsilo.server.local_round import Exchange, LocalRounds
from fedsilo.server.records import FinalEvaluation, Progress, RoundRecord, SiteSummary, Summary
from fedsilo.server.run_dir import RunDir, default_run_dir, read_site_names
from fedsilo.server.secure_round import SecureRounds
from fedsilo.server.strategy import SiteReports
from fedsilo.task.builtin import task_for
from fedsilo.task.train import non_finite

log = logging.getLogger("fedsilo.server")
app = ServerApp()
ROUND_TIMEOUT_S = 3600.0  # a site that has not replied within this is counted as failed


class ClosedRound(NamedTuple):
    """A completed round: the new global model as sent (`arrays`) and as tensors (`state`,
    read once: evaluated, then checkpointed), and its metrics record."""

    arrays: ArrayRecord
    state: dict[str, torch.Tensor]
    record: RoundRecord


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    cfg = RunConfig.from_flwr(context.run_config)
    if cfg.distributed:
        # The sites receive this same run config and add shares of its noise multiplier:
        # one it lacks (a plain `flwr run`) or one too small for the run's largest sample
        # rate stops the run here, as every site would refuse it.
        check_run_noise(cfg, sample_rate=cfg.dp_max_sample_rate)
    flwr_adapter.fast_object_pulls()  # the replies' content: pulled without 1 s waits
    run_dir = RunDir(cfg.run_dir or default_run_dir())
    progress, rounds = (
        run_dir.resume_point(ask_again=not cfg.distributed) if cfg.resume else (Progress(), [])
    )
    # A resumed run rewrites it too: it may have been given more rounds.
    run_dir.write_config(dataclasses.replace(cfg, resume=False).to_flwr())
    evaluate = make_evaluator(cfg, load_eval_data(cfg, cfg.eval_data))
    strategy = site_reports(cfg, run_dir, rounds)
    arrays = starting_model(cfg, run_dir, rounds, progress)
    rounds_of = round_protocol(
        cfg,
        run_dir,
        run=cfg.run_id or str(context.run_id),
        strategy=strategy,
        exchange=lambda g, msgs: exchange(g, msgs, timeout=ROUND_TIMEOUT_S),
    )
    if rounds:  # resumed: the server's optimizer state (distributed DP's momentum) goes on too
        rounds_of.velocity = run_dir.momentum(rounds[-1].round)
    stopped = ""
    for server_round in range(progress.started + 1, cfg.rounds + 1):
        # Written before the round is sent: a resumed run never asks sites to train a
        # round they may already have spent budget on.
        progress = dataclasses.replace(progress, started=server_round)
        run_dir.write_progress(progress)
        outcome = play_round(grid, server_round, arrays, rounds_of, strategy, cfg, evaluate)
        if isinstance(outcome, str) and server_round in progress.asked_again:
            # Too few sites kept a reply to it (one killed while training spent it and
            # refuses it now): the round is lost as it would have been, and the run goes on.
            log.warning("main: round %d asked again: %s; it is lost", server_round, outcome)
            progress = dataclasses.replace(progress, lost=sorted({*progress.lost, server_round}))
            run_dir.write_progress(progress)
            continue
        if isinstance(outcome, str):  # never checkpoint, report or continue from it
            stopped = f"round {server_round}: {outcome}"
            log.error("main: %s; stopping", stopped)
            break
        arrays, state, record = outcome
        keep_round(run_dir, state, record, rounds_of.velocity)
        del outcome, state  # a model's worth of memory the next round must not carry
        rounds.append(record)
    run_dir.save_final(arrays.to_torch_state_dict())
    summary = build_summary(
        rounds, strategy, str(run_dir.path), cfg.rounds, task=task_for(cfg).name
    )
    run_dir.write_summary(
        dataclasses.replace(
            summary,
            run_id=cfg.run_id or str(context.run_id),
            lost_rounds=progress.lost,
            resumed_after=progress.resumed,
            asked_again=progress.asked_again,
            stopped=stopped or None,
        )
    )


def site_reports(cfg: RunConfig, run_dir: RunDir, rounds: list[RoundRecord]) -> SiteReports:
    """The run's aggregation (FedAvg over the reply book), as the completed `rounds` left it."""
    # Every site trains every round (cross-silo). fraction_evaluate is unused: this
    # ServerApp evaluates centrally and never calls configure_evaluate.
    strategy = SiteReports(
        FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=cfg.min_sites,
            min_available_nodes=cfg.min_sites,
        ),
        names=lambda: read_site_names(run_dir.path),
        rule=cfg.aggregation_rule,
        update_codec=cfg.update_codec,
        model_codec=cfg.model_codec,
    )
    strategy.restore(rounds)
    return strategy


def starting_model(
    cfg: RunConfig, run_dir: RunDir, rounds: list[RoundRecord], progress: Progress
) -> ArrayRecord:
    """The global model the run starts from: a resumed run's last completed checkpoint."""
    if rounds:  # resumed: from the last completed round's checkpoint
        state = torch.load(run_dir.checkpoint(rounds[-1].round), weights_only=True)
    else:
        state = global_model(cfg).state_dict()
    if cfg.resume:
        log.warning(
            "main: resuming run %s after round %d; round(s) %s in flight when the server "
            "stopped are asked for again (a site that trained one resends its kept reply, "
            "at no new spend); round(s) %s are lost (the sites spent them)",
            cfg.run_id,
            progress.resumed[-1],
            progress.asking_again or "none",
            progress.lost or "none",
        )
    return ArrayRecord(state)


def play_round(
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    rounds_of: LocalRounds | SecureRounds,
    strategy: SiteReports,
    cfg: RunConfig,
    evaluate: Evaluator,
) -> ClosedRound | str:
    """One round from `arrays`: its new global model and timed metrics record.

    Returns why the run must stop instead when the round cannot be used (close_round).
    """
    t0 = time.monotonic()
    new_arrays = rounds_of.run_round(grid, server_round, arrays)
    outcome = close_round(server_round, new_arrays, strategy, cfg, evaluate, rounds_of.why_not)
    if isinstance(outcome, str):
        return outcome
    record = dataclasses.replace(
        outcome.record,
        seconds=time.monotonic() - t0,
        # where a distributed round's time went
        stage_seconds=dict(rounds_of.stage_seconds) or None,
    )
    return outcome._replace(record=record)


def keep_round(
    run_dir: RunDir,
    state: Mapping[str, torch.Tensor],
    record: RoundRecord,
    velocity: torch.Tensor | None,
) -> None:
    """Checkpoint a completed round (model, optimizer state), then write its metrics line."""
    run_dir.save_checkpoint(record.round, dict(state))
    if velocity is not None:
        run_dir.save_momentum(record.round, velocity)
    run_dir.append_metrics(record)  # after the checkpoint: a metrics line means resumable
    log.info(
        "main: round %d: accuracy %.4f loss %.4f max epsilon %.3f",
        record.round,
        record.accuracy,
        record.loss,
        record.max_epsilon,
    )


def round_protocol(
    cfg: RunConfig,
    run_dir: RunDir,
    *,
    run: str,
    strategy: SiteReports,
    exchange: Exchange,
) -> LocalRounds | SecureRounds:
    """The run's round protocol, chosen once from its DP mode."""
    if cfg.distributed:  # SecAgg+ stages, then one step on the secure sum
        verify = functools.partial(verify_signed, run_dir.federation_ca())
        return SecureRounds(cfg, run=run, strategy=strategy, exchange=exchange, verify=verify)
    return LocalRounds(strategy=strategy, exchange=exchange)


RESTART_CHECK_S = 1.0  # while replies are pending: how often to look for restarted sites
POLL_COST_RATIO = 10.0  # the wait between pulls is at least this many times the last pull
RESTARTED = (
    "the site restarted during the round, so its reply to this round cannot come (Flower "
    "does not deliver a message again); it takes part again from the next round"
)


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """Push `messages` and pull their replies until all came or `timeout`.

    Pulls come `poll_wait` of the time since the push or the last reply apart: 0.1 s
    (a simulation's in-memory grid: 5 ms) while replies are near, up to 1 s while the
    round waits on a slow or dead site.
    `Grid.send_and_receive` does the same but sleeps 3 s between pulls (flwr 1.39's
    GrpcGrid), which a deployed round would wait for up to 3 s; a pull is one small
    request to the local SuperLink. A pull costs time in proportion to the replies
    still pending (10,000 simulated sites: ~0.1 s), so the wait is also at least
    POLL_COST_RATIO times what asking costs: the last pull's time, except for a deployed
    pull that brought replies, whose time went into downloading them (that one pull's
    10x made a deployed round of two digits sites wait ~1.4 s for its second reply once
    the first came). Pulling never takes more than a tenth of the round. A message
    whose site restarted since the push (a new session: `flwr_adapter.node_sessions`)
    gets an error reply saying so at once, instead of a wait for the timeout; simulated
    sites never restart, so a simulation does not look.
    """
    sent = list(messages)
    pending = set(grid.push_messages(sent))
    by_id = {m.metadata.message_id: m for m in sent}
    deployed = not flwr_adapter.is_simulation_grid(grid)
    floor = flwr_adapter.POLL_S if deployed else flwr_adapter.SIM_POLL_S
    sessions = flwr_adapter.node_sessions(grid) if deployed else {}
    last = time.monotonic()
    deadline = last + timeout
    next_check = last + RESTART_CHECK_S
    replies: list[Message] = []
    ask_s = 0.0  # what a pull costs the asker, replies aside
    while pending:
        t0 = time.monotonic()
        got = list(grid.pull_messages(pending))
        now = time.monotonic()
        pull_s = now - t0
        if deployed and now >= next_check:
            got += restarted(pending, by_id, sessions, flwr_adapter.node_sessions(grid))
            next_check = now + RESTART_CHECK_S
        if got:
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            last = now
        if not pending or now >= deadline:
            break
        if not (deployed and got):
            ask_s = pull_s
        wait = max(flwr_adapter.poll_wait(now - last, floor), POLL_COST_RATIO * ask_s)
        time.sleep(min(wait, max(0.0, deadline - now)))
    return replies


def restarted(
    pending: Iterable[str],
    sent: dict[str, Message],
    before: dict[int, str],
    now: dict[int, str],
) -> list[Message]:
    """An error reply (RESTARTED) to each pending message whose site began a new session."""
    lost = []
    for message_id in sorted(pending):
        msg = sent.get(message_id)
        node = msg.metadata.dst_node_id if msg is not None else None
        if msg is None or node not in before or node not in now or now[node] == before[node]:
            continue  # a node that is offline now is the SuperLink's to report
        lost.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, RESTARTED), reply_to=msg))
    return lost


def close_round(
    server_round: int,
    new_arrays: ArrayRecord | None,
    strategy: SiteReports,
    cfg: RunConfig,
    evaluate: Evaluator,
    why_not: str = "",
) -> ClosedRound | str:
    """The round's new global model and metrics record, or why the run must stop.

    `why_not`: why the round protocol released nothing (a secure round that ended at a
    stage says which, and how many sites it had left), when it returned no model.
    """
    if new_arrays is None and why_not:
        return why_not
    participants = strategy.last_round_sites
    if len(participants) < cfg.min_sites:
        return f"{len(participants)} usable repl(ies), fewer than min-sites={cfg.min_sites}"
    if new_arrays is None:  # enough sites (or an earlier round's: a secure round that
        # stopped at a stage names none of its own), but nothing that could be aggregated
        return (
            f"no update of round {server_round} could be aggregated (min-sites="
            f"{cfg.min_sites}); the sites' failures and refusals above say why"
        )
    state = tensor_views(new_arrays)  # read (checked, evaluated, checkpointed), never written
    if non_finite(state):
        return "the aggregated model is not finite (NaN or infinity)"
    result = evaluate(state)
    loss, accuracy = result.loss, result.accuracy
    if not (math.isfinite(loss) and math.isfinite(accuracy)):
        return f"central evaluation is not finite (loss {loss}, accuracy {accuracy})"
    failures = [f for f in strategy.failures if f.round == server_round]
    refusals = [r for r in strategy.refusals if r.round == server_round]
    flagged = {f.site: f.reason for f in strategy.flagged if f.round == server_round}
    record = RoundRecord(
        round=server_round,
        accuracy=accuracy,
        loss=loss,
        metrics=dict(result.extra) or None,
        max_epsilon=max(strategy.reports[s].epsilon for s in participants),
        reports={s: strategy.reports[s].to_record() for s in participants},
        sites=list(participants),
        failed=[f.site for f in failures],
        refused=[r.site for r in refusals],
        reasons={
            **{f.site: f.reason for f in failures},
            **{r.site: r.reason for r in refusals},
        },
        flagged=flagged,
    )
    return ClosedRound(new_arrays, state, record)


def build_summary(
    rounds: list[RoundRecord],
    strategy: SiteReports,
    run_dir: str,
    planned_rounds: int,
    task: str = "",
) -> Summary:
    """What `fedsilo simulate --json` prints and summary.json holds (less how the run ended)."""
    final = FinalEvaluation()
    if rounds:  # the last completed round's evaluation
        final = FinalEvaluation(rounds[-1].accuracy, rounds[-1].loss, rounds[-1].metrics)
    return Summary(
        task=task,
        rounds=[r.result() for r in rounds],
        final=final,
        sites=[
            SiteSummary(
                site=r.site,
                examples=r.examples,
                epsilon=r.epsilon,
                delta=r.delta,
                target_epsilon=r.target_epsilon,
                ledger_head=r.ledger_head,
            )
            for r in sorted(strategy.reports.values(), key=lambda r: r.site)
        ],
        failures=list(strategy.failures),
        refusals=list(strategy.refusals),
        flagged=list(strategy.flagged),
        completed_rounds=len(rounds),
        planned_rounds=planned_rounds,
        run_dir=run_dir,
    )
