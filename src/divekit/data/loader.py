"""Minibatches from tensors held in memory.

Small datasets are decoded and resized once; a minibatch is then one fancy-index per tensor
instead of ``batch_size`` per-sample ``__getitem__`` calls and a collate, which is where the
course's DataLoader-over-PIL pipeline spends its time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from divekit.errors import DivekitError


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): resuming needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class _EpochSampler(Sampler[int]):
    def __init__(self, loader: TensorBatchLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[int]:
        return iter(self.loader.order().tolist())

    def __len__(self) -> int:
        return self.loader.num_samples


class _SampleDataset(Dataset):
    def __init__(self, tensors: tuple[Tensor, ...], transform: Callable):
        self.tensors, self.transform = tensors, transform

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int):
        return self.transform(*(t[i] for t in self.tensors))


class TensorBatchLoader:
    """Iterate ``(t1[idx], t2[idx], ...)`` minibatches of equally long tensors.

    ``shuffle`` draws a new permutation each epoch from ``(seed, epoch)``; call
    :meth:`set_epoch` before iterating (the Trainer does). ``batch_transform`` is applied to
    whole batches in the main process. ``sample_transform`` (per-sample random augmentation)
    switches to a ``DataLoader`` with ``workers`` processes, over the same sample order.
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        if self.shuffle:
            return epoch_permutation(self.num_samples, self.seed, self.epoch)
        return torch.arange(self.num_samples)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self.sample_transform is not None:
            yield from self._iter_samples()
            return
        order = self.order()
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = tuple(t[idx] for t in self.tensors)
            yield self.batch_transform(batch) if self.batch_transform else batch

    def _iter_samples(self) -> Iterator[tuple[Tensor, ...]]:
        loader = DataLoader(
            _SampleDataset(self.tensors, self.sample_transform),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=_EpochSampler(self),
            drop_last=self.drop_last,
            num_workers=self.workers,
            persistent_workers=False,
        )
        for batch in loader:
            batch = tuple(batch)
            yield self.batch_transform(batch) if self.batch_transform else batch
