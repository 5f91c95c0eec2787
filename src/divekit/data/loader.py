"""Minibatches from tensors held in memory.

Small datasets are decoded and resized once; a minibatch is then one fancy-index per tensor
instead of ``batch_size`` per-sample ``__getitem__`` calls and a collate, which is where the
course's DataLoader-over-PIL pipeline spends its time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from divekit.errors import DivekitError


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): resuming needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class _SampleDataset(Dataset):
    def __init__(self, tensors: tuple[Tensor, ...], transform: Callable):
        self.tensors, self.transform = tensors, transform

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int):
        return self.transform(*(t[i] for t in self.tensors))


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s share of ``count`` samples, as ``torch.tensor_split``.

    The first ``count % world_size`` ranks take one sample more; shares never overlap, cover
    every sample, and a share is empty only when ``count < world_size``.
    """
    q, r = divmod(count, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


class TensorBatchLoader:
    """Iterate ``(t1[idx], t2[idx], ...)`` minibatches of equally long tensors.

    ``shuffle`` draws a new permutation each epoch from ``(seed, epoch)``; call
    :meth:`set_epoch` before iterating (the Trainer does). ``batch_transform`` is applied to
    whole batches in the main process. ``sample_transform`` (per-sample random augmentation)
    switches to a ``DataLoader`` with ``workers`` processes, over the same sample order.

    Data parallelism: after :meth:`shard` ``(rank, world_size)`` the loader walks the same
    permutation in *global* batches of ``batch_size × world_size`` samples and yields this
    rank's share of each (:func:`shard_bounds`), so the global batches hold exactly the samples
    of a 1-process run with the global batch size — the last, partial one included (split
    exactly, never padded). :meth:`global_batch_size` gives each global batch's count, which the
    Trainer uses to weight the workers' losses.
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        batch_transform: Callable | None = None,
        sample_transform: Callable | None = None,
        workers: int = 0,
        weights: Tensor | None = None,
    ):
        if not tensors:
            raise DivekitError("TensorBatchLoader needs at least one tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise DivekitError(f"tensors differ in length: {[len(t) for t in tensors]}")
        if batch_size <= 0:
            raise DivekitError(f"batch size must be positive, got {batch_size}")
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.batch_transform, self.sample_transform = batch_transform, sample_transform
        self.workers = workers
        self.num_samples = n
        if weights is not None and (weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0):
            raise DivekitError(f"weights must be {n} non-negative numbers, not all zero")
        self.weights = weights
        self.rank, self.world_size = 0, 1
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> TensorBatchLoader:
        """Make this loader yield rank ``rank``'s share of every global batch."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise DivekitError(f"rank {rank} is not in a world of size {world_size}")
        if world_size > self.num_samples:
            raise DivekitError(
                f"world size {world_size} is larger than the dataset ({self.num_samples} samples): "
                "every worker needs at least one sample; use fewer processes or more data"
            )
        self.rank, self.world_size = rank, world_size
        return self

    def skip_batches(self, count: int) -> None:
        """The next iteration starts at global batch ``count`` (mid-epoch resume)."""
        if not 0 <= count <= len(self):
            raise DivekitError(f"cannot skip {count} batches of an epoch of {len(self)}")
        self._skip = count

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def order(self) -> Tensor:
        if self.weights is not None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return torch.multinomial(self.weights.double(), self.num_samples, replacement=True, generator=g)
        if self.shuffle:
            return epoch_permutation(self.num_samples, self.seed, self.epoch)
        return torch.arange(self.num_samples)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def global_batch_size(self, index: int) -> int:
        """Samples in global batch ``index`` summed over all ranks."""
        return min(self.global_batch, self.num_samples - index * self.global_batch)

    def batch_indices(self) -> Iterator[Tensor]:
        """This rank's sample indices of each remaining global batch of the epoch."""
        order, g = self.order(), self.global_batch
        skip, self._skip = self._skip, 0
        for b in range(skip, len(self)):
            idx = order[b * g : (b + 1) * g]  # the global batch, as 1 process would see it
            start, stop = shard_bounds(len(idx), self.rank, self.world_size)
            yield idx[start:stop]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self.sample_transform is not None:
            yield from self._iter_samples()
            return
        for idx in self.batch_indices():
            batch = tuple(t[idx] for t in self.tensors)
            yield self.batch_transform(batch) if self.batch_transform else batch

    def _iter_samples(self) -> Iterator[tuple[Tensor, ...]]:
        loader = DataLoader(
            _SampleDataset(self.tensors, self.sample_transform),  # type: ignore[arg-type]
            batch_sampler=[idx.tolist() for idx in self.batch_indices()],
            num_workers=self.workers,
            persistent_workers=False,
        )
        for batch in loader:
            batch = tuple(batch)
            yield self.batch_transform(batch) if self.batch_transform else batch
