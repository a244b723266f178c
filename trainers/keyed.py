"""Random numbers keyed by (seed, epoch, sample index, view), so a sample's augmentation does not
depend on which batch, rank or worker process draws it.

Data-parallel training splits each global batch over W processes, and DataLoader workers decode
samples in whatever order they are scheduled. A shared random stream (one generator drawn from in
batch order) would give a sample different crops under W = 1 and W = 8, and a resumed run would
have to replay the stream up to where it stopped. A counter-based generator has neither problem: a
sample's numbers are a pure function of its key (the idea of Philox / JAX's ``fold_in``).

The mixing function is SplitMix64's finaliser (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014), applied to the key fields one after the other;
``tests/unit/test_keyed.py`` checks uniformity, independence between columns and keys, and that a
subset of indices gets exactly its rows of the full draw.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (arithmetic wraps modulo 2^64)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _fold(h: np.ndarray, value: int | np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        v = np.asarray(value, dtype=np.uint64) if not isinstance(value, int) else np.uint64(value & _MASK)
        return _mix(h ^ (v * _GOLDEN + _GOLDEN))


def uniforms(seed: int, epoch: int, index: np.ndarray | list[int], view: int, columns: int) -> np.ndarray:
    """``len(index)`` × ``columns`` float64 numbers in [0, 1), row i a function of
    (seed, epoch, index[i], view) alone.

    index: dataset indices (any integer array-like of shape N). Raises ValueError for a negative
    ``columns``."""
    if columns < 0:
        raise ValueError(f"columns must be >= 0, got {columns}")
    idx = np.asarray(index, dtype=np.int64).astype(np.uint64).reshape(-1)
    h = _fold(_fold(_fold(np.full(1, _GOLDEN, dtype=np.uint64), seed), epoch), view)
    h = _fold(np.broadcast_to(h, idx.shape).copy(), idx)  # N
    cols = np.arange(1, columns + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _mix(h[:, None] + cols[None, :] * _GOLDEN)  # N×columns
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
