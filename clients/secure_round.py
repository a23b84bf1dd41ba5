"""A site's side of a distributed-DP round: the four SecAgg+ stages. Translates messages only.

fedsilo.client_app routes a train message here when the run's `dp` is distributed.
Between stages the site keeps its secagg secrets in the ClientApp's context state,
which stays on the site (its SuperNode's memory; a simulated node's context).
The protocol is fedsilo.privacy.secagg; the noise fedsilo.privacy.distributed; the
round's spend is authorised and written to the ledger (fedsilo.clients.site_budget)
before the site computes its contribution, at the `masked` stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo import protocol
from fedsilo.clients.dp_train import DistributedResult, DPPlan
from fedsilo.clients.site_budget import authorise_round, check_run
from fedsilo.clients.site_env import SiteEnvironment
from fedsilo.clients.site_round import spent_reply, train_authorised
from fedsilo.config import RunConfig
from fedsilo.errors import ConfigError
from fedsilo.privacy.distributed import Quantizer, check_shares
from fedsilo.privacy.secagg import SecAggError, SecAggSite, encode_vector, to_ring

log = logging.getLogger("fedsilo.client")
STATE_KEY = "fedsilo-secagg"


def secure_stage(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    site: SiteEnvironment,
    server_round: int,
    run: str,
    config: ConfigRecord,
) -> Message:
    """Answer one stage; raises PrivacyError (SecAggError included) to refuse it."""
    stage = str(config.get(protocol.SECAGG_STAGE, ""))
    tag = f"{run}/{server_round}".encode()
    if stage == "setup":
        check_run(site.budget.policy, cfg)  # refused here, before any key is made
        state = SecAggSite(node=msg.metadata.dst_node_id, round_tag=tag)
        c, s = state.public_keys()
        return _reply(msg, context, state, {protocol.KEY_C: c, protocol.KEY_S: s})
    state = _load(context, tag, stage)
    if stage == "share-keys":
        nodes = _ints(config, protocol.NODES)
        keys_c, keys_s = _bytes(config, protocol.KEYS_C), _bytes(config, protocol.KEYS_S)
        if not len(nodes) == len(keys_c) == len(keys_s):
            raise SecAggError("the server's key lists differ in length")
        threshold = config.get(protocol.THRESHOLD)
        if not isinstance(threshold, int):
            raise SecAggError("the server sent no integer threshold")
        out = state.share_keys(
            dict(zip(nodes, zip(keys_c, keys_s, strict=True), strict=True)), threshold
        )
        dsts = sorted(out)
        return _reply(
            msg,
            context,
            state,
            {protocol.DESTINATIONS: dsts, protocol.CIPHERTEXTS: [out[d] for d in dsts]},
        )
    if stage == "masked":
        arrays = msg.content.get(protocol.ARRAYS)
        if not isinstance(arrays, ArrayRecord):
            raise ConfigError("The server's masked-stage message carries no model arrays.")
        srcs, blobs = _ints(config, protocol.SOURCES), _bytes(config, protocol.CIPHERTEXTS)
        if len(srcs) != len(blobs):
            raise SecAggError("the server's ciphertext lists differ in length")
        dim = sum(t.numel() for t in arrays.to_torch_state_dict().values())

        def shares_hold(plan: DPPlan) -> None:  # refused before anything is spent
            check_shares(Quantizer(dim, cfg.max_grad_norm), plan.noise_multiplier, cfg.dp_min_sites)

        auth = authorise_round(
            site.budget,
            cfg,
            site.data,
            site=site.name,
            run=run,
            server_round=server_round,
            before_spend=shares_hold,
            sites=len(srcs) + 1,  # the sites that shared keys with this one, and itself
        )
        result = train_authorised(cfg, site, auth, arrays.to_torch_state_dict(), server_round)
        assert isinstance(result, DistributedResult)  # cfg.dp is distributed
        masked = state.masked(to_ring(result.vector), dict(zip(srcs, blobs, strict=True)))
        _save(context, state)
        payload = {protocol.SECAGG: ConfigRecord({protocol.MASKED: encode_vector(masked)})}
        return spent_reply(msg, cfg, site, auth, server_round, result, payload)
    if stage == "unmask":
        active, dead = _ints(config, protocol.ACTIVE), _ints(config, protocol.DEAD)
        shares = state.unmask(active, dead, min_active=cfg.dp_min_sites)
        owners = sorted(shares)
        context.state.pop(STATE_KEY, None)  # the round's secrets end here
        return Message(
            content=RecordDict(
                {
                    protocol.SECAGG: ConfigRecord(
                        {protocol.NODES: owners, protocol.SHARES: [shares[o] for o in owners]}
                    )
                }
            ),
            reply_to=msg,
        )
    raise SecAggError(f"unknown secure-aggregation stage {stage!r}")


def _reply(msg: Message, context: Context, state: SecAggSite, values: dict[str, object]) -> Message:
    _save(context, state)
    return Message(
        content=RecordDict({protocol.SECAGG: ConfigRecord(values)}),  # type: ignore[arg-type]
        reply_to=msg,
    )


def _save(context: Context, state: SecAggSite) -> None:
    context.state[STATE_KEY] = ConfigRecord(state.to_state())  # type: ignore[arg-type]


def _load(context: Context, tag: bytes, stage: str) -> SecAggSite:
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord):
        raise SecAggError(f"a {stage} request without this round's setup")
    state = SecAggSite.from_state(record)
    if state.round_tag != tag:
        raise SecAggError(f"a {stage} request for another round than the one set up")
    return state


def _typed_list(config: ConfigRecord, key: str, kind: type, convert: Callable) -> list:  # type: ignore[type-arg]
    raw = config.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(v, kind) for v in raw):
        raise SecAggError(f"the server's `{key}` is not a list of {kind.__name__}")
    return [convert(v) for v in raw]


def _ints(config: ConfigRecord, key: str) -> list[int]:
    return _typed_list(config, key, int, int)


def _bytes(config: ConfigRecord, key: str) -> list[bytes]:
    return _typed_list(config, key, bytes, bytes)
