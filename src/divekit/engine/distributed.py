"""Data parallelism: the course's single-process helpers, a hand-written ring all-reduce, and
the process-group plumbing the Trainer uses under ``torchrun``.

The course (chapter "Multiple GPUs") splits each minibatch across devices, sums the gradients
with an all-reduce and copies the sum back. :func:`split_batch` and :func:`allreduce` are those
two helpers for tensors in one process; :func:`ring_allreduce` is the same sum between
processes, over ``torch.distributed`` point-to-point messages.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from divekit.errors import DivekitError


# ------------------------------------------------------------------ the course's helpers
def split_batch(
    X: Tensor, y: Tensor, devices: Sequence[torch.device | str]
) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``X`` and ``y`` along the batch axis into one near-equal part per device.

    ``X``: (n, ...), ``y``: (n, ...) → two lists of ``len(devices)`` tensors whose sizes differ by
    at most one (the first ``n % k`` parts hold one sample more), each moved to its device.
    """
    if X.shape[0] != y.shape[0]:
        raise DivekitError(f"X holds {X.shape[0]} samples but y holds {y.shape[0]}")
    if not devices:
        raise DivekitError("split_batch needs at least one device")
    if X.shape[0] < len(devices):
        raise DivekitError(f"cannot split a batch of {X.shape[0]} across {len(devices)} devices")
    xs = torch.tensor_split(X, len(devices))
    ys = torch.tensor_split(y, len(devices))
    return ([x.to(d) for x, d in zip(xs, devices)], [t.to(d) for t, d in zip(ys, devices)])


def allreduce(data: list[Tensor]) -> list[Tensor]:
    """Sum ``data[i]`` over ``i`` and write the sum back into every tensor, in place.

    As in the course: accumulate everything into ``data[0]``, then broadcast it to the others
    (each on its own device).
    """
    if not data:
        raise DivekitError("allreduce needs at least one tensor")
    shapes = {tuple(t.shape) for t in data}
    if len(shapes) != 1:
        raise DivekitError(f"allreduce needs tensors of one shape, got {sorted(shapes)}")
    for t in data[1:]:
        data[0] += t.to(data[0].device)
    for t in data[1:]:
        t.copy_(data[0].to(t.device))
    return data


