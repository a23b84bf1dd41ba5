"""A site's side of a distributed-DP round: the five SecAgg+ stages, one method each.

fedsilo.clients.client_app hands a train message here when the run's `dp` is
distributed. `SecureSiteRound` answers each stage with the matching method of
fedsilo.privacy.secagg_site.SecAggSite (the protocol's checks live there) and keeps that
object between messages in the ClientApp's context state, which stays on the site (its
SuperNode's memory; a simulated node's context). Advertising keys first refuses a run
the site's policy does not allow. Order within the masked-input stage, so that nothing
is spent on a round that could not be released:
  1. open every share this site was sent (a neighbour whose share does not open is
     dropped) and refuse when fewer verified sites than max(threshold, dp-min-sites)
     are left;
  2. authorise the round: policy, plan and budget checks and the noise share's
     (fedsilo.privacy.distributed.check_shares), then the spend is written to the
     ledger (fedsilo.clients.site_budget);
  3. train, quantize, add the noise share, mask and reply.
Before the run's last round, the unmask answer also carries the next round's keys
(`_advertise`, the same code as the advertise-keys stage), so that round needs one
exchange less.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsilo import protocol
from fedsilo.clients import failpoint
from fedsilo.clients.dp_train import DistributedResult, DPPlan
from fedsilo.clients.site_budget import check_run
from fedsilo.clients.site_round import SiteRound, spent_reply, train_authorised
from fedsilo.errors import ConfigError, PrivacyError
from fedsilo.flwr_adapter.arrays import tensor_views
from fedsilo.privacy.distributed import Quantizer, check_shares
from fedsilo.privacy.identity import SiteIdentity
from fedsilo.privacy.secagg import (
    SecAggError,
    Verifier,
    check_ring_bytes,
    encode_vector,
    round_tag,
    to_ring,
)
from fedsilo.privacy.secagg_site import SecAggSite, SignedKeys

log = logging.getLogger("fedsilo.client")
STATE_KEY = "fedsilo-secagg"
Values = dict[str, object]


class SecureSiteRound(SiteRound):
    """The site's answers to one distributed-DP round, one method per stage."""

    @property
    def tag(self) -> bytes:
        """What the round's signatures, shares and masks are bound to: run and round."""
        return round_tag(self.run, self.server_round)

    def answer(self, config: ConfigRecord) -> Message:
        """Answer the stage `config` names; raises PrivacyError (SecAggError too) to refuse."""
        stage = str(config.get(protocol.SECAGG_STAGE, ""))
        stages: dict[str, Callable[[ConfigRecord], Message]] = {
            protocol.ADVERTISE_KEYS: self.advertise_keys,
            protocol.SHARE_KEYS: self.share_keys,
            protocol.MASKED_INPUT: self.masked_input,
            protocol.CONSISTENCY: self.consistency_check,
            protocol.UNMASK: self.unmask,
        }
        if stage not in stages:
            raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
        if stage in (protocol.CONSISTENCY, protocol.UNMASK):
            failpoint.reach(stage, self.server_round)
        return stages[stage](config)

    # ------------------------------------------------------------ the stages

    def advertise_keys(self, config: ConfigRecord) -> Message:
        return self._reply(None, self._advertise(self.server_round))

    def _advertise(self, server_round: int) -> Values:
        """Round `server_round`'s keys, signed; its state saved for the next stage."""
        check_run(self.site.budget.policy, self.cfg)  # refused here, before any key is made
        state = SecAggSite(
            node=self.msg.metadata.dst_node_id,
            round_tag=round_tag(self.run, server_round),
            min_sites=self.cfg.dp_min_sites,
        )
        keys = state.advertise_keys(self._identity())
        self._save(state)
        return {
            protocol.KEY_C: keys.c,
            protocol.KEY_S: keys.s,
            protocol.SIGNATURE: keys.signature,
            protocol.CERT: keys.cert,
        }

    def share_keys(self, config: ConfigRecord) -> Message:
        state = self._load(protocol.SHARE_KEYS)
        nodes = _ints(config, protocol.NODES)
        columns = [
            _bytes(config, key)
            for key in (protocol.KEYS_C, protocol.KEYS_S, protocol.SIGNATURES, protocol.CERTS)
        ]
        if any(len(col) != len(nodes) for col in columns):
            raise SecAggError("the server's key lists differ in length")
        threshold = config.get(protocol.THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise SecAggError("the server sent no integer threshold")
        roster = {
            n: SignedKeys(*entry)
            for n, entry in zip(nodes, zip(*columns, strict=True), strict=True)
        }
        out = state.share_keys(roster, threshold, self._verifier())
        dsts = sorted(out)
        return self._reply(
            state, {protocol.DESTINATIONS: dsts, protocol.CIPHERTEXTS: [out[d] for d in dsts]}
        )

    def masked_input(self, config: ConfigRecord) -> Message:
        state = self._load(protocol.MASKED_INPUT)
        arrays = self.msg.content.get(protocol.ARRAYS)
        if not isinstance(arrays, ArrayRecord):
            raise ConfigError("The server's masked-input message carries no model arrays.")
        srcs, blobs = _ints(config, protocol.SOURCES), _bytes(config, protocol.CIPHERTEXTS)
        if len(srcs) != len(blobs):
            raise SecAggError("the server's ciphertext lists differ in length")
        # Any width keeps what it sends uniform; a wrong one only spoils the sum. Checked
        # before anything is spent.
        ring = check_ring_bytes(config.get(protocol.RING_BYTES))
        partners = state.receive_shares(dict(zip(srcs, blobs, strict=True)))  # before spending
        self._save(state)
        global_state = tensor_views(arrays)  # read in place: training loads its own copy
        dim = sum(t.numel() for t in global_state.values())

        def shares_hold(plan: DPPlan) -> None:  # refused before anything is spent
            check_shares(
                Quantizer(dim, self.cfg.max_grad_norm), plan.noise_multiplier, self.cfg.dp_min_sites
            )

        auth = self.authorise(
            before_spend=shares_hold,
            sites=len(partners) + 1,  # verified sites whose shares it holds, and itself
        )
        result = train_authorised(self.cfg, self.site, auth, global_state, self.server_round)
        if not isinstance(result, DistributedResult):
            raise ConfigError("a distributed-DP round trained without its noise share")
        failpoint.reach(protocol.MASKED_INPUT, self.server_round)  # spent, nothing masked
        masked = state.masked_input(to_ring(result.vector))
        self._save(state)
        payload = {
            protocol.SECAGG: ConfigRecord(
                {protocol.MASKED: encode_vector(masked, ring), protocol.PARTNERS: partners}
            )
        }
        return spent_reply(self.msg, self.cfg, self.site, auth, self.server_round, result, payload)

    def consistency_check(self, config: ConfigRecord) -> Message:
        state = self._load(protocol.CONSISTENCY)
        active, dead = _ints(config, protocol.ACTIVE), _ints(config, protocol.DEAD)
        signature = state.consistency_check(active, dead, self._identity())
        return self._reply(state, {protocol.SIGNATURE: signature})

    def unmask(self, config: ConfigRecord) -> Message:
        state = self._load(protocol.UNMASK)
        nodes, sigs = _ints(config, protocol.NODES), _bytes(config, protocol.SIGNATURES)
        if len(nodes) != len(sigs):
            raise SecAggError("the server's signature lists differ in length")
        shares = state.unmask(dict(zip(nodes, sigs, strict=True)), self._verifier())
        self.context.state.pop(STATE_KEY, None)  # the round's secrets end here
        owners = sorted(shares)
        values: Values = {protocol.NODES: owners, protocol.SHARES: [shares[o] for o in owners]}
        if self.server_round < self.cfg.rounds:  # the next round's keys, one exchange early
            try:
                values.update(self._advertise(self.server_round + 1))
            except PrivacyError as exc:  # this round's answer stands; the next one refuses
                log.warning("unmask: no keys for round %d: %s", self.server_round + 1, exc)
        return self._reply(None, values)

    # ------------------------------------------------------------ helpers

    def _identity(self) -> SiteIdentity:
        if self.site.identity is None:
            raise PrivacyError(
                f"site {self.site.name} has no certificate from the federation CA, which "
                "distributed DP needs to sign its secure-aggregation keys (without it a "
                "server could substitute them). Issue one with `fedsilo provision "
                "certify-site` and restart the site with its kit."
            )
        return self.site.identity

    def _verifier(self) -> Verifier:
        return self._identity().verify

    def _reply(self, state: SecAggSite | None, values: Values) -> Message:
        if state is not None:
            self._save(state)
        return Message(
            content=RecordDict({protocol.SECAGG: ConfigRecord(values)}),  # type: ignore[arg-type]
            reply_to=self.msg,
        )

    def _save(self, state: SecAggSite) -> None:
        self.context.state[STATE_KEY] = ConfigRecord(state.to_state())  # type: ignore[arg-type]

    def _load(self, stage: str) -> SecAggSite:
        record = self.context.state.get(STATE_KEY)
        if not isinstance(record, ConfigRecord):
            raise SecAggError(f"a {stage} request without this round's keys")
        state = SecAggSite.from_state(record)
        if state.round_tag != self.tag:
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
