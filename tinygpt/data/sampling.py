"""Which examples a batch holds: a pure function of (seed, step, rank), so resuming needs only the step.

Knows nothing about what the examples are; chat and preference datasets share it, and token
shards share its argument checks.
"""

from __future__ import annotations

import numpy as np


def check_batch_position(step: int, batch_size: int, *, seed: int, rank: int, world_size: int) -> None:
    """Refuse a batch request no sampler can serve: the arguments every pure-function batcher takes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")


def epoch_indices(n: int, step: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """Indices (into ``n`` examples) of this rank's rows of global batch ``step``.

    The examples form an endless stream, epoch after epoch, each epoch a fresh permutation seeded
    by ``(seed, epoch)``. Global batch ``step`` is positions ``[step*G, (step+1)*G)`` of that stream
    (``G = batch_size * world_size``) and rank ``r`` takes its ``r``-th slice, so N ranks together
    read exactly what one process with batch ``G`` reads.
    """
    if n < 1:
        raise ValueError("no examples to draw batches from")
    check_batch_position(step, batch_size, seed=seed, rank=rank, world_size=world_size)
    first = step * batch_size * world_size + rank * batch_size
    out, perms = [], {}
    for p in range(first, first + batch_size):
        epoch, offset = divmod(p, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][offset]))
    return out
