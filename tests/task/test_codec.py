"""Update codecs: what a site sends under each, what the server makes of it, and what it
refuses (fedsilo.task.codec)."""

from __future__ import annotations

import pytest
import torch

from fedsilo.task.codec import (
    MODEL_TAGS,
    SCALE,
    CodecError,
    check_update,
    decode,
    decode_model,
    decoded_pieces,
    encode,
    encode_model,
)
from fedsilo.task.rng import SeededRandom


def models(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global, trained): float tensors a small update apart, plus an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    glob = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    trained = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in glob.items() if k != "steps"
    }
    trained["steps"] = torch.tensor(7)
    glob["steps"] = torch.tensor(7)
    return glob, trained


def test_float32_sends_the_model_itself() -> None:
    glob, trained = models()
    wire = encode("float32", trained, glob, SeededRandom(0).uniform)
    assert wire.keys() == trained.keys() and all(wire[k] is trained[k] for k in wire)
    assert decode("float32", wire, glob) == wire


def test_bf16_sends_half_the_bytes_and_the_update_to_bf16_precision() -> None:
    glob, trained = models()
    wire = encode("bf16", trained, glob, SeededRandom(0).uniform)
    assert wire["w"].dtype == torch.int16 and wire["steps"].dtype == torch.int64
    floats = sum(trained[k].numel() * 4 for k in ("w", "b"))
    assert sum(wire[k].numel() * wire[k].element_size() for k in ("w", "b")) == floats // 2
    out = decode("bf16", wire, glob)
    for k in ("w", "b"):
        update = trained[k] - glob[k]
        # bf16 keeps 8 significant bits: the update's relative error is at most 2^-8
        assert torch.allclose(out[k] - glob[k], update, rtol=2**-8, atol=1e-6)
        assert out[k].dtype == torch.float32
    assert torch.equal(out["steps"], trained["steps"])


def test_int8_is_a_quarter_of_the_bytes_in_range_and_unbiased() -> None:
    glob, trained = models()
    wire = encode("int8", trained, glob, SeededRandom(0).uniform)
    assert wire["w"].dtype == torch.int8 and wire["w" + SCALE].shape == ()
    assert int(wire["w"].min()) >= -127 and int(wire["w"].max()) <= 127
    assert float(wire["w" + SCALE]) == pytest.approx(float((trained["w"] - glob["w"]).abs().max()))
    assert wire["w"].numel() == trained["w"].numel()  # 1 byte a value, and 4 for the scale
    # Unbiased: the mean of many independent roundings converges to the update itself,
    # far closer than one rounding is (its error is up to one step, scale / 127).
    update = trained["w"] - glob["w"]
    step = float(wire["w" + SCALE]) / 127
    rng = SeededRandom(1)
    mean = (
        sum(
            decode("int8", encode("int8", trained, glob, rng.uniform), glob)["w"] - glob["w"]
            for _ in range(400)
        )
        / 400
    )
    one = decode("int8", wire, glob)["w"] - glob["w"]
    assert float((one - update).abs().max()) <= step * 1.001
    assert float((mean - update).abs().mean()) < step * 0.05
    assert abs(float((mean - update).mean())) < step * 0.01  # no drift in either direction


def test_int8_rounds_in_chunks_exactly_as_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks bound the uniforms' memory; each value still gets its own fresh uniform.
    from fedsilo.task import codec

    glob, trained = models()
    update = (trained["w"] - glob["w"]).reshape(-1)
    drawn: list[torch.Tensor] = []

    def uniform(n: int) -> torch.Tensor:
        drawn.append(torch.rand(n, dtype=torch.float64))
        return drawn[-1]

    monkeypatch.setattr(codec, "INT8_CHUNK", 7)  # chunks that split rows, a short last one
    wire = encode("int8", trained, glob, uniform)
    u = torch.cat(drawn)
    assert u.numel() == update.numel() + trained["b"].numel()  # "w", then "b"
    assert max(d.numel() for d in drawn) == 7
    u = u[: update.numel()]
    scale = update.abs().max()
    expected = torch.floor(update * (127 / scale) + u.to(torch.float32)).clamp(-127, 127)
    assert torch.equal(wire["w"].reshape(-1), expected.to(torch.int8))
    sent = codec.encode_model("int8", trained)  # to nearest, chunked the same way
    assert torch.equal(
        sent["w" + codec.MODEL_TAGS["int8"]].reshape(-1),
        torch.round(trained["w"].reshape(-1) * (127 / trained["w"].abs().max())).to(torch.int8),
    )


