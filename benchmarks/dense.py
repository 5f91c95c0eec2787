"""Dense vision throughput: FCN training and style transfer, divekit against the course's code.

* FCN training images/s. Data: a VOC 2012 tree (``--voc DIR``; else a generated one in the
  real format — JPEG images of 375x500 and palette label PNGs — in a temporary folder).
  - course: the notebook's pipeline (d2l 14.9/14.11): images and RGB label images read into
    memory, each image normalised on its own, ``VOCSegDataset.__getitem__`` cropping one sample
    and mapping its label's colours to classes (``voc_label_indices`` with the 256³ table),
    a ``DataLoader`` collating; the FCN built from torchvision's ResNet-18 children[:-2] +
    1x1 conv + bilinear transposed conv, ``cross_entropy(reduction='none').mean(1).mean(1)``.
  - divekit: ``SegmentationTask`` (the labels mapped to classes once at load; a batch is
    index → crop → stack of uint8; normalisation and the loss on the batch) with
    ``--backbone torchvision:resnet18`` (the same network), channels_last as the Trainer.
  Same crop, batch size, optimizer (SGD 1e-3, weight decay 1e-3) and number of steps.
* stylize seconds/step at 300x450 (``--size``): ``divekit.tasks.stylize.stylize`` against the
  course's loop (torchvision ``vgg19().features`` truncated at layer 28, ``extract_features``,
  ``compute_loss``, Adam on the image, StepLR), both with the same random VGG-19 weights.

Rounds alternate course and divekit so that a busy machine slows both alike; the ratio is the
median of the per-round ratios with their min-max (the FCN's goal, >= 1.5x, is judged on the
whole spread).

    python benchmarks/dense.py                        # crop 160x224, batch 8, 6 steps; 300x450
    python benchmarks/dense.py --crop 320x480 --batch 32 --steps 3 --rounds 2
    python benchmarks/dense.py --smoke      # 4 images, crop 64x64, 1 step, 1 round (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from _common import (
    MEMORY_HEADERS,
    SUMMARY_NOTE,
    Report,
    add_markdown_arg,
    add_memory_args,
    endless,
    forwarded_argv,
    goal_cell,
    memory_cells,
    memory_note,
    memory_runs,
    memory_verdict,
    paired_ratio,
    print_peak_rss,
    profile_table,
    sides_peak_rss,
    verdict,
)
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from divekit.data.segmentation import VOC_BORDER, VOC_COLORMAP  # noqa: E402
from divekit.engine.device import to_device  # noqa: E402
from divekit.ops.conv import bilinear_kernel  # noqa: E402


# ----------------------------------------------------------------------------- data
def write_voc(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` train images of 375x500 (some 500x375) with palette labels, in VOC's layout."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:21], pal[255] = VOC_COLORMAP, VOC_BORDER
    names = []
    for i in range(n):
        h, w = (375, 500) if i % 3 else (500, 375)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.zeros((h, w), dtype=np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, h - 100)), int(rng.integers(0, w - 100))
            label[y : y + 90, x : x + 90] = 255
            label[y + 2 : y + 88, x + 2 : x + 88] = int(rng.integers(1, 21))
        name = f"bench_{i:04d}"
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        png = Image.fromarray(label, mode="P")
        png.putpalette(pal.flatten().tolist())
        png.save(voc / "SegmentationClass" / f"{name}.png")
        names.append(name)
    for split in ("train", "val"):
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names[:n if split == "train" else 2]) + "\n")
    return voc


# ----------------------------------------------------------------------------- the course's FCN
class CourseVOCSegDataset(torch.utils.data.Dataset):
    """d2l's VOCSegDataset: per-sample crop and colour lookup in __getitem__."""

    def __init__(self, voc_dir: Path, crop_size: tuple[int, int]):
        from torchvision.io import ImageReadMode, read_image

        self.transform = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                                          std=[0.229, 0.224, 0.225])
        self.crop_size = crop_size
        names = (voc_dir / "ImageSets/Segmentation/train.txt").read_text().split()
        features = [read_image(str(voc_dir / "JPEGImages" / f"{n}.jpg")) for n in names]
        labels = [read_image(str(voc_dir / "SegmentationClass" / f"{n}.png"), ImageReadMode.RGB)
                  for n in names]
        self.features = [self.transform(f.float() / 255) for f in self.filter(features)]
        self.labels = self.filter(labels)
        self.colormap2label = torch.zeros(256**3, dtype=torch.long)
        for i, colormap in enumerate(VOC_COLORMAP):
            self.colormap2label[(colormap[0] * 256 + colormap[1]) * 256 + colormap[2]] = i

    def filter(self, imgs):
        return [img for img in imgs if img.shape[1] >= self.crop_size[0] and img.shape[2] >= self.crop_size[1]]

    def voc_label_indices(self, colormap):
        colormap = colormap.permute(1, 2, 0).numpy().astype("int32")
        idx = (colormap[:, :, 0] * 256 + colormap[:, :, 1]) * 256 + colormap[:, :, 2]
        return self.colormap2label[idx]

    def __getitem__(self, idx):
        rect = torchvision.transforms.RandomCrop.get_params(self.features[idx], self.crop_size)
        feature = torchvision.transforms.functional.crop(self.features[idx], *rect)
        label = torchvision.transforms.functional.crop(self.labels[idx], *rect)
        return feature, self.voc_label_indices(label)

    def __len__(self):
        return len(self.features)


