"""The ClientApp: a site's spend lives in its ledger, and its budget is enforced there."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsilo import protocol
from fedsilo.clients import site_round
from fedsilo.clients.client_app import train
from fedsilo.clients.site_env import deployed_site
from fedsilo.config import RunConfig
from fedsilo.privacy import ledger
from fedsilo.privacy.accountant import epsilon
from fedsilo.privacy.policy import SitePolicy
from fedsilo.privacy.refusal import REFUSAL_CODE
from fedsilo.server.evaluate import global_model
from fedsilo.simulations.ledgers import simulated_ledger, write_site_policies
from fedsilo.simulations.sites import SimulatedSites
from fedsilo.task.codec import SCALE
from tests.views import spy_on_views


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set when it creates messages (flwr 1.39)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def train_message(cfg: RunConfig, server_round: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(global_model(cfg).state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def sim_context(cfg: RunConfig, run_id: int = 1, pid: int = 0) -> Context:
    """A fresh SuperNode context: nothing in context.state (as after a restart)."""
    return Context(
        run_id=run_id,
        node_id=1,
        node_config={"partition-id": pid, "num-partitions": 3},
        state=RecordDict(),
        run_config=cfg.to_flwr(),
    )


def metrics_of(reply: Message) -> MetricRecord:
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    return metrics


def refusal_of(reply: Message) -> dict[str, str]:
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    return json.loads(reply.error.reason)  # type: ignore[no-any-return]


def sim_train(msg: Message, ctx: Context) -> Message:
    """A round at a virtual site of the simulation writing to the run config's run-dir."""
    return train(msg, ctx, SimulatedSites(str(ctx.run_config["run-dir"])))


def site_train(msg: Message, ctx: Context) -> Message:
    """A round at a deployed site (the ClientApp `flower-supernode` runs)."""
    return train(msg, ctx, deployed_site)


def test_spend_accumulates_across_rounds_and_restarts(tmp_path: Path) -> None:
    # Prepare: each round in a fresh context, as a SuperNode restart leaves it.
    cfg = RunConfig(rounds=2, accountant="rdp", run_dir=str(tmp_path))
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0)])
    # Execute
    m1 = metrics_of(sim_train(train_message(cfg, 1), sim_context(cfg)))
    m2 = metrics_of(sim_train(train_message(cfg, 2), sim_context(cfg)))
    # Assert: round 2 composes with round 1, which only the ledger remembered.
    contents = ledger.read(simulated_ledger(tmp_path, 0))
    one = contents.spends[0].event
    assert one.noise_multiplier == float(m1["noise-multiplier"]) == float(m2["noise-multiplier"])
    assert one.steps == int(m1["steps"]) and one.sample_rate == pytest.approx(64 / 479, rel=0.01)
    assert float(m1["epsilon"]) == pytest.approx(epsilon([one], delta=1e-5, accountant="rdp"))
    assert float(m2["epsilon"]) == pytest.approx(epsilon([one, one], delta=1e-5, accountant="rdp"))
    assert float(m2["epsilon"]) <= cfg.target_epsilon
    assert set(m2) == set(protocol.REPLY_METRICS)  # no site-epsilon: spend stays at the site
    assert not contents.tampered
    assert [(s.run, s.round) for s in contents.spends] == [("1", 1), ("1", 2)]
    assert contents.spends[1].event == one