def test_a_zero_update_is_sent_exactly() -> None:
    glob, _ = models()
    wire = encode("int8", glob, glob, SeededRandom(0).uniform)
    assert float(wire["w" + SCALE]) == 0.0 and not wire["w"].any()
    assert all(torch.equal(v, glob[k]) for k, v in decode("int8", wire, glob).items())


@pytest.mark.parametrize(
    ("codec", "tamper", "reason"),
    [
        ("int8", lambda w: w.pop("w" + SCALE), "missing ['w@scale']"),
        ("int8", lambda w: w.update(extra=torch.zeros(1)), "unexpected ['extra']"),
        (
            "bf16",
            lambda w: w.update(w=torch.zeros(64, 32)),
            "the bf16 codec sends (64, 32) torch.int16",
        ),
        ("int8", lambda w: w.update(w=torch.zeros(64, 31, dtype=torch.int8)), "`w` is (64, 31)"),
        ("int8", lambda w: w.update({"w" + SCALE: torch.tensor(-1.0)}), "finite and >= 0"),
        ("int8", lambda w: w.update({"w" + SCALE: torch.tensor(float("inf"))}), "finite and >= 0"),
        ("int8", lambda w: w.update({"w" + SCALE: torch.tensor(float("nan"))}), "finite and >= 0"),
        ("int8", lambda w: w.update({"w" + SCALE: torch.ones(2)}), "not a float32"),
        ("int8", lambda w: w["w"].view(-1).__setitem__(0, -128), "holds -128"),
    ],
)
def test_a_reply_that_does_not_fit_its_codec_is_refused_saying_why(
    codec: str, tamper: object, reason: str
) -> None:
    glob, trained = models()
    wire = encode(codec, trained, glob, SeededRandom(0).uniform)
    tamper(wire)  # type: ignore[operator]
    with pytest.raises(CodecError) as err:
        decode(codec, wire, glob)
    assert reason in str(err.value)
    with pytest.raises(CodecError) as err:  # the server's check, decoding nothing
        check_update(codec, wire, glob)
    assert reason in str(err.value)


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_decoding_in_pieces_is_the_one_pass_formula_bit_for_bit(
    codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server decodes a reply a piece at a time (fedsilo.task.codec.DECODE_CHUNK
    values); every value is exactly global + the update the wire holds."""
    from fedsilo.task import codec as module

    glob, trained = models()
    wire = encode(codec, trained, glob, SeededRandom(0).uniform)
    monkeypatch.setattr(module, "DECODE_CHUNK", 7)  # pieces that split rows, a short last one
    sizes = [p.numel() for _, p in decoded_pieces(codec, wire, glob, "w")]
    assert sizes == [7] * (64 * 32 // 7) + [64 * 32 % 7]
    got = decode(codec, wire, glob)
    for key in ("w", "b"):
        if codec == "int8":
            update = wire[key].to(torch.float32) * (float(wire[key + SCALE]) / 127)
        else:
            update = wire[key].view(torch.bfloat16).to(torch.float32)
        assert torch.equal(got[key], glob[key] + update), key
    assert torch.equal(got["steps"], trained["steps"])


# ---------------------------------------------------------------- the global model


def test_the_model_codecs_send_fewer_bytes_deterministically_and_decode_without_the_codec() -> None:
    glob, _ = models()
    for name, width, tolerance in (("bf16", 2, 2**-8), ("int8", 1, 1 / 254)):
        wire = encode_model(name, glob)
        again = encode_model(name, glob)  # round to nearest: a resent round is the same
        assert again.keys() == wire.keys() and all(torch.equal(wire[k], again[k]) for k in wire)
        tag = MODEL_TAGS[name]
        assert wire["w" + tag].element_size() == width and wire["steps"] is glob["steps"]
        read = decode_model(wire)  # a site reads it by its tags alone
        assert read.keys() == glob.keys()
        for key in ("w", "b"):
            assert read[key].dtype == torch.float32
            err = (read[key] - glob[key]).abs().max()
            assert err <= tolerance * glob[key].abs().max() + 1e-7
    plain = decode_model(encode_model("float32", glob))
    assert plain.keys() == glob.keys() and all(plain[k] is glob[k] for k in glob)


def test_a_sent_model_that_does_not_decode_is_refused_saying_why() -> None:
    glob, _ = models()
    wire = encode_model("int8", glob)
    for broken, match in (
        ({**wire, "w@int8": wire["w@int8"].to(torch.int16)}, "no `w@scale`"),
        ({k: v for k, v in wire.items() if k != "w@scale"}, "no `w@scale`"),
        ({**wire, "x@scale": torch.tensor(1.0)}, "scales without their tensors"),
        ({"w@bf16": torch.zeros(3, dtype=torch.int8)}, "bf16 patterns are int16"),
    ):
        with pytest.raises(CodecError, match=match):
            decode_model(broken)
