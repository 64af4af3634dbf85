"""Deterministic byte pattern shared with the Rust testkit (`cfr_testkit::origins::pattern_fill`).

Byte i of pattern `seed` is byte i % 8 (little endian) of splitmix64(seed, i // 8). Position
addressable, so a long stream can be produced (and hashed) chunk by chunk.
"""

import hashlib

_M = (1 << 64) - 1

# Seeds used by the Rust origins (keep in sync with crates/testkit/src/origins.rs).
BYTES_ROUTE_SEED = 0  # GET /bytes/N
TLS_UPLOAD_SEED = 1
TLS_DOWNLOAD_SEED = 2


def splitmix64(seed: int, index: int) -> int:
    z = ((seed + index + 1) * 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def pattern_bytes(seed: int, offset: int, length: int) -> bytes:
    if length <= 0:
        return b""
    first, last = offset // 8, (offset + length - 1) // 8
    words = b"".join(splitmix64(seed, i).to_bytes(8, "little") for i in range(first, last + 1))
    start = offset - first * 8
    return words[start : start + length]


def pattern_sha256(seed: int, length: int, chunk: int = 1 << 16) -> str:
    h = hashlib.sha256()
    off = 0
    while off < length:
        n = min(chunk, length - off)
        h.update(pattern_bytes(seed, off, n))
        off += n
    return h.hexdigest()
