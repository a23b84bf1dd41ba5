"""The fedsilo ClientApp: one site's side of a round. Translates messages only.

`build_client_app(resolve_site)` makes a ClientApp whose sites come from
`resolve_site` (fedsilo.clients.site_env): `app`, the one the manifest names and
`flower-supernode` runs, resolves deployed sites; `fedsilo simulate` builds its own
with simulated sites. The round itself is the same code either way: the site's
budget authorises it (fedsilo.clients.site_budget: policy check, then the spend is
written to the ledger before training), the site trains the global model with
DP-SGD (fedsilo.clients.dp_train) on its own random source, checks what it is about
to send, and replies with only what fedsilo.protocol lists: the DP update, its
example count, this run's epsilon and plan, and its ledger head. A site that
refuses replies with a fedsilo refusal (fedsilo.privacy.refusal) that says why
without disclosing its spend elsewhere.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedsilo import protocol
from fedsilo.clients import site_status
from fedsilo.clients.secure_round import SecureSiteRound
from fedsilo.clients.site_env import LEDGER_ENV, NAME_KEY, SiteResolver, deployed_site
from fedsilo.clients.site_round import LocalSiteRound
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, DataError, FedsiloError, PrivacyError
from fedsilo.privacy import accountant, ledger
from fedsilo.privacy.policy import LEDGER_KEY
from fedsilo.privacy.refusal import REFUSAL_CODE, public_reason, refusal_reason

log = logging.getLogger("fedsilo.client")
# Each DP mode's round protocol (fedsilo.config.DP_MODES): chosen once per message.
SITE_ROUNDS: dict[str, type[LocalSiteRound] | type[SecureSiteRound]] = {
    "local": LocalSiteRound,
    "distributed": SecureSiteRound,
}


def train(msg: Message, context: Context, resolve_site: SiteResolver) -> Message:
    """Answer the server's train message with the run's round protocol (or refuse), and
    note how it went in the site's own status file (fedsilo.clients.site_status)."""
    start = time.perf_counter()
    cfg = RunConfig.from_flwr(context.run_config)
    server_round = _server_round(msg)
    config = msg.content[protocol.CONFIG]
    assert isinstance(config, ConfigRecord)  # _server_round checked it
    name = str(context.node_config.get(NAME_KEY, "site"))
    ledger_path = context.node_config.get(LEDGER_KEY)
    ledger = Path(str(ledger_path)).expanduser() if ledger_path else None

    def note(outcome: str, reply: Message | None = None, error: str | None = None) -> None:
        if ledger is None:
            return
        try:
            steps = _steps(reply) if reply is not None else 0
            site_status.record(
                ledger, name, server_round=server_round, outcome=outcome, error=error,
                seconds=time.perf_counter() - start, received=site_status.message_bytes(msg),
                sent=site_status.message_bytes(reply) if reply is not None else 0, steps=steps,
            )  # fmt: skip
        except Exception:  # a round never fails over the site's statistics
            log.exception("train: site %s could not note round %d's status", name, server_round)

    # The ledger, not context.state, holds the spend: it survives SuperNode restarts
    # and separate runs on the same data.
    try:
        site = resolve_site(cfg, context.node_config)
        name, ledger = site.name, site.budget.ledger
        kind = SITE_ROUNDS[cfg.dp]  # the run's DP mode picks its protocol, here only
        reply = kind(msg, context, cfg, site, server_round, run_identity(cfg, context)).answer(
            config
        )
    except (PrivacyError, ConfigError, DataError) as exc:  # a round the site will not train
        log.warning("train: site %s refuses round %d: %s", name, server_round, exc)
        reply = Message(Error(REFUSAL_CODE, refusal_reason(name, _public(exc, cfg))), reply_to=msg)
        note("refused", reply, error=f"refused: {exc}")
        return reply
    except Exception as exc:
        note("error", error=f"{type(exc).__name__}: {exc}")
        raise
    note("answered", reply)
    return reply


def _steps(reply: Message) -> int:
    """The DP-SGD steps a reply reports (0 for a stage that did not train)."""
    if not reply.has_content():
        return 0
    metrics = reply.content.get(protocol.METRICS)
    steps = metrics.get(protocol.STEPS) if isinstance(metrics, MetricRecord) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else 0


def run_identity(cfg: RunConfig, context: Context) -> str:
    """What the site's ledger keys this run's spends on: fedsilo's run id, which a resumed
    run keeps (its plan and rounds carry over), else Flower's (a plain `flwr run`)."""
    return cfg.run_id or str(context.run_id)


def _public(exc: FedsiloError, cfg: RunConfig) -> str:
    """What a refusal tells the server: the rule, never the site's spend or its files."""
    if isinstance(exc, PrivacyError):
        return public_reason(exc)
    if isinstance(exc, DataError):  # its message names the site's files: keep it here
        task = cfg.task or cfg.dataset
        return f"the site's data does not fit this run's task ({task}); see its log."
    return str(exc)


def _server_round(msg: Message) -> int:
    config = msg.content.get(protocol.CONFIG)
    raw = config.get(protocol.SERVER_ROUND) if isinstance(config, ConfigRecord) else None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"The server's train message has no integer `server-round`: {raw!r}.")
    return raw


def build_client_app(resolve_site: SiteResolver) -> ClientApp:
    """A ClientApp whose sites come from `resolve_site`."""
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, resolve_site)

    return client


app = build_client_app(deployed_site)  # what `flower-supernode` runs (the app manifest)


def zygote_warm() -> None:
    """What a deployed site's zygote runs before it forks each message's ClientApp
    (fedsilo.flwr_adapter.site_runtime's `zygote_warm` hook): read the site's ledger
    (its verified prefix is then remembered: each child verifies only the lines after
    it) and memoise the RDP curves of its mechanisms (fedsilo.privacy.accountant.warm),
    which every ClientApp's budget check needs. Pure caches only: a child computes the
    same answers without them, and a ledger that is not intact warms nothing."""
    path = os.environ.get(LEDGER_ENV)
    if not path or not Path(path).is_file():
        return
    contents = ledger.read(path)
    if contents.trusted:
        accountant.warm(contents.events())
