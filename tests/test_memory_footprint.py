"""Memory the training loop does not need (issue 26 item 6: peak RSS at or below the course's).

* The classification loaders standardise batch by batch instead of keeping a normalised copy of
  every image beside ``task.data``'s own; the batches are bit-identical to indexing a wholly
  normalised set, and close to a float64 reference computed here.
* ``release_free_memory`` gives the heap's free pages back, and the Trainer calls it before
  each validation pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from divekit.data.vision import ImageClassificationData
from divekit.engine import Trainer
from divekit.engine import trainer as trainer_module
from divekit.engine.device import configure_allocator, release_free_memory
from divekit.tasks.classify import ClassificationTask, ClassifyConfig


def _task(normalize: bool, channels: int, size: int = 8, n_train: int = 50, n_val: int = 21,
          **cfg) -> ClassificationTask:
    g = torch.Generator().manual_seed(channels * 7 + normalize)
    tx = torch.rand(n_train, channels, size, size, generator=g)
    vx = torch.rand(n_val, channels, size, size, generator=g)
    ty, vy = torch.randint(0, 3, (n_train,), generator=g), torch.randint(0, 3, (n_val,), generator=g)
    mean = tuple(tx.mean(dim=(0, 2, 3), dtype=torch.float64).tolist())
    std = tuple(tx.double().std(dim=(0, 2, 3)).tolist())
    data = ImageClassificationData(tx, ty, vx, vy, classes=["a", "b", "c"], name="toy",
                                   mean=mean, std=std)
    config = ClassifyConfig(model="lenet", data="digits", batch_size=16, normalize=normalize,
                            quiet=True, device="cpu", **cfg)
    task = ClassificationTask(config)
    task.data = data  # in memory, instead of loading config.data (a lazy cached property)
    return task


@pytest.mark.parametrize("channels", [1, 3])
def test_normalised_batches_equal_the_whole_set_normalised_and_hold_no_copy(channels):
    task = _task(normalize=True, channels=channels)
    data = task.data
    mean = np.array(data.mean).reshape(-1, 1, 1)
    std = np.array(data.std).reshape(-1, 1, 1)
    for loader, images, labels in ((task.train_data(), data.train_images, data.train_labels),
                                   (task.val_data(), data.val_images, data.val_labels)):
        assert loader.tensors[0] is images  # the data's own tensor, not a normalised copy
        # what the loaders held before: the whole set normalised once, then indexed
        whole = (images - torch.tensor(data.mean, dtype=torch.float32).view(-1, 1, 1)) \
            / torch.tensor(data.std, dtype=torch.float32).view(-1, 1, 1)
        loader.set_epoch(1)
        indices = list(loader.batch_indices())
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(indices) >= 1  # validation: one batch of max(bs, 256)
        for idx, (x, y) in zip(indices, batches):
            assert torch.equal(x, whole[idx])  # bit-identical, batch by batch
            reference = (images[idx].double().numpy() - mean) / std  # float64, by hand
            np.testing.assert_allclose(x.numpy(), reference, rtol=1e-6, atol=1e-6)
            assert torch.equal(y, labels[idx])


def test_without_normalising_the_loaders_yield_the_images_themselves():
    task = _task(normalize=False, channels=3)
    data = task.data
    assert not task.normalizes and task.normalize(data.val_images) is data.val_images
    loader = task.train_data()
    assert loader.tensors[0] is data.train_images and loader.batch_transform is None
    loader.set_epoch(3)
    indices = list(loader.batch_indices())
    loader.set_epoch(3)
    for idx, (x, _) in zip(indices, loader):
        assert torch.equal(x, data.train_images[idx])


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_gives_the_kept_heap_back():
    import platform

    if platform.libc_ver()[0] != "glibc" or not configure_allocator():
        pytest.skip("needs glibc")
    # 24 tensors of 8 MB, below the 32 MB mmap threshold: they come from the heap, which
    # configure_allocator's 512 MB trim threshold keeps mapped after they are freed
    blocks = [torch.ones(2 << 20) for _ in range(24)]
    held = _rss_mb()
    del blocks
    kept = _rss_mb()
    assert release_free_memory() is True
    after = _rss_mb()
    assert kept - after > 100, (held, kept, after)  # most of the 192 MB went back
    x = torch.randn(1 << 20)  # allocations still work afterwards
    assert torch.equal(x.clone(), x)


def test_trainer_releases_free_memory_before_every_validation(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(trainer_module, "release_free_memory",
                        lambda: events.append("release") or True)
    validate = trainer_module.run_validation

    def recording(*args, **kwargs):
        events.append("validate")
        return validate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "run_validation", recording)
    task = _task(normalize=True, channels=1, size=28, n_train=32, n_val=8, epochs=2)
    history = Trainer(task, task.config).fit()
    assert len(history) == 2 and all(np.isfinite(row["val_loss"]) for row in history)
    assert events == ["release", "validate"] * 2


def _peak_live_bytes(fn) -> int:
    """The most bytes of tensors alive at once while ``fn`` runs (allocated inside it), from
    torch.profiler's memory events: independent of the allocator's caching."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events or not hasattr(events[0], "nbytes"):
        pytest.skip("this torch's profiler gives no allocation sizes")
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_resize_images_fills_one_result_chunk_by_chunk(monkeypatch):
    import torch.nn.functional as F

    from divekit.data import vision

    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=g)
    monkeypatch.setattr(vision, "_RESIZE_BUDGET", 7 * 40 * 40)  # chunks of 7 images
    out = vision.resize_images(pixels, 40)
    # reference: each image on its own, from float pixels / 255
    for i in range(0, len(pixels), 37):
        one = F.interpolate(pixels[i : i + 1].double().div(255).float(), size=(40, 40),
                            mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        assert torch.equal(out[i : i + 1], one), i
    assert out.dtype == torch.float32 and out.shape == (300, 1, 40, 40)
    result = out.numel() * 4
    peak = _peak_live_bytes(lambda: vision.resize_images(pixels, 40))
    # the result and a chunk or two: neither a float copy of the input nor the chunks and
    # their concatenation side by side (2 x the result)
    assert peak < 1.2 * result, (peak, result)
