"""ChaCha20's keystream (RFC 8439) on the CPU and on any torch device.

The math, apart from the stateful source that uses it (fedsilo.task.rng.SecureRandom):
a keystream is a function of a 256-bit key, a 96-bit nonce and a 32-bit block counter,
and every backend here returns the same little-endian 32-bit words for the same three.

- `openssl_keystream`: the `cryptography` package's ChaCha20 (OpenSSL, SIMD): a CPU
  site's source, ~7 GB/s on one core of the test machines.
- `torch_keystream`: the block function in torch int32 ops (RFC 8439 section 2.3),
  vectorised over blocks: it runs wherever its tensors live, so a GPU site makes its
  keystream on the GPU and no CUDA generator (which anyone could seed) is involved.
  On CUDA with Triton installed (it ships with PyTorch's CUDA wheels) the same block
  function runs as one fused Triton kernel, `triton_keystream`.

The counter starts at block 0 for every key, and a caller never asks for a block past
2^32 - 1 (`COUNTER_BLOCKS`): the source re-keys first. RFC 8439 leaves the counter's
overflow undefined, and `cryptography` releases after 46 raise on it.
"""

from __future__ import annotations

import functools
import struct

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
NONCE_BYTES = 12  # RFC 8439's 96-bit nonce; the other 32 bits of the state are the counter
BLOCK_BYTES = 64
BLOCK_WORDS = 16
COUNTER_BLOCKS = 2**32  # blocks one (key, nonce) can give before its counter would wrap
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
# (a, b, c, d) state indices of the eight quarter rounds of a double round (RFC 8439 2.3)
_ROUNDS = (
    (0, 4, 8, 12),
    (1, 5, 9, 13),
    (2, 6, 10, 14),
    (3, 7, 11, 15),
    (0, 5, 10, 15),
    (1, 6, 11, 12),
    (2, 7, 8, 13),
    (3, 4, 9, 14),
)


def check_span(first_block: int, blocks: int) -> None:
    """Refuse a request that would run the 32-bit block counter past its end."""
    if first_block < 0 or blocks < 0 or first_block + blocks > COUNTER_BLOCKS:
        raise ValueError(
            f"blocks {first_block}..{first_block + blocks - 1} run past ChaCha20's 32-bit "
            "block counter; the caller must re-key before the counter wraps"
        )


_ZEROS = bytes(1 << 19)  # the plaintext: keystream XOR 0 = keystream


def openssl_keystream(key: bytes, nonce: bytes, first_block: int, out: memoryview) -> None:
    """Write the keystream from block `first_block` on into `out` (whole or partial blocks)."""
    check_span(first_block, -(-len(out) // BLOCK_BYTES))
    # cryptography's 16-byte ChaCha20 nonce is the counter (little-endian) then the nonce
    full = first_block.to_bytes(4, "little") + nonce
    stream = Cipher(algorithms.ChaCha20(key, full), None).encryptor()
    zeros = memoryview(_ZEROS)
    for start in range(0, len(out), len(_ZEROS)):  # one pass, no copies
        part = out[start : start + len(_ZEROS)]
        stream.update_into(zeros[: len(part)], part)


def _words(data: bytes, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}I", data)


def _i32(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


def _rotl(x: torch.Tensor, bits: int) -> torch.Tensor:
    # int32 >> is arithmetic: mask the sign's copies away to get the logical shift
    return (x << bits) | ((x >> (32 - bits)) & ((1 << bits) - 1))


def torch_keystream(
    key: bytes, nonce: bytes, first_block: int, blocks: int, device: torch.device
) -> torch.Tensor:
    """`blocks` x 16 int32 keystream words from block `first_block` on, made on `device`."""
    check_span(first_block, blocks)
    if device.type == "cuda" and triton_available():
        return triton_keystream(key, nonce, first_block, blocks, device)
    counter = torch.arange(first_block, first_block + blocks, dtype=torch.int64, device=device)
    counter = torch.where(counter >= 2**31, counter - 2**32, counter).to(torch.int32)
    fixed = [*_SIGMA, *_words(key, 8), 0, *_words(nonce, 3)]
    init = [torch.full((blocks,), _i32(w), dtype=torch.int32, device=device) for w in fixed]
    init[12] = counter
    x = [t.clone() for t in init]
    for _ in range(10):
        for a, b, c, d in _ROUNDS:
            x[a] = x[a] + x[b]
            x[d] = _rotl(x[d] ^ x[a], 16)
            x[c] = x[c] + x[d]
            x[b] = _rotl(x[b] ^ x[c], 12)
            x[a] = x[a] + x[b]
            x[d] = _rotl(x[d] ^ x[a], 8)
            x[c] = x[c] + x[d]
            x[b] = _rotl(x[b] ^ x[c], 7)
    return torch.stack([xi + ii for xi, ii in zip(x, init, strict=True)], dim=1)


@functools.cache
def triton_available() -> bool:
    """Whether the fused CUDA kernel can be used (Triton imports and CUDA is present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_keystream(
    key: bytes, nonce: bytes, first_block: int, blocks: int, device: torch.device
) -> torch.Tensor:
    """`torch_keystream`'s words from one fused Triton kernel (CUDA, or Triton's interpreter)."""
    from fedsilo.task import chacha_triton  # imports triton: only where it is installed

    check_span(first_block, blocks)
    state = [*_SIGMA, *_words(key, 8), 0, *_words(nonce, 3)]
    words = torch.tensor([_i32(w) for w in state], dtype=torch.int32, device=device)
    out = torch.empty((blocks, BLOCK_WORDS), dtype=torch.int32, device=device)
    if blocks:
        chacha_triton.blocks(out, words, first_block, blocks)
    return out
