"""Memory the training loop does not need (issue 26 item 6: peak RSS at or below the course's).

* The classification loaders hold ``task.data``'s own images, not a normalised copy of every
  image beside them; the step standardises each batch on the device, bit-identically to
  indexing the wholly normalised set (and close to a float64 reference computed here), and
  one epoch trains the weights a plain loop on data normalised up front does.
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


def _whole_set_normalised(images: torch.Tensor, data: ImageClassificationData) -> torch.Tensor:
    """What the loaders held before: every image standardised once, up front."""
    mean = torch.tensor(data.mean, dtype=torch.float32).view(-1, 1, 1)
    return (images - mean) / torch.tensor(data.std, dtype=torch.float32).view(-1, 1, 1)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_loaders_hold_the_data_s_own_images(normalize):
    task = _task(normalize=normalize, channels=3)
    data = task.data
    assert task.normalizes is normalize
    for loader, images, labels in ((task.train_data(), data.train_images, data.train_labels),
                                   (task.val_data(), data.val_images, data.val_labels)):
        assert loader.tensors[0] is images and loader.batch_transform is None  # no copy
        loader.set_epoch(2)
        indices = list(loader.batch_indices())
        loader.set_epoch(2)
        batches = list(loader)
        assert len(batches) == len(indices) >= 1  # validation: one batch of max(bs, 256)
        for idx, (x, y) in zip(indices, batches):
            assert torch.equal(x, images[idx]) and torch.equal(y, labels[idx])
    if not normalize:
        assert task.normalize(data.val_images) is data.val_images


@pytest.mark.parametrize("channels", [1, 3])
def test_the_step_standardises_each_batch_as_the_whole_set_was(channels):
    task = _task(normalize=True, channels=channels)
    data = task.data
    whole = _whole_set_normalised(data.train_images, data)
    mean = np.array(data.mean).reshape(-1, 1, 1)
    std = np.array(data.std).reshape(-1, 1, 1)
    loader = task.train_data()
    loader.set_epoch(1)
    for idx, batch in zip(list(loader.batch_indices()), list(loader)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = batch[0].contiguous(memory_format=layout)
            (got,), y = task.pipeline_split((x, batch[1]))
            assert torch.equal(got, whole[idx])  # bit-identical to the whole set's
            assert got.is_contiguous(memory_format=layout)
            reference = (data.train_images[idx].double().numpy() - mean) / std  # by hand
            np.testing.assert_allclose(got.numpy(), reference, rtol=1e-6, atol=1e-6)
            assert torch.equal(y, data.train_labels[idx])
    # validation: the logits of the batch standardised as before
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * 64, 3)).eval()
    with torch.inference_mode():
        out = task.validation_step(model, (data.val_images, data.val_labels))
        expected = model(_whole_set_normalised(data.val_images, data))
    assert torch.equal(torch.cat(out["predictions"]), expected.argmax(1))
    loss = torch.nn.functional.cross_entropy(expected, data.val_labels, reduction="sum")
    assert torch.equal(out["loss"], loss)


def test_training_matches_a_plain_loop_on_data_standardised_up_front():
    """One epoch of the Trainer (normalize on) against a plain torch loop fed the whole set
    standardised once: the same weights at the end."""
    task = _task(normalize=True, channels=1, size=28, n_train=64, n_val=16, epochs=1,
                 lr=0.05, momentum=0.0, channels_last=False)
    trainer = Trainer(task, task.config)
    model = task.build_model()
    model.load_state_dict(trainer.model.state_dict())  # the same initial weights
    data = task.data
    x = _whole_set_normalised(data.train_images, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    order = trainer.train_loader
    order.set_epoch(1)
    batches = list(order.batch_indices())
    trainer.fit()
    model.train()
    for idx in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), data.train_labels[idx]).backward()
        opt.step()
    for (name, ours), theirs in zip(trainer.model.state_dict().items(),
                                    model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


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
