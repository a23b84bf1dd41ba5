"""ChaCha20's block function (RFC 8439 section 2.3) as one fused Triton kernel.

Imported only where Triton is installed (PyTorch's CUDA wheels bring it):
fedsilo.task.chacha.triton_keystream calls `blocks`. Each program makes SIZE
consecutive 64-byte blocks, the 16 state words in registers as uint32 (Triton's
shifts on unsigned words are logical, its adds wrap). Checked bit for bit against the
RFC's vectors and the CPU keystream on a GPU and in Triton's interpreter
(TRITON_INTERPRET=1, tests/task/test_chacha.py).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

SIZE = 256  # ChaCha blocks per Triton program


@triton.jit  # type: ignore[untyped-decorator]
def _qr(a: Any, b: Any, c: Any, d: Any) -> Any:
    a = a + b
    d = d ^ a
    d = (d << 16) | (d >> 16)
    c = c + d
    b = b ^ c
    b = (b << 12) | (b >> 20)
    a = a + b
    d = d ^ a
    d = (d << 8) | (d >> 24)
    c = c + d
    b = b ^ c
    b = (b << 7) | (b >> 25)
    return a, b, c, d


@triton.jit  # type: ignore[untyped-decorator]
def _kernel(out: Any, words: Any, first: Any, blocks: Any, size: tl.constexpr) -> None:
    i = tl.program_id(0) * size + tl.arange(0, size)
    live = i < blocks
    zero = tl.zeros([size], dtype=tl.uint32)
    # `words`: the 16 initial state words (slot 12 unused); block i's counter is first + i
    s0 = zero + tl.load(words + 0).to(tl.uint32, bitcast=True)
    s1 = zero + tl.load(words + 1).to(tl.uint32, bitcast=True)
    s2 = zero + tl.load(words + 2).to(tl.uint32, bitcast=True)
    s3 = zero + tl.load(words + 3).to(tl.uint32, bitcast=True)
    s4 = zero + tl.load(words + 4).to(tl.uint32, bitcast=True)
    s5 = zero + tl.load(words + 5).to(tl.uint32, bitcast=True)
    s6 = zero + tl.load(words + 6).to(tl.uint32, bitcast=True)
    s7 = zero + tl.load(words + 7).to(tl.uint32, bitcast=True)
    s8 = zero + tl.load(words + 8).to(tl.uint32, bitcast=True)
    s9 = zero + tl.load(words + 9).to(tl.uint32, bitcast=True)
    s10 = zero + tl.load(words + 10).to(tl.uint32, bitcast=True)
    s11 = zero + tl.load(words + 11).to(tl.uint32, bitcast=True)
    s12 = (first + i).to(tl.uint32)
    s13 = zero + tl.load(words + 13).to(tl.uint32, bitcast=True)
    s14 = zero + tl.load(words + 14).to(tl.uint32, bitcast=True)
    s15 = zero + tl.load(words + 15).to(tl.uint32, bitcast=True)
    x0, x1, x2, x3, x4, x5, x6, x7 = s0, s1, s2, s3, s4, s5, s6, s7
    x8, x9, x10, x11, x12, x13, x14, x15 = s8, s9, s10, s11, s12, s13, s14, s15
    for _ in range(10):  # ten double rounds: columns, then diagonals
        x0, x4, x8, x12 = _qr(x0, x4, x8, x12)
        x1, x5, x9, x13 = _qr(x1, x5, x9, x13)
        x2, x6, x10, x14 = _qr(x2, x6, x10, x14)
        x3, x7, x11, x15 = _qr(x3, x7, x11, x15)
        x0, x5, x10, x15 = _qr(x0, x5, x10, x15)
        x1, x6, x11, x12 = _qr(x1, x6, x11, x12)
        x2, x7, x8, x13 = _qr(x2, x7, x8, x13)
        x3, x4, x9, x14 = _qr(x3, x4, x9, x14)
    base = out + i * 16
    tl.store(base + 0, (x0 + s0).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 1, (x1 + s1).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 2, (x2 + s2).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 3, (x3 + s3).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 4, (x4 + s4).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 5, (x5 + s5).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 6, (x6 + s6).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 7, (x7 + s7).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 8, (x8 + s8).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 9, (x9 + s9).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 10, (x10 + s10).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 11, (x11 + s11).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 12, (x12 + s12).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 13, (x13 + s13).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 14, (x14 + s14).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 15, (x15 + s15).to(tl.int32, bitcast=True), mask=live)


def blocks(out: torch.Tensor, words: torch.Tensor, first: int, count: int) -> None:
    """Fill `out` (count x 16 int32) with the keystream blocks first .. first + count - 1."""
    _kernel[(-(-count // SIZE),)](out, words, first, count, size=SIZE)
