"""Stateless index shuffles: position -> element of a seeded permutation, in O(1) time and memory per index.

A training stream must give the batch at step t as a pure function of (seed, t) without building an
n-element permutation (O(corpus) memory and time at every epoch and every resume). `index_shuffle` is
a keyed Feistel network on the smallest even-bit power-of-two domain that holds n, with cycle walking
back into `[0, n)` (Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002): a bijection
of `range(n)` for every key. Levanter's `Permutation` and Grain's `index_shuffle` do the same; this
one is vectorised numpy, so a whole batch of positions costs a few array operations and gives the same
bits on every platform and process.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
ROUNDS = 6


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a fast, well-distributed hash."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def fold_key(*values: int) -> int:
    """One 64-bit key from integers (seed, epoch, stage, ...), order-sensitive; any Python ints (mod 2**64)."""
    h = np.zeros(1, np.uint64)
    with np.errstate(over="ignore"):
        for v in values:
            h = mix64(h * _GOLDEN + np.asarray([int(v) % 2 ** 64], np.uint64))
    return int(h[0])


def index_shuffle(index, n: int, key: int) -> np.ndarray:
    """Element at positions `index` (int array, each in `[0, n)`) of the permutation of `range(n)` given by `key`.

    `index_shuffle(np.arange(n), n, key)` is a permutation of `range(n)` for every key; distinct keys give
    unrelated permutations. O(len(index)) time and memory whatever n (n < 2**62). Raises ValueError for
    n < 1 or an index outside `[0, n)`.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"index_shuffle: n must be >= 1, got {n}")
    x = np.asarray(index, np.int64).copy()
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"index_shuffle: indices must lie in [0, {n})")
    if n == 1:
        return np.zeros_like(x)
    bits = max(2, (int(n - 1).bit_length() + 1) // 2 * 2)        # even, so the two halves are equal
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = mix64(np.asarray([fold_key(key, r) for r in range(ROUNDS)], np.uint64))
    out = x.astype(np.uint64)
    todo = np.ones(out.shape, bool)
    while todo.any():                                            # cycle walking: at most a few passes
        v = out[todo]
        left, right = v >> half, v & mask
        for k in keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        v = (left << half) | right
        out[todo] = v
        todo[todo] = v >= np.uint64(n)
    return out.astype(np.int64)


__all__ = ["ROUNDS", "fold_key", "index_shuffle", "mix64"]