@pytest.mark.parametrize("codec", ["float32", "int8"])
def test_a_resumed_server_asking_again_gets_the_same_reply_at_no_new_spend(
    tmp_path: Path, codec: str
) -> None:
    """The server crashed in round 1 after the site answered; resumed, it asks for round
    1 again. The site resends the reply it kept (a DP release: no new spend) instead of
    refusing a round it already spent; only its last reply is kept, readable by it alone.
    With an update codec it resends the very arrays it sent (not rounded again)."""
    from fedsilo.clients.kept_reply import reply_path

    cfg = RunConfig(rounds=2, accountant="rdp", run_dir=str(tmp_path), update_codec=codec)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0)])
    path = simulated_ledger(tmp_path, 0)
    first = sim_train(train_message(cfg, 1), sim_context(cfg))
    lines = path.read_bytes()
    # Execute
    again = sim_train(train_message(cfg, 1), sim_context(cfg))
    # Assert: the same arrays, metrics and ledger head; the ledger untouched.
    assert path.read_bytes() == lines
    assert dict(metrics_of(again)) == dict(metrics_of(first))
    sent = first.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    resent = again.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    assert sent.keys() == resent.keys() and all(torch.equal(sent[k], resent[k]) for k in sent)
    assert dict(again.content["site"]) == dict(first.content["site"])  # type: ignore[call-overload]
    assert reply_path(path).stat().st_mode & 0o777 == 0o600
    # Round 2 answered: round 1 is no longer kept, and asking for it again is refused.
    metrics_of(sim_train(train_message(cfg, 2), sim_context(cfg)))
    assert (
        "already trained"
        in refusal_of(sim_train(train_message(cfg, 1), sim_context(cfg)))["refused"]
    )
    assert [s.round for s in ledger.read(path).spends] == [1, 2]


def test_a_site_trains_from_a_compressed_model_and_refuses_one_that_does_not_decode(
    tmp_path: Path,
) -> None:
    """--model-codec int8: the site trains from the model as sent (decoded by its tags)
    and sends its update against it; a sent model whose scales are missing is refused
    before anything is spent."""
    from fedsilo.task import codec

    cfg = RunConfig(
        rounds=2, accountant="rdp", run_dir=str(tmp_path), update_codec="int8", model_codec="int8"
    )
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0)])
    path = simulated_ledger(tmp_path, 0)
    broken = train_message(cfg, 1)
    wire = codec.encode_model("int8", global_model(cfg).state_dict())
    broken.content["arrays"] = ArrayRecord({k: v for k, v in wire.items() if SCALE not in k})
    reason = refusal_of(sim_train(broken, sim_context(cfg)))["refused"]
    assert "The server's model does not decode" in reason and "@scale" in reason
    assert ledger.read(path).spends == []
    good = train_message(cfg, 1)
    good.content["arrays"] = ArrayRecord(wire)
    reply = sim_train(good, sim_context(cfg))
    assert metrics_of(reply)[protocol.NUM_EXAMPLES] > 0
    sent = reply.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
    seen = codec.decode_model(wire)
    model = codec.decode("int8", sent, seen)  # the update is against the model as sent
    assert all(torch.isfinite(t).all() for t in model.values())
    assert len(ledger.read(path).spends) == 1


def test_site_at_its_budget_refuses_the_next_round(tmp_path: Path) -> None:
    # Prepare: run 1 trains round 1; then another run on the same data (another
    # process, written straight to the ledger here) spends as much as one round.
    budget = 4.0
    cfg = RunConfig(rounds=2, accountant="rdp", target_epsilon=budget, run_dir=str(tmp_path))
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=budget)])
    metrics_of(sim_train(train_message(cfg, 1), sim_context(cfg, run_id=1)))
    path = simulated_ledger(tmp_path, 0)
    first = ledger.read(path).spends[0]
    other = dataclasses.replace(first, run="2")
    with ledger.transaction(path) as txn:
        txn.append(other)
    spent = epsilon([first.event, other.event], delta=1e-5)
    assert spent < budget < epsilon([first.event, other.event, first.event], delta=1e-5)
    lines = path.read_bytes().count(b"\n")
    # Execute: run 1's round 2 no longer fits.
    reply = sim_train(train_message(cfg, 2), sim_context(cfg, run_id=1))
    # Assert: a refusal that says why without disclosing the spend; nothing recorded.
    refusal = refusal_of(reply)
    assert refusal["site"] == "site-0"
    assert "budget" in refusal["refused"]
    assert f"{spent:.3f}" not in refusal["refused"] and f"{spent:.2f}" not in refusal["refused"]
    assert path.read_bytes().count(b"\n") == lines


