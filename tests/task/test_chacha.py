"""ChaCha20's keystream is the RFC's on every backend, and its counter never wraps.

The CUDA kernel runs in Triton's interpreter where Triton is installed (CI has no
Triton: that test skips and says so) and on a GPU where there is one.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fedsilo.task.chacha import (
    COUNTER_BLOCKS,
    check_span,
    openssl_keystream,
    torch_keystream,
)

CPU = torch.device("cpu")
# RFC 8439: section 2.3.2 (the block function) and appendix A.1 (vectors 1 to 3)
VECTORS = [
    (
        bytes(range(32)),
        bytes.fromhex("000000090000004a00000000"),
        1,
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e",
    ),
    (
        bytes(32),
        bytes(12),
        0,
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586",
    ),
    (
        bytes(32),
        bytes(12),
        1,
        "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
        "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f",
    ),
    (
        bytes(31) + b"\x01",
        bytes(12),
        1,
        "3aeb5224ecf849929b9d828db1ced4dd832025e8018b8160b82284f3c949aa5a"
        "8eca00bbb4a73bdad192b5c42f73f2fd4e273644c8b36125a64addeb006c13a0",
    ),
]


def as_bytes(words: torch.Tensor) -> bytes:
    return words.cpu().contiguous().numpy().tobytes()


@pytest.mark.parametrize(("key", "nonce", "block", "expected"), VECTORS)
def test_both_cpu_backends_give_the_rfc_8439_vectors(
    key: bytes, nonce: bytes, block: int, expected: str
) -> None:
    out = bytearray(64)
    openssl_keystream(key, nonce, block, memoryview(out))
    assert out.hex() == expected
    assert as_bytes(torch_keystream(key, nonce, block, 1, CPU)).hex() == expected


@pytest.mark.parametrize("first", [0, 2**31 - 3, COUNTER_BLOCKS - 5])
def test_torch_keystream_is_openssls_at_any_counter(first: int) -> None:
    # 2^31 is where int32 counters turn negative; 2^32 - 1 is the last block there is
    key, nonce = os.urandom(32), os.urandom(12)
    blocks = 5 if first == COUNTER_BLOCKS - 5 else 300
    out = bytearray(64 * blocks)
    openssl_keystream(key, nonce, first, memoryview(out))
    assert as_bytes(torch_keystream(key, nonce, first, blocks, CPU)) == bytes(out)


def test_partial_blocks_are_the_streams_prefix() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    whole, part = bytearray(128), bytearray(100)
    openssl_keystream(key, nonce, 7, memoryview(whole))
    openssl_keystream(key, nonce, 7, memoryview(part))
    assert bytes(part) == bytes(whole[:100])


def test_no_backend_runs_the_counter_past_its_32_bits() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    check_span(COUNTER_BLOCKS - 1, 1)  # the last block is fine
    for call in (
        lambda: check_span(COUNTER_BLOCKS - 1, 2),
        lambda: openssl_keystream(key, nonce, COUNTER_BLOCKS - 1, memoryview(bytearray(65))),
        lambda: torch_keystream(key, nonce, COUNTER_BLOCKS - 2, 3, CPU),
    ):
        with pytest.raises(ValueError, match="re-key before the counter wraps"):
            call()


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (it comes with PyTorch's CUDA wheels); the kernel "
    "is checked in Triton's interpreter or on a GPU where it is",
)
def test_triton_kernel_gives_the_rfc_vectors_and_the_cpu_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsilo.task.chacha import triton_keystream

    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if device == CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel module is imported
    for key, nonce, block, expected in VECTORS:
        assert as_bytes(triton_keystream(key, nonce, block, 1, device)).hex() == expected
    key, nonce = os.urandom(32), os.urandom(12)
    for first in (0, 2**31 - 100, COUNTER_BLOCKS - 600):  # 600 blocks: several programs
        out = bytearray(64 * 600)
        openssl_keystream(key, nonce, first, memoryview(out))
        assert as_bytes(triton_keystream(key, nonce, first, 600, device)) == bytes(out)
