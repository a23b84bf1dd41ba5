"""Codecs: how a local-DP site's update (run config `update-codec`) and the global model
the server sends it (`model-codec`) cross the wire.

Updates, site to server:

- `float32` (default): the site sends its trained model itself, as it always has.
- `bf16`: the site sends its update u = trained - global, rounded to bfloat16 (round to
  nearest even), as the tensors' 16-bit patterns (int16): half the bytes.
- `int8`: the site sends u per tensor as a scale s = max |u| (float32) and q =
  floor(127 u / s + U), U uniform on [0, 1) drawn afresh for each value (stochastic
  rounding): q is in [-127, 127] and E[q s / 127] = u, so the update is unbiased and
  FedAvg's mean of many sites' updates averages the rounding out. A quarter of the bytes.

Only floating-point tensors are compressed; any other tensor of the model (an integer
buffer) goes as it is. The server reads each reply as the model global + decoded u
(fedsilo.server.replies), so every aggregation rule sees models as before; its checks
and FedAvg's running mean decode a piece of DECODE_CHUNK values at a time
(`decoded_pieces`), so it never holds a decoded model there. A reply that does not fit
the run's codec (a missing or extra key, a dtype or shape that is not the codec's, a
scale that is negative or not finite, an int8 value of -128) is invalid: the server
leaves it out and says why.

The global model, server to site (`encode_model`, `decode_model`): bf16 sends each
floating-point tensor's bfloat16 patterns under KEY@bf16; int8 sends q = round(127 w / s),
s = max |w|, under KEY@int8 with s under KEY@scale (round to nearest, so a resent round
and a restarted server send the very same model). Self-describing: a site decodes what
it gets without knowing the codec. The server keeps its model in full precision: it
decodes replies against the model it sent (w' = decode(encode(w))), and adds w - w' to
what it aggregates, so the rounding of the sent model never accumulates over rounds.
The global model is the server's to publish to the sites: compressing it costs no
privacy either.

Privacy: the codec runs on the site's DP release. The update is a function of the
site's noised model and the global model, which the server sent; the rounding draws
randomness independent of the data. So a codec is post-processing and costs no privacy:
the site's accounting and ledger are the same for every codec (a test checks it).
Distributed DP (`--dp distributed`) has an integer encoding of its own, the secure sum's
ring (fedsilo.privacy.distributed); the run config refuses a codec other than float32
there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

# The suffix of an int8 tensor's scale: never part of a PyTorch state-dict key
# (attribute names joined by ".").
SCALE = "@scale"
INT8_MAX = 127
MODEL_TAGS = {"bf16": "@bf16", "int8": "@int8"}  # a sent model's coded tensors

INT8_CHUNK = 1 << 20  # values rounded at a time (bounds the uniforms' memory)
# values decoded at a time (4 MiB of float32): the server never holds a decoded model
DECODE_CHUNK = 1 << 20
Uniform = Callable[[int], torch.Tensor]  # n uniforms in [0, 1) (fedsilo.task.rng.SiteRandom)


class CodecError(ValueError):
    """A reply that does not fit the run's codec; the message says what does not."""


def encode(
    codec: str,
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    uniform: Uniform,
) -> dict[str, torch.Tensor]:
    """The tensors a site sends for its `trained` model under `codec` (see the module)."""
    if codec == "float32":
        return dict(trained)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in trained.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        update = tensor.detach().to(torch.float32) - global_state[key].to(torch.float32)
        if codec == "bf16":
            out[key] = update.to(torch.bfloat16).view(torch.int16)
        elif codec == "int8":
            out[key], out[key + SCALE] = _int8(update, uniform)
        else:
            raise ValueError(f"unknown codec {codec!r}")
    return out


def _int8(values: torch.Tensor, uniform: Uniform | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): s = max |values|, q = values * 127 / s rounded stochastically with
    `uniform` (an update), or to nearest without it (a sent model).

    In chunks of INT8_CHUNK values: the uniforms of a 17 M-parameter tensor would
    otherwise take ~20 bytes a value at once (words, float64, float32) on top of it."""
    scale = values.abs().max() if values.numel() else torch.tensor(0.0)
    if not float(scale) > 0.0:  # all zeros (or empty): nothing to round
        return torch.zeros_like(values, dtype=torch.int8), torch.tensor(0.0)
    factor = INT8_MAX / scale
    q = torch.empty(values.shape, dtype=torch.int8)
    flat, q_flat = values.reshape(-1), q.view(-1)
    for start in range(0, flat.numel(), INT8_CHUNK):
        part = flat[start : start + INT8_CHUNK] * factor
        if uniform is None:
            part.round_()
        else:
            part.add_(uniform(part.numel()).to(torch.float32)).floor_()
        q_flat[start : start + part.numel()] = part.clamp_(-INT8_MAX, INT8_MAX)
    return q, scale.to(torch.float32).reshape(())


def decode(
    codec: str, wire: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model a site's `wire` tensors stand for, in the global model's dtypes.

    Raises:
        CodecError: `wire` does not fit `codec` for this global model.
    """
    check_update(codec, wire, global_state)
    if codec == "float32":
        return dict(wire)
    out: dict[str, torch.Tensor] = {}
    for key, ref in global_state.items():
        if not ref.is_floating_point():
            out[key] = wire[key]
            continue
        out[key] = torch.empty(ref.shape, dtype=ref.dtype)
        flat = out[key].view(-1)
        for start, piece in decoded_pieces(codec, wire, global_state, key):
            flat[start : start + piece.numel()] = piece
    return out


