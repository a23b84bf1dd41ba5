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
import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from fedsilo import protocol
from fedsilo.clients.dp_train import RoundResult
from fedsilo.clients.secure_round import secure_stage
from fedsilo.clients.site_budget import authorise_round
from fedsilo.clients.site_env import NAME_KEY, SiteResolver, deployed_site
from fedsilo.clients.site_round import spent_reply, train_authorised
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError, DataError, FedsiloError, PrivacyError
from fedsilo.privacy.refusal import REFUSAL_CODE, public_reason, refusal_reason
from fedsilo.task.train import non_finite

log = logging.getLogger("fedsilo.client")


def train(msg: Message, context: Context, resolve_site: SiteResolver) -> Message:
    """Train the global model locally under DP and reply with the update (or refuse)."""
    cfg = RunConfig.from_flwr(context.run_config)
    server_round = _server_round(msg)
    arrays = msg.content.get(protocol.ARRAYS)
    if not isinstance(arrays, ArrayRecord) and cfg.dp == "local":
        raise ConfigError("The server's train message carries no model arrays.")
    name = str(context.node_config.get(NAME_KEY, "site"))
    # The ledger, not context.state, holds the spend: it survives SuperNode restarts
    # and separate runs on the same data.
    try:
        site = resolve_site(cfg, context.node_config)
        name = site.name
        if cfg.dp == "distributed":  # the four SecAgg+ stages (fedsilo.clients.secure_round)
            config = msg.content.get(protocol.CONFIG)
            assert isinstance(config, ConfigRecord)  # _server_round checked it
            return secure_stage(
                msg, context, cfg, site, server_round, run_identity(cfg, context), config
            )
        auth = authorise_round(
            site.budget,
            cfg,
            site.data,
            site=site.name,
            run=run_identity(cfg, context),
            server_round=server_round,
        )
    except (PrivacyError, ConfigError, DataError) as exc:  # a round the site will not train
        log.warning("train: site %s refuses round %d: %s", name, server_round, exc)
        return Message(Error(REFUSAL_CODE, refusal_reason(name, _public(exc, cfg))), reply_to=msg)

    assert isinstance(arrays, ArrayRecord)
    result = train_authorised(cfg, site, auth, arrays.to_torch_state_dict(), server_round)
    assert isinstance(result, RoundResult)  # cfg.dp is local
    why = _unsendable(result)
    if why:
        log.error("train: site %s round %d: %s", site.name, server_round, why)
        return Message(Error(protocol.SITE_FAILURE_CODE, why), reply_to=msg)
    payload = {protocol.ARRAYS: ArrayRecord(result.state_dict)}
    return spent_reply(msg, cfg, site, auth, server_round, result, payload)


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


def _unsendable(result: RoundResult) -> str:
    """Why the site must not send this round's result ("" when it may)."""
    bad = non_finite(result.state_dict)
    if bad or not math.isfinite(result.epsilon):
        return (
            f"the update is not finite (NaN or infinity in {', '.join(bad[:3])}); the site "
            "sends nothing. Check the scale of its data (features of order 1) and lr."
        )
    return ""


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
