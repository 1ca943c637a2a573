"""Which samples each rank reads, and in which order: the same for both backends.

Train: epoch ``e`` reads the permutation ``P = permutation(N)`` drawn from ``(seed, e)``, cut to
``steps · W · B`` samples (``W`` ranks, ``B`` per-rank batch; the remainder is dropped so every
rank takes the same number of steps). Global step ``s`` consumes ``P[s·W·B : (s+1)·W·B]`` and
rank ``r`` takes the ``r``-th block of ``B`` of it. Resuming at ``start_step`` slices the list,
so skipped batches are never decoded, and the samples read afterwards are exactly those of an
uninterrupted epoch.

Val: rank ``r`` reads samples ``r, r+W, r+2W, …`` in file order: every sample exactly once over
all ranks, shard lengths differing by at most one.
"""
from __future__ import annotations

import numpy as np


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def train_indices(num_samples: int, batch_size: int, *, rank: int, world_size: int, seed: int,
                  epoch: int, start_step: int = 0) -> np.ndarray:
    """Sample indices rank ``rank`` reads in ``epoch`` from ``start_step`` on, in order."""
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
    used = epoch_permutation(num_samples, seed, epoch)[:steps * world_size * batch_size]
    return used.reshape(steps, world_size, batch_size)[start_step:, rank].reshape(-1)


def val_indices(num_samples: int, *, rank: int, world_size: int) -> np.ndarray:
    return np.arange(rank, num_samples, world_size)


def stream_seed(*parts: int) -> int:
    """A 31-bit seed for a random stream identified by ``parts`` (seed, epoch, rank, …)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)