def course_fcn(num_classes: int = 21) -> nn.Module:
    pretrained_net = torchvision.models.resnet18(weights=None)
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    net.add_module("final_conv", nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module("transpose_conv", nn.ConvTranspose2d(num_classes, num_classes, kernel_size=64,
                                                        padding=16, stride=32))
    net.transpose_conv.weight.data.copy_(bilinear_kernel(num_classes, num_classes, 64))
    return net


def course_fcn_parts(voc: Path, crop, batch: int):
    """The course's FCN training set-up: ``(loader, net, trainer)``."""
    dataset = CourseVOCSegDataset(voc, crop)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, num_workers=0)
    net = course_fcn()
    trainer = torch.optim.SGD(net.parameters(), lr=1e-3, weight_decay=1e-3)
    return loader, net, trainer


def course_fcn_step(net: nn.Module, trainer: torch.optim.Optimizer, X, Y) -> None:
    """One step of the course's FCN training loop (d2l's ``train_batch_ch13`` on one device)."""
    trainer.zero_grad()
    loss = F.cross_entropy(net(X), Y, reduction="none").mean(1).mean(1)
    loss.sum().backward()
    trainer.step()


def time_course_fcn(voc: Path, crop, batch: int, steps: int) -> float:
    loader, net, trainer = course_fcn_parts(voc, crop, batch)
    done, t0 = 0, 0.0
    while done <= steps:
        for X, Y in loader:
            if done == 1:
                t0 = time.perf_counter()  # the first step warms up
            if done > steps:
                break
            course_fcn_step(net, trainer, X, Y)
            done += 1
    return steps * batch / (time.perf_counter() - t0)


def time_divekit_fcn(voc: Path, crop, batch: int, steps: int) -> float:
    return divekit_fcn_run(voc, crop, batch, steps)[0]


def divekit_fcn_run(voc: Path, crop, batch: int, steps: int,
                    compile: bool = False) -> tuple[float, float]:
    """divekit's FCN steps: images/s over ``steps`` timed steps after a first, untimed one, and
    the seconds of that first step (with ``compile``: where torch.compile compiles, see
    :mod:`divekit.engine.compile`; the model is compiled in place as the Trainer does)."""
    task, model, optimizer, loader = divekit_fcn_parts(voc, crop, batch, compile)
    done, t0, epoch, start = 0, 0.0, 0, time.perf_counter()
    first = 0.0
    while done <= steps:
        epoch += 1
        loader.set_epoch(epoch)
        for batch_ in loader:
            if done == 1:
                t0 = time.perf_counter()
                first = t0 - start
            if done > steps:
                break
            divekit_fcn_step(task, model, optimizer, batch_)
            done += 1
    return steps * batch / (time.perf_counter() - t0), first