def test_spend_is_recorded_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(rounds=1, accountant="rdp", run_dir=str(tmp_path))
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0)])

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("power cut during training")

    monkeypatch.setattr(site_round, "train_round", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        sim_train(train_message(cfg, 1), sim_context(cfg))
    spends = ledger.read(simulated_ledger(tmp_path, 0)).spends
    assert len(spends) == 1 and spends[0].round == 1  # over-counted, never under-counted


@pytest.mark.parametrize(
    "run,policy,needle",
    [
        ({"target_epsilon": 8.0}, {"max_epsilon": 4.0}, "target-epsilon 8, more than"),
        ({"target_delta": 1e-4}, {"max_epsilon": 8.0}, "target-delta 0.0001, more than"),
        ({"max_grad_norm": 5.0}, {"max_epsilon": 8.0, "max_clip_norm": 1.0}, "max-grad-norm 5"),
        (
            {"accountant": "rdp"},
            {"max_epsilon": 8.0, "min_noise_multiplier": 50.0},
            "below this site's minimum",
        ),
    ],
)
def test_run_asking_more_than_the_policy_is_refused(
    tmp_path: Path, run: dict[str, object], policy: dict[str, float], needle: str
) -> None:
    cfg = RunConfig(rounds=1, run_dir=str(tmp_path), **run)  # type: ignore[arg-type]
    write_site_policies(tmp_path, [SitePolicy(**policy)])
    refusal = refusal_of(sim_train(train_message(cfg, 1), sim_context(cfg)))
    assert needle in refusal["refused"]
    assert ledger.read(simulated_ledger(tmp_path, 0)).spends == []


def test_deployed_site_without_a_budget_refuses(tmp_path: Path) -> None:
    from fedsilo.task.data import load_dataset, save_npz

    data = tmp_path / "site.npz"
    save_npz(data, load_dataset("digits", "train").subset(__import__("numpy").arange(200)))
    cfg = RunConfig(rounds=1)
    for node_config, needle in (
        ({"data-path": str(data)}, "no privacy budget"),
        ({"data-path": str(data), "policy-max-epsilon": 8.0}, "no privacy ledger"),
        (
            {
                "data-path": str(data),
                "policy-max-epsilon": "lots",
                "ledger-path": str(tmp_path / "x"),
            },
            "must be a number",
        ),
    ):
        ctx = Context(1, 1, node_config, RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
        assert needle in refusal_of(site_train(train_message(cfg, 1), ctx))["refused"]


def test_deployed_site_records_its_policy_and_spend(tmp_path: Path) -> None:
    import numpy as np

    from fedsilo.task.data import load_dataset, save_npz

    data = tmp_path / "site.npz"
    save_npz(data, load_dataset("digits", "train").subset(np.arange(300)))
    path = tmp_path / "ledger" / "a.jsonl"
    node_config = {
        "data-path": str(data),
        "site-name": "hospital-a",
        "ledger-path": str(path),
        "policy-max-epsilon": 6.0,
        "policy-delta": 1e-5,
        "policy-min-noise-multiplier": 0.0,
        "policy-max-clip-norm": 2.0,
    }
    cfg = RunConfig(rounds=1, local_epochs=1, accountant="rdp", target_epsilon=6.0)
    ctx = Context(7, 1, node_config, RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
    reply = site_train(train_message(cfg, 1), ctx)
    metrics_of(reply)
    contents = ledger.read(path)
    assert contents.policy == SitePolicy(max_epsilon=6.0, max_clip_norm=2.0)
    assert contents.site == "hospital-a" and len(contents.spends) == 1
    assert reply.content["site"]["ledger-head"] == contents.head  # type: ignore[index]


def test_scatnet_site_computes_features_once_beside_its_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import torch

    from fedsilo.task import features
    from fedsilo.task.data import Dataset, save_npz

    rng = np.random.default_rng(0)
    data = tmp_path / "site.npz"
    x = torch.from_numpy(rng.random((120, 1, 28, 28), dtype=np.float32))
    save_npz(data, Dataset(x, torch.from_numpy(rng.integers(0, 10, 120)), 10, "synthetic"))
    path = tmp_path / "site-a" / "ledger.jsonl"
    node_config = {
        "data-path": str(data),
        "ledger-path": str(path),
        "policy-max-epsilon": 8.0,
        "policy-max-clip-norm": 1.0,
    }
    cfg = RunConfig(
        dataset="fashion-mnist",
        model="scatnet",
        rounds=2,
        local_epochs=1,
        batch_size=32,
        max_grad_norm=0.1,
        accountant="rdp",
    )
    calls: list[int] = []
    real = features.featurize

    def counting(*args: object, **kwargs: object) -> Dataset:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(features, "featurize", counting)
    ctx = Context(3, 1, node_config, RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
    first = site_train(train_message(cfg, 1), ctx)
    cached = list((tmp_path / "site-a" / "feature-cache").glob("*.pt"))
    second = site_train(train_message(cfg, 2), ctx)
    assert metrics_of(first)["num-examples"] == metrics_of(second)["num-examples"] == 120
    assert len(calls) == 1  # round 2 read the features round 1 cached
    assert len(cached) == 1
    # The run's last round deletes the features of the private images.
    assert not (tmp_path / "site-a" / "feature-cache").exists()
    arrays = second.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    assert sorted(arrays.to_torch_state_dict()) == ["bias", "weight"]  # the linear model


def deployed_node_config(tmp_path: Path, x_scale: float = 1.0) -> dict[str, object]:
    import numpy as np

    from fedsilo.task.data import Dataset, load_dataset, save_npz

    digits = load_dataset("digits", "train").subset(np.arange(300))
    data = tmp_path / "site.npz"
    save_npz(data, Dataset(digits.x * x_scale, digits.y, 10, "digits"))
    return {
        "data-path": str(data),
        "site-name": "hospital-a",
        "ledger-path": str(tmp_path / "ledger.jsonl"),
        "policy-max-epsilon": 100.0,
    }


def test_reply_carries_only_the_protocol(tmp_path: Path) -> None:
    cfg = RunConfig(rounds=1, local_epochs=1, accountant="rdp")
    ctx = Context(7, 1, deployed_node_config(tmp_path), RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
    reply = site_train(train_message(cfg, 1), ctx)
    assert set(reply.content.keys()) == {protocol.ARRAYS, protocol.METRICS, protocol.SITE}
    assert set(metrics_of(reply)) == set(protocol.REPLY_METRICS)
    site = reply.content[protocol.SITE]
    assert isinstance(site, ConfigRecord) and set(site) == {protocol.LEDGER_HEAD}


def test_identical_deployed_sites_draw_different_noise(tmp_path: Path) -> None:
    # Two sites with the same data, ledger history and run config (seed included).
    cfg = RunConfig(rounds=1, local_epochs=1, accountant="rdp", seed=3)
    states = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        node = deployed_node_config(tmp_path / name)
        ctx = Context(7, 1, node, RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
        arrays = site_train(train_message(cfg, 1), ctx).content[protocol.ARRAYS]
        assert isinstance(arrays, ArrayRecord)
        states.append(arrays.to_torch_state_dict())
    import torch

    assert not torch.equal(states[0]["net.1.weight"], states[1]["net.1.weight"])


def test_a_partition_id_never_makes_a_deployed_site_simulated(tmp_path: Path) -> None:
    # A SuperNode started with simulation's node config gets no data, no ledger and
    # no seeded noise: the deployed resolver never reads partition-id.
    cfg = RunConfig(rounds=1, run_dir=str(tmp_path))
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0)])
    ctx = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), cfg.to_flwr())
    assert "This site has no data" in refusal_of(site_train(train_message(cfg, 1), ctx))["refused"]
    assert ledger.read(simulated_ledger(tmp_path, 0)).spends == []


def test_a_run_too_long_to_plan_is_refused(tmp_path: Path) -> None:
    cfg = RunConfig(rounds=1, local_epochs=100_000_000)
    ctx = Context(7, 1, deployed_node_config(tmp_path), RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
    assert "fedsilo plans at most" in refusal_of(site_train(train_message(cfg, 1), ctx))["refused"]
    assert ledger.read(tmp_path / "ledger.jsonl").spends == []


def test_a_site_never_sends_a_non_finite_update(tmp_path: Path) -> None:
    # Features of 1e30 are finite, but the update they give is not.
    cfg = RunConfig(rounds=1, local_epochs=1, accountant="rdp")
    node = deployed_node_config(tmp_path, x_scale=1e30)
    ctx = Context(7, 1, node, RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
    reply = site_train(train_message(cfg, 1), ctx)
    assert reply.has_error() and reply.error.code == protocol.SITE_FAILURE_CODE
    assert "not finite" in reply.error.reason


def test_data_of_another_task_is_refused_without_naming_the_sites_files(tmp_path: Path) -> None:
    cfg = RunConfig(dataset="fashion-mnist", rounds=1)  # the site holds digits (64 features)
    ctx = Context(7, 1, deployed_node_config(tmp_path), RecordDict(), cfg.to_flwr())  # type: ignore[arg-type]
    reason = refusal_of(site_train(train_message(cfg, 1), ctx))["refused"]
    assert "does not fit this run's task (fashion-mnist)" in reason
    assert str(tmp_path) not in reason


def test_a_site_keeps_its_step_time_bytes_and_last_error_beside_its_ledger(
    tmp_path: Path,
) -> None:
    from fedsilo.clients import site_status

    node_config = deployed_node_config(tmp_path)
    path = Path(str(node_config["ledger-path"]))
    cfg = RunConfig(rounds=2, local_epochs=1, accountant="rdp")
    msg = train_message(cfg, 1)
    reply = site_train(msg, Context(7, 1, node_config, RecordDict(), cfg.to_flwr()))  # type: ignore[arg-type]
    steps = int(metrics_of(reply)["steps"])
    status = site_status.read(path)
    assert status is not None and status.site == "hospital-a"
    assert status.messages == {"answered": 1, "refused": 0, "error": 0}
    assert status.dp_steps_total == steps > 0
    assert status.last_step_seconds == pytest.approx(status.train_seconds_total / steps)
    model = sum(t.numel() * t.element_size() for t in global_model(cfg).state_dict().values())
    # In: the global model and the config; out: the DP update, metrics and ledger head
    # (each with its keys, shapes and dtypes: a few hundred bytes).
    assert model < status.bytes_received_total == site_status.message_bytes(msg) < model + 1000
    assert model < status.bytes_sent_total == site_status.message_bytes(reply) < model + 1500
    assert status.last_error is None
    # A run asking more than the site's policy allows: a refusal, kept with its text.
    greedy = RunConfig(rounds=2, local_epochs=1, accountant="rdp", target_epsilon=500.0)
    ctx = Context(8, 1, node_config, RecordDict(), greedy.to_flwr())  # type: ignore[arg-type]
    refusal_of(site_train(train_message(greedy, 1), ctx))
    status = site_status.read(path)
    assert status is not None and status.messages["refused"] == 1
    assert status.last_error_round == 1 and "refused: " in str(status.last_error)
    assert status.dp_steps_total == steps  # a refusal trains nothing


def test_a_damaged_status_file_starts_the_counters_again(tmp_path: Path) -> None:
    from fedsilo.clients import site_status

    ledger_path = tmp_path / "ledger.jsonl"
    site_status.status_path(ledger_path).write_text("{not json")
    assert site_status.read(ledger_path) is None
    site_status.record(
        ledger_path, "a", server_round=3, outcome="answered", seconds=2.0,
        received=10, sent=20, steps=4,
    )  # fmt: skip
    status = site_status.read(ledger_path)
    assert status is not None and status.last_step_seconds == 0.5
    assert (status.bytes_received_total, status.bytes_sent_total) == (10, 20)


def test_a_secure_stages_empty_lists_are_counted_not_fatal() -> None:
    from fedsilo.clients import site_status

    content = RecordDict({"secagg": ConfigRecord({"shares": [], "keys": [b"ab", b"cd"]})})
    msg = Message(content=content, dst_node_id=1, message_type="train")
    assert site_status.message_bytes(msg) == len("shares") + len("keys") + 4


def test_a_codec_compresses_the_dp_release_at_no_privacy_cost(tmp_path: Path) -> None:
    """The same virtual site trains the same round under each codec: its ledger records
    the same spend and its reply the same epsilon, since the codec only post-processes
    the noised model (what it sends decodes to that model, within the codec's rounding)."""
    from fedsilo.task.codec import SCALE, decode

    sent: dict[str, dict[str, torch.Tensor]] = {}
    spends = {}
    epsilons = {}
    glob = global_model(RunConfig()).state_dict()
    for codec in ("float32", "bf16", "int8"):
        run = tmp_path / codec
        cfg = RunConfig(rounds=2, accountant="rdp", run_dir=str(run), update_codec=codec)
        write_site_policies(run, [SitePolicy(max_epsilon=8.0)])
        reply = sim_train(train_message(cfg, 1), sim_context(cfg))
        epsilons[codec] = float(metrics_of(reply)["epsilon"])
        spends[codec] = [s.event for s in ledger.read(simulated_ledger(run, 0)).spends]
        wire = reply.content["arrays"].to_torch_state_dict()  # type: ignore[union-attr]
        sent[codec] = wire
    assert spends["bf16"] == spends["int8"] == spends["float32"] and len(spends["int8"]) == 1
    assert epsilons["bf16"] == epsilons["int8"] == epsilons["float32"]
    # Same seed, same training: the compressed updates stand for the float32 model.
    model = sent["float32"]
    assert all(t.dtype == torch.int8 for k, t in sent["int8"].items() if not k.endswith(SCALE))
    for codec in ("bf16", "int8"):
        out = decode(codec, sent[codec], glob)
        for key, tensor in model.items():
            update = tensor - glob[key]
            step = float(update.abs().max()) / (127 if codec == "int8" else 128)
            assert float((out[key] - tensor).abs().max()) <= step * 1.01, (codec, key)


def test_the_zygote_warm_hook_memoises_the_ledgers_curves_and_trusts_only_an_intact_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zygote_warm reads the ledger `fedsilo client start` names in its environment and
    memoises the RDP curves of its spends; a ledger that is not intact, or none, warms
    nothing (the ClientApp then finds and reports the problem itself)."""
    from fedsilo.clients.client_app import zygote_warm
    from fedsilo.clients.site_env import LEDGER_ENV
    from fedsilo.privacy import accountant, ledger
    from fedsilo.privacy.events import RoundSpend, SampledGaussianEvent
    from fedsilo.privacy.policy import SitePolicy

    path = tmp_path / "ledger.jsonl"
    ledger.ensure_policy(path, "site-a", SitePolicy(max_epsilon=8.0))
    with ledger.transaction(path) as txn:
        txn.append(
            RoundSpend(
                event=SampledGaussianEvent(noise_multiplier=1.234, sample_rate=0.0567, steps=9),
                clip_norm=1.0,
                delta=1e-5,
                dataset="sha256:" + "ab" * 32,
                run="1",
                round=1,
                time="2026-01-01T00:00:00.000Z",
                site="site-a",
            )
        )
    accountant._rdp_curve.cache_clear()
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    zygote_warm()  # no ledger named: nothing
    assert accountant._rdp_curve.cache_info().currsize == 0
    monkeypatch.setenv(LEDGER_ENV, str(path))
    # Execute
    zygote_warm()
    # Assert
    assert accountant._rdp_curve.cache_info().currsize == 2
    accountant._rdp_curve.cache_clear()
    path.write_bytes(path.read_bytes().replace(b"1.234", b"1.235"))  # tampered
    zygote_warm()
    assert accountant._rdp_curve.cache_info().currsize == 0


@pytest.mark.parametrize("update_codec", ["float32", "int8"])
def test_a_site_reads_the_model_it_received_in_place_and_never_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update_codec: str
) -> None:
    """A site trains from the global model as it arrived (fedsilo.flwr_adapter.arrays:
    tensor views over the message's bytes, no copy kept through training): training,
    the codec and the reply leave those bytes exactly as they came."""
    read = spy_on_views(monkeypatch, site_round)
    cfg = RunConfig(rounds=2, accountant="rdp", run_dir=str(tmp_path), update_codec=update_codec)
    write_site_policies(tmp_path, [SitePolicy(max_epsilon=8.0)])
    msg = train_message(cfg, 1)
    received = msg.content["arrays"]
    assert isinstance(received, ArrayRecord)
    before = {k: bytearray(a.data) for k, a in received.items()}  # copies
    # Execute
    reply = sim_train(msg, sim_context(cfg))
    # Assert
    metrics_of(reply)  # trained and answered
    assert read == [received]
    assert {k: bytearray(a.data) for k, a in received.items()} == before