def check_update(
    codec: str, wire: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> None:
    """Everything `decode` checks about a reply's tensors, decoding none of them.

    Raises:
        CodecError: `wire` does not fit `codec` for this global model.
    """
    if codec == "float32":
        return
    expected = set(global_state)
    if codec == "int8":
        expected |= {k + SCALE for k, t in global_state.items() if t.is_floating_point()}
    if set(wire) != expected:
        missing, extra = sorted(expected - set(wire)), sorted(set(wire) - expected)
        raise CodecError(
            f"{codec} update keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    dtype = torch.int16 if codec == "bf16" else torch.int8
    for key, ref in global_state.items():
        got = wire[key]
        if not ref.is_floating_point():
            continue
        if got.dtype != dtype or tuple(got.shape) != tuple(ref.shape):
            raise CodecError(
                f"`{key}` is {tuple(got.shape)} {got.dtype}; the {codec} codec sends "
                f"{tuple(ref.shape)} {dtype}"
            )
        if codec == "int8":
            _int8_scale(key, got, wire[key + SCALE])


def decoded_pieces(
    codec: str,
    wire: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    key: str,
    chunk: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The floating-point tensor `key` of the model `wire` stands for, flat, in pieces of
    at most `chunk` values: (offset, a new tensor in the global model's dtype), each bit
    for bit that part of `decode`'s tensor. For a reader that needs one piece at a time
    (validation, the server's running mean): a whole decoded model is never held.
    `wire` must have passed `check_update`.
    """
    ref = global_state[key].reshape(-1)
    got = wire[key].reshape(-1)
    # check_update checked the scale and the values: not again for every reader
    k = float(wire[key + SCALE].reshape(())) / INT8_MAX if codec == "int8" else 0.0
    chunk = chunk or DECODE_CHUNK
    for start in range(0, ref.numel(), chunk):
        part = got[start : start + chunk]
        if codec == "bf16":
            update = part.view(torch.bfloat16).to(torch.float32)
        else:
            update = part.to(torch.float32) * k
        yield start, (ref[start : start + chunk].to(torch.float32) + update).to(ref.dtype)


def _int8_scale(key: str, q: torch.Tensor, scale: torch.Tensor) -> float:
    """An int8 tensor's scale, once it and the values are checked."""
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise CodecError(f"`{key}{SCALE}` is {tuple(scale.shape)} {scale.dtype}, not a float32")
    s = float(scale.reshape(()))
    if not (s >= 0.0 and s < float("inf")):
        raise CodecError(f"`{key}{SCALE}` is {s}: a scale is finite and >= 0")
    if q.numel() and int(q.min()) < -INT8_MAX:
        raise CodecError(f"`{key}` holds -128: int8 values are in [-127, 127]")
    return s


def _from_int8(key: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * (_int8_scale(key, q, scale) / INT8_MAX)


def encode_model(codec: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the server sends for its global model `state` under `codec` (see the
    module): floating-point tensors coded under KEY@bf16 or KEY@int8 (+ KEY@scale)."""
    if codec == "float32":
        return dict(state)
    if codec not in MODEL_TAGS:
        raise ValueError(f"unknown codec {codec!r}")
    tag = MODEL_TAGS[codec]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            out[key] = tensor
        elif codec == "bf16":
            out[key + tag] = tensor.detach().to(torch.bfloat16).view(torch.int16)
        else:
            out[key + tag], out[key + SCALE] = _int8(tensor.detach().to(torch.float32), None)
    return out


def decode_model(wire: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model a server's `wire` tensors stand for, coded tensors as float32; any
    codec (the tags say which).

    Raises:
        CodecError: a coded tensor of the wrong dtype, or an int8 one without its scale.
    """
    out: dict[str, torch.Tensor] = {}
    scales = {k for k in wire if k.endswith(SCALE)}
    used: set[str] = set()
    for key, tensor in wire.items():
        if key in scales:
            continue
        if key.endswith(MODEL_TAGS["bf16"]):
            name = key.removesuffix(MODEL_TAGS["bf16"])
            if tensor.dtype != torch.int16:
                raise CodecError(f"`{key}` is {tensor.dtype}; bf16 patterns are int16")
            out[name] = tensor.view(torch.bfloat16).to(torch.float32)
        elif key.endswith(MODEL_TAGS["int8"]):
            name = key.removesuffix(MODEL_TAGS["int8"])
            if tensor.dtype != torch.int8 or name + SCALE not in wire:
                raise CodecError(f"`{key}` is {tensor.dtype}, with no `{name}{SCALE}`")
            out[name] = _from_int8(name, tensor, wire[name + SCALE])
            used.add(name + SCALE)
        else:
            out[key] = tensor
    if scales - used:
        raise CodecError(f"scales without their tensors: {sorted(scales - used)[:3]}")
    return out
