"""The batches one rank trains on: a pure function of (seed, micro-batch counter, rank, world size).

Map-style data sets: epoch ``e`` is ``randperm(N)`` drawn from ``Generator().manual_seed(seed + e)``; it is cut
into global micro-batches of ``batch_size / accumulation`` items (the last partial optimiser step of an epoch is
dropped), and rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices of each. So a global batch holds the
same items whatever the number of processes, and resuming at optimiser step ``s`` only needs ``s``: the stream
starts again at micro-batch ``s · accumulation`` without replaying anything.

Iterable data sets (WebDataset shards) expose ``stream(seed, rank, world)``: an endless, deterministic
per-rank iterator; resuming replays that rank's stream from its start and discards the items it already
consumed (cost: one decode per skipped item).

Why not accelerate's prepared DataLoader: its per-rank split depends on ``even_batches``/``split_batches``
settings and its resume (``skip_first_batches``) iterates the skipped batches; an explicit index plan makes the
1-process / N-process equivalence and the bit-exact resume easy to state and test.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate


def micro_batch_size(batch_size: int, world: int, accumulation: int) -> int:
    """Items per rank per micro-batch: ``batch_size`` (global, per optimiser step) split over ranks and
    accumulation steps, which must divide it."""
    if batch_size % (world * accumulation):
        raise ValueError(f"train.batch_size={batch_size} (global, per optimiser step) must be divisible by "
                         f"processes x grad_accum_steps = {world} x {accumulation}")
    return batch_size // (world * accumulation)


class _PlannedBatches(torch.utils.data.Sampler):
    """Index lists for one rank over one epoch, from micro-batch ``start`` on."""

    def __init__(self, n: int, seed: int, epoch: int, start: int, micros: int, global_micro: int, rank: int,
                 per_rank: int):
        self.n, self.seed, self.epoch, self.start, self.micros = n, seed, epoch, start, micros
        self.global_micro, self.rank, self.per_rank = global_micro, rank, per_rank

    def __len__(self) -> int:
        return self.micros - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for j in range(self.start, self.micros):
            lo = j * self.global_micro + self.rank * self.per_rank
            yield perm[lo:lo + self.per_rank]


def batch_stream(dataset: Dataset, *, batch_size: int, seed: int, start_step: int, rank: int = 0, world: int = 1,
                 accumulation: int = 1, num_workers: int = 0, collate_fn=None) -> Iterator:
    """Endless iterator over this rank's micro-batches, starting at optimiser step ``start_step``."""
    per_rank = micro_batch_size(batch_size, world, accumulation)
    collate_fn = collate_fn or default_collate
    counter = start_step * accumulation
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "stream"):
            raise TypeError(f"an iterable data set must offer stream(seed, rank, world) for sharded, resumable "
                            f"training; {type(dataset).__name__} does not")
        items = dataset.stream(seed=seed, rank=rank, world=world, skip=counter * per_rank)
        while True:
            yield collate_fn([next(items) for _ in range(per_rank)])
    n = len(dataset)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"dataset has {n} items, fewer than batch_size={batch_size}")
    micros = steps_per_epoch * accumulation
    epoch, start = divmod(counter, micros)
    while True:
        sampler = _PlannedBatches(n, seed, epoch, start, micros, batch_size // accumulation, rank, per_rank)
        # its own generator: creating a DataLoader iterator otherwise draws a worker seed from the global RNG,
        # which a resumed run would draw at a different moment
        yield from DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                              generator=torch.Generator().manual_seed(seed + epoch))
        epoch, start = epoch + 1, 0


__all__ = ["batch_stream", "micro_batch_size"]