def divekit_fcn_parts(voc: Path, crop, batch: int, compile: bool = False):
    """divekit's FCN training set-up: ``(task, model, optimizer, loader)``, the model in
    channels_last as the Trainer puts it (and compiled in place with ``compile``)."""
    from divekit.tasks.segment import SegmentationTask, SegmentConfig

    cfg = SegmentConfig(model="fcn_resnet18", data="voc", data_dir=str(voc), batch_size=batch,
                        crop=f"{crop[0]}x{crop[1]}", augment="none", backbone="torchvision:resnet18")
    task = SegmentationTask(cfg)
    model = task.build_model().to(memory_format=torch.channels_last)
    if compile:
        from divekit.engine.compile import compile_model

        compile_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=1e-3)
    return task, model, optimizer, task.train_data()


def divekit_fcn_step(task, model: nn.Module, optimizer: torch.optim.Optimizer, batch_) -> None:
    """One divekit FCN step as the Trainer takes it: the batch to the device in channels_last,
    the task's loss, zero_grad, backward, the optimizer's step."""
    loss, _ = task.training_step(model, to_device(batch_, torch.device("cpu"), True))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


# ----------------------------------------------------------------------------- profile
PROFILE_STEPS = 3  # FCN steps of each side under torch.profiler, where the goal is not met


