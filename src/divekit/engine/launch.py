"""Starting data-parallel runs: ``divekit train ... --nproc N`` and life under ``torchrun``.

``--nproc N`` runs ``torch.distributed.run``'s elastic agent in this process; the agent starts
N copies of ``python -m divekit train ...`` with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set, exactly
what ``torchrun --nproc-per-node N -m divekit train ...`` does, restarts them all after a
failure up to ``--max-restarts`` times, and each restart resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from divekit.engine import distributed as D
from divekit.errors import DivekitError


class WorkersFailed(DivekitError):
    """The workers of a ``--nproc`` run failed; empty when rank 0 already said why."""


def is_main_process() -> bool:
    return D.current_env().is_main


def restart_count() -> int:
    """Which attempt this is under torchrun's ``--max-restarts`` (0: the first)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def should_spawn(launch: Any) -> bool:
    return launch.nproc > 1 and not D.launched_by_torchrun()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run_in_group(rank: int, fn: Any, world_size: int, port: int, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_local(fn: Any, nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` CPU processes joined in a gloo group on 127.0.0.1
    (one thread each), as ``torchrun`` would start them; ``fn`` must be a module-level function.
    Tests and notebooks use it to try data parallelism without a launcher."""
    import torch.multiprocessing as mp

    mp.spawn(_run_in_group, args=(fn, nprocs, free_port(), args), nprocs=nprocs, join=True)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def config_argv(cfg: Any) -> list[str]:
    """The ``divekit train`` options that reproduce ``cfg`` exactly: every option is spelled
    out (a recipe default must not come back in place of what the config holds)."""
    import typing

    hints = typing.get_type_hints(type(cfg))
    tri_state = {n for n, h in hints.items() if type(None) in typing.get_args(h)
                 and bool in typing.get_args(h)}
    argv: list[str] = []
    values = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
              if f.metadata.get("cli", True) is not False]
    values += list(getattr(cfg, "model_options", {}).items())
    for name, value in values:
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # a tri-state (bool | None) option says off as --no-X
            argv += [flag] if value else ([f"--no-{flag[2:]}"] if name in tri_state else [])
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def spawn(cfg: Any, launch_cfg: Any) -> None:
    """Run ``cfg`` on ``launch_cfg.nproc`` local processes through torch.distributed's elastic
    agent (``launch_cfg``: a :class:`divekit.engine.config.LaunchConfig`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from divekit.engine.record import choose_run_dir

    if launch_cfg.port is not None and not port_is_free(launch_cfg.port):
        raise DivekitError(f"port {launch_cfg.port} is in use on 127.0.0.1; pick another --port or "
                           "leave it out to use a free one")
    launch_cfg.validate()
    # every worker must write to the one run directory chosen here
    out = choose_run_dir(cfg.out, cfg.run_name, cfg.resume)
    cfg = dataclasses.replace(cfg, out=str(out))
    endpoint = f"127.0.0.1:{launch_cfg.port if launch_cfg.port is not None else 0}"
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=launch_cfg.nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=launch_cfg.max_restarts,
        monitor_interval=0.2, rdzv_configs={"timeout": int(cfg.dist_timeout)},
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N processes share the cores
    if not os.environ.get("DIVEKIT_DEBUG"):
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    argv = ["-u", "-m", "divekit", "train", cfg.model, *config_argv(cfg)]
    try:
        elastic_launch(launch, sys.executable)(*argv)
    except ChildFailedError as e:
        raise _failure(e) from None


def _failure(error: Any) -> WorkersFailed:
    failures = error.failures  # global rank -> ProcessFailure
    first = failures.get(0)
    if first is not None and first.exitcode == 2:  # rank 0 printed a DivekitError already
        return WorkersFailed("")
    rank, failure = min(failures.items())
    return WorkersFailed(f"worker rank {rank} exited with code {failure.exitcode} "
                         f"(restarts used up); its messages are above")


@contextlib.contextmanager
def worker(cfg: Any) -> Iterator[Any]:
    """Under torchrun: join the process group, agree on one run directory, leave at the end.

    Rank 0 chooses the run directory (and whether to resume: a restarted attempt resumes from
    the checkpoint the failed one left) and tells the others, so no two ranks race for
    ``runs/MODEL-DATA-N``. Outside torchrun ``cfg`` passes through unchanged.
    """
    if not D.launched_by_torchrun():
        yield cfg
        return
    device = D.worker_device(getattr(cfg, "device", "auto"), D.env_from_launcher())
    env, created = D.init_process_group(device, getattr(cfg, "dist_timeout", 300.0))
    try:
        choice: tuple[str | None, bool, str] = (None, False, "")
        if env.is_main and hasattr(cfg, "out"):
            try:
                choice = (*_choose(cfg), "")
            except DivekitError as e:
                choice = (None, False, str(e))
        out, resume, error = D.broadcast_object(choice)
        if error:
            raise DivekitError(error) if env.is_main else WorkersFailed("")
        if out is not None:
            cfg = dataclasses.replace(cfg, out=out, resume=resume)
        yield cfg
    finally:
        if created:
            D.destroy_process_group()


def job_id() -> str | None:
    """torchrun's ``--rdzv-id`` of this job (None outside torchrun, or torchrun's default
    ``none``, which every job shares and so identifies none)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def _started_by_this_job(out: str | None) -> bool:
    """Whether the run directory ``out`` was started by this torchrun job (same ``--rdzv-id``):
    then this attempt is a restart, whatever its node's restart count says."""
    import json

    run_id = job_id()
    if out is None or run_id is None:
        return False
    try:
        record = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and (record.get("distributed") or {}).get("job_id") == run_id


def restarted(out: str | None) -> bool:
    """Whether this round of workers continues an earlier round of the same torchrun job.

    This node's restart count is not enough: across machines, a node whose workers were
    restarted because another node's failed keeps count 0. The agent's store, which lives as
    long as the job, counts the rounds (:func:`~divekit.engine.distributed.elastic_round`) and
    settles it. Only where the agent does not host the store
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) does the run directory's recorded ``--rdzv-id``
    decide; a later job that reuses the id and ``--out`` of a finished one is then taken for
    a restart, which the store's count never does.
    """
    if restart_count() > 0:
        return True
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return D.elastic_round() > 0
    return _started_by_this_job(out)


def _choose(cfg: Any) -> tuple[str, bool]:
    from divekit.engine.checkpoint import CheckpointDir
    from divekit.engine.record import choose_run_dir

    if restarted(cfg.out):  # continue the run the failed round left
        if cfg.out is not None:
            return cfg.out, CheckpointDir(cfg.out).latest() is not None
        with contextlib.suppress(DivekitError):
            return str(choose_run_dir(None, cfg.run_name, True)), True
    return str(choose_run_dir(cfg.out, cfg.run_name, cfg.resume)), bool(cfg.resume)