# ------------------------------------------------------------------ ring all-reduce
def _peer(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _exchange(send: Tensor, recv: Tensor, to: int, frm: int, group) -> None:
    ops = [dist.P2POp(dist.isend, send.contiguous(), to, group),
           dist.P2POp(dist.irecv, recv, frm, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def ring_allreduce(tensor: Tensor, group: dist.ProcessGroup | None = None,
                   counter: CommCounter | None = None) -> Tensor:
    """Sum ``tensor`` over all ranks of ``group``, in place, by the ring algorithm.

    The flattened tensor is cut into ``W`` chunks (sizes differ by at most one element, so any
    size works). *Reduce-scatter*: for ``s = 0 .. W-2`` rank ``r`` sends chunk ``(r - s) mod W``
    to rank ``r+1`` and adds the chunk ``(r - s - 1) mod W`` it receives from rank ``r-1``; after
    ``W-1`` steps rank ``r`` holds the full sum of chunk ``(r + 1) mod W``. *All-gather*: ``W-1``
    more steps pass the finished chunks around the ring. Each rank sends ``2 (W-1)/W`` of the
    tensor's bytes whatever ``W`` is, which is why the ring is bandwidth-optimal.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    rank = dist.get_rank(group)
    right, left = _peer(group, (rank + 1) % world), _peer(group, (rank - 1) % world)
    flat = tensor.detach().view(-1) if tensor.is_contiguous() else tensor.detach().reshape(-1)
    chunks = list(torch.tensor_split(flat, world))
    for s in range(world - 1):  # reduce-scatter
        send, recv = chunks[(rank - s) % world], chunks[(rank - s - 1) % world]
        incoming = torch.empty_like(recv)
        _exchange(send, incoming, right, left, group)
        recv += incoming
        _count(counter, send)
    for s in range(world - 1):  # all-gather
        send, recv = chunks[(rank + 1 - s) % world], chunks[(rank - s) % world]
        incoming = torch.empty_like(recv)
        _exchange(send, incoming, right, left, group)
        recv.copy_(incoming)
        _count(counter, send)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view_as(tensor))
    return tensor


def _count(counter: CommCounter | None, sent: Tensor) -> None:
    if counter is not None:
        counter.add(sent.numel() * sent.element_size())


@dataclass
class CommCounter:
    """Bytes this process sent, and in how many steps (``--profile-comm``)."""

    sent: int = 0
    steps: int = 0

    def add(self, nbytes: int) -> None:
        self.sent += int(nbytes)

    def per_step(self) -> float:
        return self.sent / max(self.steps, 1)

    def reset(self) -> None:
        self.sent = self.steps = 0


# ------------------------------------------------------------------ the process group
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the world size, its rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_launcher() -> DistEnv:
    """The ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables ``torchrun`` sets (1 process without)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise DivekitError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None


def launched_by_torchrun() -> bool:
    return env_from_launcher().world_size > 1


def current_env() -> DistEnv:
    """The initialised process group's view, else the launcher's variables."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local)
    return env_from_launcher()


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def worker_device(name: str, env: DistEnv) -> torch.device:
    """Under data parallelism each process on a machine takes GPU ``LOCAL_RANK``."""
    from divekit.engine.device import resolve_device

    device = resolve_device(name)
    if env.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_process_group(device: torch.device, timeout_s: float = 300.0) -> tuple[DistEnv, bool]:
    """Join the launcher's process group; returns ``(env, created_here)``.

    Waiting for the other processes (the rendezvous) gives up after ``timeout_s`` seconds with
    a one-line error instead of hanging, as does any later collective that a peer never joins.
    """
    env = env_from_launcher()
    if not env.enabled or dist.is_initialized():
        return current_env(), False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DivekitError(f"WORLD_SIZE is {env.world_size} but {var} is not set; "
                               "launch with torchrun or `divekit train ... --nproc N`")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(
            backend_for(device), rank=env.rank, world_size=env.world_size, timeout=timeout,
            device_id=device if device.type == "cuda" else None, store=_attempt_store(env, timeout),
        )
    except (RuntimeError, ValueError) as e:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DivekitError(
            f"rendezvous of {env.world_size} processes at {where} failed within "
            f"{timeout_s:g} s (--dist-timeout): {first}"
        ) from None
    return env, True


def _attempt_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torch.distributed's elastic agent, a store private to this round of workers.

    The agent's store outlives its workers: after a restart it still holds the failed round's
    keys, among them the gloo/nccl addresses of processes that are dead now. A new worker that
    reads one connects to nobody ("connection refused") or waits for a peer that never comes.
    So every round of workers agrees on a fresh name (:func:`agree_on_round`) and keeps its
    keys under it. ``TORCHELASTIC_RESTART_COUNT`` cannot be that name: across machines it
    differs, because a node restarted for another node's failure keeps its count.
    ``None`` (plain ``env://``) outside the agent.
    """
    global _ROUND
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") is None:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
        is_master=env.rank == 0 and not agent_hosts, timeout=timeout, multi_tenant=True,
    )
    _ROUND = agree_on_round(store, env, timeout)
    return dist.PrefixStore(f"divekit/round-{_ROUND.name}", store)


class Round(NamedTuple):
    """One round of workers under an elastic agent: a name no other round of the job shares,
    and how many rounds of the job reached this point before it (as far as the store knows)."""

    name: str
    earlier: int


_ROUND: Round | None = None
_HELLO, _WELCOME, _READY = "divekit/hello", "divekit/welcome", "divekit/ready"


def elastic_round() -> int:
    """How many earlier rounds of workers this torchrun job had (0 in the first round, and
    outside torchrun). Known when the agent hosts the store (torchrun's default), which lives
    as long as the job; each restart, on whichever node it began, starts a new round. With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` each round has a fresh store and this stays 0."""
    return _ROUND.earlier if _ROUND is not None else 0


def agree_on_round(store: dist.Store, env: DistEnv, timeout: datetime.timedelta) -> Round:
    """The :class:`Round` of this process's workers: all of them get the same one.

    ``store`` may hold any number of keys left by earlier rounds, whose processes are all dead
    (an elastic agent stops its workers before it joins the next rendezvous). Rank 0 draws a
    random name and counts the round (``store.add``). Every other rank ``r`` draws a random
    nonce, writes it to ``hello/r`` and waits for ``welcome/<nonce>``: only this round's rank 0
    can write that key, since nobody else knows the nonce. Rank 0 answers every nonce it finds
    in ``hello/r`` (a stale one too: nobody waits for that answer, so it is harmless) until rank
    ``r`` confirms with ``ready/<name>/r``, a key no earlier round can have written either. Each
    wait ends after ``timeout``: a peer that never comes gives a one-line error, not a hang.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    if env.rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{_HELLO}/{env.rank}", nonce)
        try:
            store.wait([f"{_WELCOME}/{nonce}"], timeout)
        except RuntimeError:
            raise DivekitError(
                f"rank {env.rank}: rank 0 of this round did not answer within "
                f"{timeout.total_seconds():g} s (--dist-timeout)"
            ) from None
        earlier, given = store.get(f"{_WELCOME}/{nonce}").decode().split(" ")
        store.set(f"{_READY}/{given}/{env.rank}", "1")
        return Round(given, int(earlier))
    name, before = uuid.uuid4().hex, store.add("divekit/rounds", 1) - 1
    answered: dict[int, bytes] = {}
    waiting = set(range(1, env.world_size))
    pause = 0.005
    while waiting:
        for r in sorted(waiting):
            if store.check([f"{_HELLO}/{r}"]):
                hello = store.get(f"{_HELLO}/{r}")
                if answered.get(r) != hello:
                    store.set(f"{_WELCOME}/{hello.decode()}", f"{before} {name}")
                    answered[r] = hello
            if store.check([f"{_READY}/{name}/{r}"]):
                waiting.discard(r)
        if waiting:
            if time.monotonic() > deadline:
                raise DivekitError(
                    f"rank 0: rank(s) {sorted(waiting)} of this round did not join within "
                    f"{timeout.total_seconds():g} s (--dist-timeout)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
    return Round(name, before)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (unchanged without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of a tensor over ranks (a copy; the input is unchanged)."""
    out = values.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