def fcn_profile(voc: Path, crop, batch: int, steps: int) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of :func:`_common.profile_table`: the top operators by self CPU time
    over ``steps`` FCN training steps of the course's loop and of divekit's (the timed rounds'
    set-up and step, batches included), after one warm-up step of each."""
    torch.manual_seed(0)
    loader, net, trainer = course_fcn_parts(voc, crop, batch)
    torch.manual_seed(0)
    task, model, optimizer, our_loader = divekit_fcn_parts(voc, crop, batch)
    theirs, ours = endless(loader, 1), endless(our_loader, 1)  # as divekit_fcn_run counts

    def course(k: int) -> None:
        for _ in range(k):
            course_fcn_step(net, trainer, *next(theirs))

    def divekit(k: int) -> None:
        for _ in range(k):
            divekit_fcn_step(task, model, optimizer, next(ours))

    for run in (course, divekit):
        run(1)  # warm-up: first-touch allocations and lazy set-up stay out of the profile
    return profile_table({"course": partial(course, steps), "divekit": partial(divekit, steps)})


# ----------------------------------------------------------------------------- the course's loop
def time_course_stylize(size, steps: int, state) -> float:
    from divekit.tasks.stylize import load_input, preprocess

    pretrained_net = torchvision.models.vgg19(weights=None)
    pretrained_net.features.load_state_dict(state)
    style_layers, content_layers = [0, 5, 10, 19, 28], [25]
    net = nn.Sequential(*[pretrained_net.features[i] for i in range(max(content_layers + style_layers) + 1)])

    def extract_features(X, content_layers, style_layers):
        contents, styles = [], []
        for i in range(len(net)):
            X = net[i](X)
            if i in style_layers:
                styles.append(X)
            if i in content_layers:
                contents.append(X)
        return contents, styles

    def gram(X):
        num_channels, n = X.shape[1], X.numel() // X.shape[1]
        X = X.reshape((num_channels, n))
        return torch.matmul(X, X.T) / (num_channels * n)

    def tv_loss(Y_hat):
        return 0.5 * (torch.abs(Y_hat[:, :, 1:, :] - Y_hat[:, :, :-1, :]).mean()
                      + torch.abs(Y_hat[:, :, :, 1:] - Y_hat[:, :, :, :-1]).mean())

    dev = torch.device("cpu")
    content_X = preprocess(load_input("astronaut"), size, dev)
    style_X = preprocess(load_input("chelsea"), size, dev)
    contents_Y, _ = extract_features(content_X, content_layers, style_layers)
    _, styles_Y = extract_features(style_X, content_layers, style_layers)
    styles_Y_gram = [gram(Y) for Y in styles_Y]
    X = nn.Parameter(content_X.clone())
    trainer = torch.optim.Adam([X], lr=0.3)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer, 50, 0.8)
    t0 = 0.0
    for epoch in range(steps + 1):
        if epoch == 1:
            t0 = time.perf_counter()
        trainer.zero_grad()
        contents_Y_hat, styles_Y_hat = extract_features(X, content_layers, style_layers)
        contents_l = [torch.square(a - b.detach()).mean() * 1 for a, b in zip(contents_Y_hat, contents_Y)]
        styles_l = [torch.square(gram(a) - b.detach()).mean() * 1e3 for a, b in zip(styles_Y_hat, styles_Y_gram)]
        tv_l = tv_loss(X) * 10
        loss = sum(styles_l + contents_l + [tv_l])
        loss.backward()
        trainer.step()
        scheduler.step()
        float(loss.detach())  # the course's animator reads the losses every few epochs
    return (time.perf_counter() - t0) / steps


def time_divekit_stylize(size, steps: int, state) -> float:
    from divekit.models.style import StyleFeatures, vgg19_features
    from divekit.tasks.stylize import stylize

    features = vgg19_features()
    features.load_state_dict(state)
    net = StyleFeatures(features)
    stylize("astronaut", "chelsea", size=size, steps=1, net=net, device="cpu")  # warm-up
    return stylize("astronaut", "chelsea", size=size, steps=steps, net=net, device="cpu").seconds_per_step


FCN_GOAL = 1.5  # issue 26: FCN training >= 1.5x the course
COMPILE_GOAL = 1.2  # --compile becomes a family's default where it wins this much (issue 26)


def fcn_compile_row(voc: Path, crop, args: argparse.Namespace, data_note: str) -> list[str]:
    """divekit's FCN eager and compiled (``--compile``), interleaved: images/s after the first
    step, and the compile time apart (the compiled first step beyond the eager first step).
    The in-process compile caches are cleared before every run; Inductor's disk cache is a
    fresh folder, so round 1 pays a first run's compile and the later rounds a warm cache's."""
    import os
    import shutil

    import torch._dynamo

    cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dk-ind-"))
    rates: dict[bool, list[float]] = {False: [], True: []}
    firsts: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for compiled in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            rate_, first = divekit_fcn_run(voc, crop, args.batch, args.steps, compile=compiled)
            rates[compiled].append(rate_)
            firsts[compiled].append(first)
    shutil.rmtree(cache, ignore_errors=True)
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    compile_s = [c - e for c, e in zip(firsts[True], firsts[False])]
    r = paired_ratio(rates[True], rates[False])  # images/s: compiled over eager, per round
    later = statistics.median(compile_s[1:]) if len(compile_s) > 1 else None
    decision = "on" if r.median >= COMPILE_GOAL else "off"
    print(f"FCN --compile, crop {args.crop}, batch {args.batch}: eager "
          f"{statistics.median(rates[False]):.2f} images/s, compiled "
          f"{statistics.median(rates[True]):.2f} images/s, {r} after compilation; compile "
          f"{compile_s[0]:.1f} s first run" + (f", {later:.1f} s later runs" if later else "")
          + f"; default {decision} (goal >= {COMPILE_GOAL}x: {verdict(r, COMPILE_GOAL)})")
    return [f"FCN training, crop {crop[0]}×{crop[1]}, batch {args.batch}, {data_note}",
            f"{statistics.median(rates[False]):.2f} images/s",
            f"{statistics.median(rates[True]):.2f} images/s", r.md(), f"{compile_s[0]:.1f}",
            f"{later:.1f}" if later is not None else "—", verdict(r, COMPILE_GOAL), decision]


MEMORY_SIDES = ("fcn/course", "fcn/divekit", "stylize/course", "stylize/divekit")


def run_memory_side(name: str, args: argparse.Namespace, crop, size) -> None:
    """``--memory-of CASE/SIDE``: that side alone, once (the same steps as a timed round), under
    :func:`print_peak_rss`, in the fresh process :func:`side_peak_rss` started."""
    case, side = name.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        if case == "fcn":
            voc = args.voc or write_voc(Path(tmp), args.images)
            fn = time_course_fcn if side == "course" else time_divekit_fcn
            torch.manual_seed(0)
            print_peak_rss(lambda: fn(voc, crop, args.batch, args.steps))
            return
        torch.manual_seed(0)
        state = torchvision.models.vgg19(weights=None).features.state_dict()
        fn = time_course_stylize if side == "course" else time_divekit_stylize
        print_peak_rss(lambda: fn(size, args.style_steps, state))


def memory_rows(args: argparse.Namespace) -> list[list[str]]:
    """Peak RSS of both sides of each benchmark, each in a fresh process of its own."""
    argv = forwarded_argv()  # the same sizes in the child
    cases = [c for c in ("fcn", "stylize") if args.skip != c]
    if args.smoke:
        cases = cases[:1]  # smoke: one case checks the path
    rows = []
    for case in cases:
        both = sides_peak_rss(__file__, [f"{case}/course", f"{case}/divekit"], argv,
                              runs=memory_runs(args))
        mem = {s: both[f"{case}/{s}"] for s in ("course", "divekit")}
        goal = memory_verdict(mem["divekit"], mem["course"])
        print(f"peak RSS {case}: divekit {mem['divekit'][0]:,.0f} MB, course "
              f"{mem['course'][0]:,.0f} MB (goal divekit <= course: {goal})")
        what = "FCN training" if case == "fcn" else "stylize"
        rows.append([what, "course", *memory_cells(mem["course"]), "—"])
        rows.append([what, "divekit", *memory_cells(mem["divekit"]), goal])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, help="a VOC2012 folder (default: a generated one)")
    p.add_argument("--images", type=int, default=24, help="generated training images")
    p.add_argument("--crop", default="160x224", help="training crop (multiples of 32, as the course's FCN needs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed FCN steps per round")
    p.add_argument("--size", default="300x450", help="stylize image size")
    p.add_argument("--style-steps", type=int, default=5, help="timed stylize steps per round")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds alternating the course and divekit; medians and the ratio's "
                        "min-max over the rounds")
    p.add_argument("--skip", choices=["fcn", "stylize"], help="leave one benchmark out")
    p.add_argument("--smoke", action="store_true",
                   help="4 generated images, crop 64x64, batch 2, stylize 64x96, 1 timed step, "
                        "1 round, 1 thread: checks that it runs (seconds)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="the FCN's --compile row (divekit eager vs torch.compile, compile time "
                        "apart); skipped by --smoke (compiling takes minutes)")
    add_markdown_arg(p)
    add_memory_args(p)
    args = p.parse_args()
    if args.smoke:
        args.images, args.crop, args.batch, args.steps = 4, "64x64", 2, 1
        args.size, args.style_steps, args.rounds = "64x96", 1, 1
        torch.set_num_threads(1)
    crop = tuple(int(v) for v in args.crop.split("x"))
    size = tuple(int(v) for v in args.size.split("x"))
    if args.memory_of:
        run_memory_side(args.memory_of, args, crop, size)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[list[str]] = []
    compiled_rows: list[list[str]] = []
    profiles: list[tuple[str, tuple[list[str], list[list[str]]]]] = []  # for a goal not met
    if args.skip != "fcn":
        with tempfile.TemporaryDirectory() as tmp:
            voc = args.voc or write_voc(Path(tmp), args.images)
            data_note = ("a VOC2012 folder" if args.voc
                         else f"{args.images} generated VOC-format images")
            course, ours = [], []
            for _ in range(args.rounds):
                torch.manual_seed(0)
                course.append(time_course_fcn(voc, crop, args.batch, args.steps))
                torch.manual_seed(0)
                ours.append(time_divekit_fcn(voc, crop, args.batch, args.steps))
            c, o = statistics.median(course), statistics.median(ours)
            r = paired_ratio(ours, course)  # images/s: divekit's over the course's, per round
            print(f"FCN training, crop {args.crop}, batch {args.batch}: course {c:.2f} images/s, "
                  f"divekit {o:.2f} images/s, {r}  goal >= {FCN_GOAL}x: {verdict(r, FCN_GOAL)}  "
                  f"(rounds: course {[round(v, 2) for v in course]}, divekit "
                  f"{[round(v, 2) for v in ours]})")
            rows.append([f"FCN training, crop {crop[0]}×{crop[1]}, batch {args.batch}, SGD, "
                         f"{data_note}, "
                         "torchvision ResNet-18 body on both sides", f"{c:.2f} images/s",
                         f"{o:.2f} images/s", r.md(), goal_cell(FCN_GOAL), verdict(r, FCN_GOAL)])
            if verdict(r, FCN_GOAL) != "met":  # not met or not settled: where the time goes
                steps = 1 if args.smoke else min(args.steps, PROFILE_STEPS)
                caption = (f"{verdict(r, FCN_GOAL).capitalize()}: FCN training, divekit / the "
                           f"course {goal_cell(FCN_GOAL)}, the top operators by self CPU time "
                           f"over {steps} training step{'s' * (steps != 1)} of each side "
                           f"(torch.profiler): crop {crop[0]}×{crop[1]}, batch {args.batch}, "
                           "the timed rounds' set-up and step (the batch's loading included), "
                           f"after one warm-up step of each. {SUMMARY_NOTE}")
                profiles.append((caption, fcn_profile(voc, crop, args.batch, steps)))
                print(caption)
                for row in profiles[-1][1][1]:
                    print("  " + " | ".join(row))
            if args.compile == "on" and not args.smoke:
                compiled_rows.append(fcn_compile_row(voc, crop, args, data_note))
    if args.skip != "stylize":
        torch.manual_seed(0)
        state = torchvision.models.vgg19(weights=None).features.state_dict()
        course, ours = [], []
        for _ in range(args.rounds):
            course.append(time_course_stylize(size, args.style_steps, state))
            ours.append(time_divekit_stylize(size, args.style_steps, state))
        c, o = statistics.median(course), statistics.median(ours)
        r = paired_ratio(course, ours)  # seconds per step: the course's over divekit's
        print(f"stylize {args.size}: course {c:.3f} s/step, divekit {o:.3f} s/step, {r}  "
              f"(rounds: course {[round(v, 3) for v in course]}, divekit "
              f"{[round(v, 3) for v in ours]})")
        rows.append([f"stylize {size[0]}×{size[1]}, Adam, same random VGG-19 weights, seconds "
                     "per step", f"{c:.3f} s", f"{o:.3f} s", r.md(), "—", "—"])
    report = Report("Dense vision: FCN training and style transfer against the course's code")
    report.table(["benchmark", "course", "divekit", "ratio (min–max)", "goal", "verdict"], rows,
                 align="lrrrll",
                 caption=f"Rounds alternate the course's code and divekit's ({args.rounds} "
                         f"rounds, {args.steps} timed FCN steps and {args.style_steps} stylize "
                         "steps a round); medians, the ratio's min–max over the rounds.")
    for caption, (headers, table) in profiles:
        report.table(headers, table, align="l" * len(headers), caption=caption)
    if compiled_rows:
        report.table(["benchmark", "divekit eager", "divekit compiled", "compiled / eager",
                      "compile s, first run", "compile s, later runs", f"≥ {COMPILE_GOAL}×",
                      "--compile default"], compiled_rows, align="lrrrrrll",
                     caption="`--compile`: divekit's FCN steps eager and through torch.compile, "
                             f"interleaved ({args.rounds} rounds), images/s after the first "
                             "step; the compile time apart (the compiled first step beyond the "
                             "eager one; first run: Inductor's disk cache empty, later runs: "
                             "warm).")
    if not args.no_memory:
        mem = memory_rows(args)
        report.table(["benchmark", *MEMORY_HEADERS, "divekit ≤ the course"], mem,
                     align="llrrrl",
                     caption="Peak resident memory of each side: each run once more, alone, in "
                             "a fresh process (`VmHWM`; \"of which the call\": above the RSS "
                             "just before it, imports done). Goal: divekit ≤ the course. "
                             f"{memory_note(memory_runs(args))}")
    report.write(args.markdown)


if __name__ == "__main__":
    main()
