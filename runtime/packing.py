"""Dense bit packing of b-bit codes (b = 2..8), layout ``dense-le-v1``.

Codes are unsigned integers in ``[0, 2**b)``. They are packed back to back into a byte
stream in little-endian bit order: bit j of code i lands at stream bit ``i*b + j``, and
stream bit k is bit ``k % 8`` of byte ``k // 8``. Codes cross byte boundaries when b does
not divide 8, so ``n`` codes always take exactly ``ceil(n * b / 8)`` bytes: a 3-bit model
is 3/8 of a byte per weight. Unused high bits of the last byte are zero.

Worked example, b = 3, codes [5, 3, 7] = 0b101, 0b011, 0b111::

    stream bits (k = 0..8):  1 0 1 | 1 1 0 | 1 1 1
                              c0     c1      c2       (each code LSB first)
    byte 0 = bits 0..7 -> 0b11_011_101 = 0xDD   (bits 6,7 hold the low two bits of c2)
    byte 1 = bit 8     -> 0b0000000_1  = 0x01   (the high bit of c2)

    >>> pack(np.array([5, 3, 7], dtype=np.uint8), 3).tolist()
    [221, 1]
    >>> unpack(np.array([221, 1], dtype=np.uint8), 3, 3).tolist()
    [5, 3, 7]

For b = 2, 4, 8 this is exactly the layout of onnxruntime's ``MatMulNBits`` blocks (values
packed low bits first), so a row-major ``[N, K]`` weight packs into its blob unchanged.

:func:`pack_reference` / :func:`unpack_reference` are the reference (bit by bit through
``np.unpackbits``). :func:`unpack` runs on the device at load time and uses a faster
shift-and-mask implementation, tested bit-for-bit against the reference.
"""

from __future__ import annotations

import numpy as np

LAYOUT = "dense-le-v1"
WIDTHS = range(2, 9)


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits: ``packed_size(10, 3) -> 4``."""
    return (n * bits + 7) // 8


def _check(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits not in WIDTHS:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    codes = np.ascontiguousarray(codes).reshape(-1)
    if codes.dtype != np.uint8:
        if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
            raise ValueError(f"codes out of range for {bits} bits")
        codes = codes.astype(np.uint8)
    elif bits < 8 and codes.size and codes.max() >= 1 << bits:
        raise ValueError(f"codes out of range for {bits} bits")
    return codes


def pack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (any shape, flattened in C order) into ``ceil(n*bits/8)`` bytes."""
    codes = _check(codes, bits)
    stream = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_reference(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_reference`: the first ``n`` codes as a flat uint8 array."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < packed_size(n, bits):
        raise ValueError(f"{packed.size} bytes hold fewer than {n} codes of {bits} bits")
    stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    return np.packbits(stream, axis=1, bitorder="little").reshape(-1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes into ``ceil(n*bits/8)`` bytes (the reference is already vectorised and fast)."""
    return pack_reference(codes, bits)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Fast :func:`unpack_reference`: the first ``n`` codes as a flat uint8 array."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_size(n, bits)
    if packed.size < need:
        raise ValueError(f"{packed.size} bytes hold fewer than {n} codes of {bits} bits")
    if bits == 8:
        return packed[:n].copy()
    if bits in (2, 4):
        per_byte = 8 // bits
        shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
        out = (packed[: (n + per_byte - 1) // per_byte, None] >> shifts) & np.uint8((1 << bits) - 1)
        return out.reshape(-1)[:n]
    per_chunk, chunk_bytes = _chunk(bits)
    chunks = (n + per_chunk - 1) // per_chunk
    buf = np.zeros((chunks, 8), np.uint8)
    body = np.zeros(chunks * chunk_bytes, np.uint8)
    body[:need] = packed[:need]
    buf[:, :chunk_bytes] = body.reshape(chunks, chunk_bytes)
    words = buf.view("<u8").reshape(-1, 1)
    shifts = np.arange(per_chunk, dtype=np.uint64) * np.uint64(bits)
    out = (words >> shifts) & np.uint64((1 << bits) - 1)
    return out.astype(np.uint8).reshape(-1)[:n]


def _chunk(bits: int) -> tuple[int, int]:
    """Codes per chunk and bytes per chunk: the smallest run of codes that fills whole bytes."""
    per_chunk = 8 // np.gcd(bits, 8)
    return per_chunk, per_chunk * bits // 8
