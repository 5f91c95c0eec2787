"""The configs every task shares: the loop's (:class:`TrainConfig`), a task's common options
(:class:`TaskConfig`) and the launcher's (:class:`LaunchConfig`).

Configs are frozen dataclasses; every field is a ``divekit train`` option (see
:mod:`divekit.config`). A task's config extends :class:`TaskConfig` and adds its checks by
overriding :meth:`TrainConfig.checks`; :meth:`TrainConfig.validate` runs them all, so every value
is checked once, where it enters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from divekit.config import flag_name, option
from divekit.engine.compile import REFUSED_STRATEGIES, default_families_text
from divekit.engine.strategies import STRATEGIES
from divekit.errors import DivekitError

Check = tuple[bool, str]


def finite(x: float | None) -> bool:
    return x is None or (isinstance(x, int | float) and math.isfinite(x))


def check_call(fn: Any, *args: Any) -> Check:
    """A check that passes when ``fn(*args)`` raises no :class:`DivekitError` (whose message
    becomes the check's): for options parsed by their own code, such as an augmentation list."""
    try:
        fn(*args)
    except DivekitError as e:
        return False, str(e)
    return True, ""


def data_dir_check(data: str, data_dir: str | None, download: bool = False) -> Check:
    """``--data-dir`` only for a dataset that reads files (not an embedded or generated one),
    and then a folder that exists, unless ``--download`` is to fill it."""
    if data_dir is None:
        return True, ""
    from divekit.data import dataset_info, list_datasets

    if data in list_datasets() and dataset_info(data).offline:
        return False, (f"--data-dir does not apply to --data {data}: it is embedded or generated "
                       "and reads no files")
    if not download and not os.path.isdir(data_dir):
        return False, (f"--data-dir {data_dir!r} is not a folder (--data {data} reads its files "
                       "from one; --download fetches them into it)")
    return True, ""


def clip_norm(text: str) -> float | None:
    """``--grad-clip θ`` as typed: a norm, or 0 for no clipping at all (``None``)."""
    try:
        value = float(text)
    except ValueError:
        raise DivekitError(f"--grad-clip must be a number (0 = off), got {text!r}") from None
    return None if value == 0 else value


@dataclass(frozen=True)
class TrainConfig:
    """What the loop needs. Every field becomes a ``divekit train`` option
    (``grad_clip`` → ``--grad-clip``)."""

    epochs: int = option(10, "total epochs (with --resume: the total to reach)")
    lr: float = option(0.05, "learning rate")
    optimizer: str = option("sgd", "optimizer", choices=["sgd", "adam", "adamw"])
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(0.0, "L2 weight decay")
    scheduler: str = option(
        "none", "learning-rate schedule", choices=["none", "cosine", "step", "onecycle"]
    )
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up, in epochs")
    grad_clip: float | None = option(
        None, "clip the gradients' global norm to θ: g ← min(1, θ/‖g‖) g; 0 = off",
        aliases=["--clip"], type=clip_norm, metavar="θ",
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = option(False, "bfloat16 mixed precision (autocast)")
    channels_last: bool | None = option(
        None, "channels_last (NHWC) memory format; default: on for models with 2-D convolutions, "
        "where oneDNN and cuDNN run faster in it (on the CPU, the layers measured faster in "
        "NCHW keep NCHW: ResNet's 512-channel blocks, FCN's upsampling)")
    compile: bool | None = option(
        None, "torch.compile the model (training and validation; the first steps compile, "
        "seconds to minutes); default: on for the model families where it wins >= 1.2x after "
        f"compilation on a 2-core CPU ({default_families_text()}), off for the others")
    seed: int = option(0, "random seed (data split, shuffling, initialisation)")
    threads: int | None = option(None, "CPU threads for PyTorch (default: PyTorch's choice)")
    quiet: bool = option(False, "no progress bars")
    tensorboard: bool = option(False, "also write TensorBoard event files")
    checkpoint_every: int | None = option(
        None, "also checkpoint every K optimizer steps (mid-epoch; resumes exactly)", metavar="K"
    )
    callbacks: str | None = option(
        None, "extra Trainer callbacks, comma-separated MODULE:CLASS (each built with no "
        "arguments), after the default ones", metavar="LIST",
    )
    # data parallelism (see divekit.engine.strategies and the README)
    strategy: str = option(
        "ddp", "how the workers share the training: data parallel ddp (DistributedDataParallel), "
        "allreduce (divekit's ring all-reduce), ps (parameter server on rank 0), async "
        "(asynchronous parameter server, see --staleness), fsdp (sharded data parallel); model "
        "parallel pipeline (see --stages, --microbatches) or tensor (see --tp)",
        choices=list(STRATEGIES),
    )
    staleness: int | None = option(
        None, "async: how many updates a worker may run ahead of the slowest (stale-synchronous "
        "parallel; 0 = synchronous ps; default: unbounded)", metavar="K")
    stages: int | None = option(
        None, "pipeline: the number of stages the model is cut into (default: the number of "
        "processes)", metavar="S")
    microbatches: int = option(
        4, "pipeline: microbatches each batch is split into (the bubble is (S-1)/(M+S-1))",
        metavar="M")
    pipeline_schedule: str = option(
        "1f1b", "pipeline: the schedule, gpipe (all forwards, then all backwards) or 1f1b "
        "(one forward, one backward: fewer activations held)", choices=["gpipe", "1f1b"])
    tp: int | None = option(
        None, "tensor: ranks each attention and feed-forward layer is split over (default: the "
        "number of processes)", metavar="N")
    scale_lr: str = option(
        "none", "linear: multiply --lr by the number of workers (pair it with --warmup-epochs)",
        choices=["none", "linear"],
    )
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (SyncBatchNorm; CUDA)")
    profile_comm: bool = option(False, "log the bytes each worker sends per step (metrics.csv)")
    dist_timeout: float = option(
        300.0, "seconds to wait for the other processes (rendezvous, collectives) before failing",
        metavar="S",
    )

    def checks(self) -> list[Check]:
        """``(ok, message)`` pairs; a subclass returns ``super().checks() + [...]``."""
        return [
            (isinstance(self.epochs, int) and self.epochs >= 1,
             f"--epochs must be at least 1, got {self.epochs}"),
            (finite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (finite(self.momentum) and 0 <= self.momentum < 1,
             f"--momentum must be in [0, 1), got {self.momentum}"),
            (finite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (finite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs must be in [0, --epochs], got {self.warmup_epochs}"),
            (self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip >= 0),
             f"--grad-clip must be 0 (off) or a positive number, got {self.grad_clip}"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**32,
             f"--seed must be in [0, 2^32), got {self.seed}"),
            (self.threads is None or self.threads >= 1,
             f"--threads must be at least 1, got {self.threads}"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"),
            (finite(self.dist_timeout) and self.dist_timeout > 0,
             f"--dist-timeout must be positive, got {self.dist_timeout}"),
            (self.strategy in STRATEGIES,
             f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.scale_lr in ("none", "linear"), f"--scale-lr must be none or linear, got {self.scale_lr!r}"),
            (self.staleness is None or (isinstance(self.staleness, int) and self.staleness >= 0),
             f"--staleness must be 0 or more, got {self.staleness}"),
            (self.stages is None or (isinstance(self.stages, int) and self.stages >= 1),
             f"--stages must be at least 1, got {self.stages}"),
            (isinstance(self.microbatches, int) and self.microbatches >= 1,
             f"--microbatches must be at least 1, got {self.microbatches}"),
            (self.pipeline_schedule in ("gpipe", "1f1b"),
             f"--pipeline-schedule must be gpipe or 1f1b, got {self.pipeline_schedule!r}"),
            (self.tp is None or (isinstance(self.tp, int) and self.tp >= 1),
             f"--tp must be at least 1, got {self.tp}"),
            (not self.compile or self.strategy not in REFUSED_STRATEGIES,
             f"--compile does not go with --strategy {self.strategy}: "
             f"{REFUSED_STRATEGIES.get(self.strategy, '')}"),
            *self._strategy_option_checks(),
        ]

    def _strategy_option_checks(self) -> list[Check]:
        """A strategy's own option (``--staleness``, ``--stages``, ``--microbatches``,
        ``--pipeline-schedule``, ``--tp``), set away from its default with another strategy,
        would be dropped silently: refused, naming the strategy it belongs to. A
        resume may change the strategy and carries the run's value over, so it is not judged."""
        if getattr(self, "resume", False):
            return []
        owners = {"staleness": "async", "stages": "pipeline", "microbatches": "pipeline",
                  "pipeline_schedule": "pipeline", "tp": "tensor"}
        unset = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in owners}
        return [(getattr(self, name) == unset[name] or self.strategy == owner,
                 f"{flag_name(name)} applies to --strategy {owner} only, not to --strategy "
                 f"{self.strategy}") for name, owner in owners.items()]

    def validate(self) -> None:
        """Raise :class:`DivekitError` with the first failing check's message."""
        for ok, message in self.checks():
            if not ok:
                raise DivekitError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaskConfig(TrainConfig):
    """What every task has besides the loop: the model, the data and the run directory."""

    model: str = option("", "model name (see `divekit models`)", cli=False)
    data: str = option("", "dataset name (see `divekit datasets`)", metavar="NAME")
    batch_size: int = option(128, "minibatch size (per worker)", metavar="N")
    data_dir: str | None = option(None, "folder with the dataset's files, when you have them", metavar="DIR")
    download: bool = option(False, "download missing files (hash-checked)")
    limit: int | None = option(None, "use only the first N training samples (quick runs)", metavar="N")
    out: str | None = option(None, "run directory (default: runs/MODEL-DATA, numbered if taken)", metavar="DIR")
    resume: bool = option(False, "continue the run in --out (or the newest runs/MODEL-DATA*)")
    force_resume: bool = option(
        False, "with --resume: continue even though options that change what the run learns "
        "(--seed, --lr, --batch-size, ...) differ from the run's; each change is recorded in "
        "config.json (forced_changes)")
    # the model family's hyper-parameters (its config dataclass, see divekit.models.registry),
    # named as the builder's arguments; the CLI adds one option per field
    model_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    # options a resume may change freely (divekit.engine.run.resume_changes): they only extend
    # the run (--epochs), say where things are (--data-dir) or change nothing it learns (how
    # fast, on what, what is shown or logged). Every other field is what the run *is*. A task
    # config extends the set for its own such options: RESUME_FREE = TaskConfig.RESUME_FREE | {..}
    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({
        "epochs", "device", "threads", "channels_last", "compile", "quiet", "tensorboard",
        "callbacks", "checkpoint_every", "strategy", "stages", "microbatches",
        "pipeline_schedule", "tp", "profile_comm", "dist_timeout", "data_dir", "download",
        "out", "resume", "force_resume",
    })

    def checks(self) -> list[Check]:
        bs = self.batch_size
        return super().checks() + [
            (bs == "auto" or (isinstance(bs, int) and bs >= 1),
             f"--batch-size must be at least 1, got {bs!r}"),
            (self.limit is None or self.limit >= 1, f"--limit must be at least 1, got {self.limit}"),
            data_dir_check(self.data, self.data_dir, self.download),
            (self.resume or not self.force_resume, "--force-resume only goes with --resume"),
        ]

    @property
    def run_name(self) -> str:
        return f"{self.model}-{self.data}"


@dataclass(frozen=True)
class LaunchConfig:
    """Options only the launcher reads (``--nproc N`` starts N workers through
    ``torch.distributed.run``); the workers never see them."""

    nproc: int = option(
        1, "worker processes on this machine; N > 1 launches them through torch.distributed.run "
        "(like `torchrun --nproc-per-node N`); --batch-size stays per worker", metavar="N",
    )
    max_restarts: int = option(
        0, "with --nproc: restart the workers up to N times after a failure, from the last "
        "checkpoint", metavar="N",
    )
    port: int | None = option(
        None, "with --nproc: rendezvous port on 127.0.0.1 (default: a free one)", metavar="PORT"
    )

    def validate(self) -> None:
        if self.nproc < 1:
            raise DivekitError(f"--nproc must be at least 1, got {self.nproc}")
        if self.max_restarts < 0:
            raise DivekitError(f"--max-restarts must be 0 or more, got {self.max_restarts}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise DivekitError(f"--port must be in 1..65535, got {self.port}")
