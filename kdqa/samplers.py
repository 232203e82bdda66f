"""The training batch sampler: shuffling, length grouping, data-parallel sharding and mid-epoch resume.

One sampler does all four because they interact: the epoch's order must depend only on
(seed, epoch) so that N ranks with batch b see exactly the samples of one process with batch N*b,
step for step, and so that a resumed run replays the same order from the batch it stopped at.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

MEGABATCH_GLOBAL_BATCHES = 50
"""Global batches per length-sorted chunk (as transformers' LengthGroupedSampler): large enough for
near-uniform lengths inside a batch, small enough that batches still mix the whole data set."""


class TrainBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's batches (lists of feature indices) for one epoch; pass as `batch_sampler`.

    Each epoch's order is drawn from a torch.Generator seeded with seed + epoch (never the global
    RNG) and cut into global batches of batch_size * num_replicas; rank r takes the slice
    [r * batch_size, (r + 1) * batch_size) of every global batch. With several replicas an
    incomplete last global batch is filled by wrapping around to the start of the order (as
    DistributedSampler does), so every rank gets as many batches of equal size; drop_last drops it.
    With one replica and no drop_last the last batch may be smaller and every feature is seen
    exactly once per epoch.

    group_by_length (needs lengths): a random permutation cut into chunks of 50 global batches,
    each chunk sorted by length (longest first) and cut into global batches, then the batch order
    shuffled, with the batch holding the longest feature moved first so that an out-of-memory
    error shows in the first step rather than hours later. A short last batch stays last.
    With shuffle=False it sorts the whole set by length instead (deterministic, for evaluation).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        lengths: Sequence[int] | torch.Tensor | None = None,
        shuffle: bool = True,
        group_by_length: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas (the world size) must be a positive int, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}, got {rank!r}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
            if lengths.numel() != num_samples:
                raise ValueError(
                    f"lengths has {lengths.numel()} entries but num_samples is {num_samples}: "
                    "one length per feature is needed"
                )
        if group_by_length and lengths is None:
            raise ValueError("group_by_length=True needs lengths (the number of tokens of each feature)")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.lengths = lengths
        self.shuffle = bool(shuffle)
        self.group_by_length = bool(group_by_length)
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; start_batch skips that many batches (exact mid-epoch resume).

        start_batch counts this rank's batches, which are also global steps: every rank skips the
        same number. It applies to every later iteration until the next set_epoch call.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}] (batches per epoch), got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        """This rank's batches in a whole epoch, ignoring start_batch."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def global_batches(self) -> list[list[int]]:
        """All global batches of the current epoch (before the start_batch skip), for every rank."""
        n, gbs = self.num_samples, self.global_batch_size
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(n, generator=generator)
        elif self.group_by_length:
            order = torch.argsort(self.lengths, descending=True, stable=True)
        else:
            order = torch.arange(n)
        if self.group_by_length and self.shuffle:
            batches = self._grouped_batches(order, generator)
        else:
            batches = list(order.split(gbs))
        if batches and len(batches[-1]) < gbs:
            if self.drop_last:
                batches.pop()
            elif self.num_replicas > 1:
                # Padding after batching keeps every full batch identical to a single process's.
                padding = gbs - len(batches[-1])
                batches[-1] = torch.cat([batches[-1], order.repeat(math.ceil(padding / n))[:padding]])
        return [b.tolist() for b in batches]

    def _grouped_batches(self, order: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        gbs = self.global_batch_size
        batches: list[torch.Tensor] = []
        for mega in order.split(MEGABATCH_GLOBAL_BATCHES * gbs):
            mega = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            batches.extend(mega.split(gbs))
        tail = [batches.pop()] if batches and len(batches[-1]) < gbs else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches + tail

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for global_batch in self.global_batches()[self.start_batch :]:
            yield global_batch[lo:hi]
