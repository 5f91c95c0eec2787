"""How long one training step takes on N devices, for each way of splitting the work.

The course's notes on distributed training end with a trade-off: more devices divide the
computation, but they must talk, and the talking does not shrink. This module puts numbers on
it with three inputs, as a back-of-the-envelope planner would:

* **the model's work**: FLOPs of one forward pass per sample, counted by
  ``torch.utils.flop_counter`` on the meta device (shapes only, so ResNet-50 and BERT-base cost
  nothing to profile), times 3 for forward + backward (the backward pass computes two products
  per forward product: one for the input's gradient, one for the weight's);
* **a device rate** ``R`` in FLOP/s (given, or :func:`measure_flops_per_s` times a GEMM);
* **an alpha-beta network**: a message of ``b`` bytes takes ``alpha + b / B`` seconds
  (``alpha`` the latency per message, ``B`` the bandwidth of one link);
* **two per-step costs** that FLOPs and bytes miss, both measured (``benchmarks/planner_check.py``
  measures them here) or given: ``t0``, the fixed cost of a step on each device whatever its
  batch (the optimizer step, zeroing the gradients, fetching the batch, Python and kernel
  launches: the intercept of step time against batch size), and ``sigma``, the spread (standard
  deviation) of one device's step time. A synchronous step waits for the slowest of ``N``
  devices, which is ``sigma · e(N)`` later than the average one (:func:`expected_max_normal`:
  ``e(2) = 1/sqrt(pi) = 0.56``, ``e(1024) = 3.2``). On a shared machine both are large: on
  the loaded 2-core machine this was written on, a 2-process LeNet step waited longer for the
  slower process (sigma about 16 ms, so 9 ms) than its all-reduce took (about 3 ms).

Per strategy, with global batch ``G``, ``P`` parameter bytes and ``N`` devices:

=========  ==========================================================================
allreduce  (ddp) each device computes ``ceil(G/N)`` samples, then a ring all-reduce of the
           gradients: ``2(N-1)`` messages, each device sends ``2(N-1)/N · P`` bytes. A model
           with BatchNorm statistics also broadcasts them from rank 0 before every forward
           pass (DDP's ``broadcast_buffers``, divekit's replicated strategies): a tree of
           ``ceil(log2 N)`` messages of the buffers' bytes. ``ps`` pays it too.
ps         the same compute; the server (rank 0, also a worker) receives ``N-1`` gradient
           copies and sends ``N-1`` weight copies, one after the other over its one link:
           ``2(N-1)(alpha + P/B)``. The hot spot grows linearly with ``N``.
async      no barrier: a worker's round is its compute plus its own push and pull; the
           server's link still has to carry ``2(N-1)`` copies per round, so a round takes the
           longer of the two (communication overlaps compute, the server is the ceiling).
pipeline   ``S = N`` stages of contiguous layers, balanced by FLOPs; ``M`` micro-batches
           flow through them (GPipe). The critical path has ``M+S-1`` forward and as many
           backward slots, each the slowest stage's work on one micro-batch plus one
           (blocking) send of the activation or its gradient across a stage boundary, less
           the last slot's send; the idle fraction (the bubble) is ``(S-1)/(M+S-1)``. No
           gradient exchange.
tensor     every device sees the whole batch; what ``--strategy tensor`` splits (Megatron's
           column- then row-parallel pairs: attention, feed-forward blocks, two linear layers
           in a row, :func:`divekit.engine.tensor_parallel.tensor_parallel_plan`) is computed
           ``1/N`` per device, the rest (convolutions, norms, embeddings) is replicated and
           computed whole on every device. Each pair all-reduces its output in the forward
           pass and the gradient of its input in the backward pass. Attention and feed-forward
           widths ``N`` does not divide are refused; other pairs stay replicated.
fsdp       compute as data parallel; parameters all-gathered before the forward and again
           before the backward, gradients reduce-scattered: ``3 (N-1)/N · P`` bytes in
           ``3(N-1)`` messages.
=========  ==========================================================================

Every strategy's step adds ``t0``, and every synchronous one (all but ``async``, which has no
barrier) on ``N > 1`` devices adds the wait ``sigma · e(N)``. Communication is assumed not to
overlap computation (divekit's own strategies exchange after the backward pass), except for
``async`` where overlap is the point. Scaling efficiency is ``T(1) / (N · T(N))``: 1 when N
devices are N times as fast, and ``T(1) = t0 + G · 3F / R`` is the same for every strategy (on
one device they are all plain training).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from divekit.errors import DivekitError

STRATEGIES = ("allreduce", "ps", "async", "pipeline", "tensor", "fsdp")
DATA_PARALLEL = ("allreduce", "ps", "async", "fsdp")  # each device computes G/N samples
TRAIN_FLOPS_FACTOR = 3  # forward + backward (two products per forward product)
TARGET_EFFICIENCY = 0.8


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Split:
    """A column-parallel then row-parallel pair that ``--strategy tensor`` splits over ranks.

    ``flops`` are the pair's forward FLOPs per sample (computed ``1/N`` per rank once split);
    ``in_elems`` and ``out_elems`` the per-sample sizes of its input and its output: the
    output is all-reduced in the forward pass, the input's gradient in the backward pass.
    ``width`` is what the rank count must divide (attention heads, a hidden width);
    ``required``: attention and feed-forward blocks refuse a rank count that does not divide
    their width, a plain pair of linear layers stays replicated instead."""

    width: int
    flops: float
    in_elems: int
    out_elems: int
    required: bool = True

    def splits_over(self, n: int) -> bool:
        return self.width % n == 0


@dataclass(frozen=True)
class Unit:
    """One pipeline-able piece of a model (a residual block, a Transformer block, a layer):
    its forward FLOPs and the per-sample size of its output (what a pipeline stage ending here
    sends on), and the pairs in it that tensor parallelism splits (``splits``)."""

    name: str
    flops: float  # forward FLOPs per sample
    out_elems: int  # per sample: what a pipeline stage ending here sends on
    splits: tuple[Split, ...] = ()


@dataclass(frozen=True)
class ModelCost:
    """What the planner needs to know about a model, per sample."""

    name: str
    params: int
    forward_flops: float
    units: tuple[Unit, ...]
    shape: str = ""  # the input it was profiled on, for titles
    buffers: int = 0  # floating-point buffer elements (BatchNorm statistics), broadcast a step

    @property
    def train_flops(self) -> float:
        """Forward + backward FLOPs of one sample."""
        return TRAIN_FLOPS_FACTOR * self.forward_flops

    @property
    def splits(self) -> tuple[Split, ...]:
        return tuple(sp for u in self.units for sp in u.splits)

    def tensor_splits(self, n: int) -> tuple[Split, ...] | None:
        """The pairs ``--strategy tensor --tp n`` splits, or ``None`` where it refuses ``n``
        (a required width ``n`` does not divide, or nothing left to split)."""
        if any(sp.required and not sp.splits_over(n) for sp in self.splits):
            return None
        active = tuple(sp for sp in self.splits if sp.splits_over(n))
        return active or None


@dataclass(frozen=True)
class Network:
    """A device rate (FLOP/s), an alpha-beta link (``alpha + bytes / bandwidth`` seconds) and
    the two per-step costs: ``step_overhead`` (``t0``, seconds of every step whatever its
    batch) and ``jitter`` (``sigma``, the standard deviation of a device's step time)."""

    flops_per_s: float
    bandwidth: float  # bytes per second, one link, one direction
    latency: float = 0.0  # seconds per message (alpha)
    step_overhead: float = 0.0  # seconds per step on each device (t0)
    jitter: float = 0.0  # seconds, standard deviation of one device's step (sigma)
    value_bytes: int = 4  # float32 gradients, weights and activations

    def __post_init__(self) -> None:
        for name in ("flops_per_s", "bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise DivekitError(f"{name.replace('_', '-')} must be a positive number, "
                                   f"got {value!r}")
        for name in ("latency", "step_overhead", "jitter"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise DivekitError(f"{name.replace('_', '-')} must be a number >= 0 seconds, "
                                   f"got {value!r}")

    def message(self, nbytes: float, count: int = 1) -> float:
        """Seconds for ``count`` messages carrying ``nbytes`` in all."""
        return count * self.latency + nbytes / self.bandwidth

    def wait(self, n: int) -> float:
        """Seconds a synchronous step of ``n`` devices waits for its slowest one."""
        return self.jitter * expected_max_normal(n) if n > 1 else 0.0


# ------------------------------------------------------------------------- communication
@functools.lru_cache(maxsize=256)
def expected_max_normal(n: int) -> float:
    """``e(n)``: the mean of the largest of ``n`` independent standard normal values.

    A synchronous step ends when the slowest device does; if each device's step time has
    mean ``mu`` and standard deviation ``sigma`` the step takes ``mu + sigma · e(n)`` on
    average. Computed from ``E[X] = ∫₀^∞ P(X > x) dx - ∫₋∞⁰ P(X < x) dx`` with
    ``P(max < x) = Φ(x)ⁿ``, by the trapezoid rule on a 1e-3 grid over [-12, 12] (``e(1) = 0``,
    ``e(2) = 1/sqrt(pi)``, ``e(3) = 3/(2 sqrt(pi))``, then growing like ``sqrt(2 ln n)``)."""
    if n < 1:
        raise DivekitError(f"devices must be >= 1, got {n}")
    if n == 1:
        return 0.0
    h, steps = 1e-3, 12_000

    def upper(x: float) -> float:  # P(max > x) = 1 - (1 - Q(x))^n, Q the upper tail
        q = 0.5 * math.erfc(x / math.sqrt(2))
        return -math.expm1(n * math.log1p(-q)) if q < 1 else 1.0

    def lower(x: float) -> float:  # P(max < -x) = Q(x)^n
        q = 0.5 * math.erfc(x / math.sqrt(2))
        return math.exp(n * math.log(q)) if q > 0 else 0.0

    def trapezoid(f: Callable[[float], float]) -> float:
        return h * (0.5 * f(0.0) + sum(f(i * h) for i in range(1, steps)) + 0.5 * f(steps * h))

    return trapezoid(upper) - trapezoid(lower)


def ring_allreduce_time(nbytes: float, n: int, net: Network) -> float:
    """A ring all-reduce of ``nbytes`` over ``n`` devices: a reduce-scatter then an all-gather,
    each ``n-1`` rounds in which every device sends one ``nbytes/n`` chunk to its neighbour.
    ``2(n-1)`` messages and ``2(n-1)/n · nbytes`` bytes on each device's critical path."""
    if n <= 1:
        return 0.0
    return net.message(2 * (n - 1) / n * nbytes, 2 * (n - 1))


def ring_gather_time(nbytes: float, n: int, net: Network) -> float:
    """An all-gather or a reduce-scatter of ``nbytes`` (the whole) over a ring: half an
    all-reduce, ``n-1`` messages of ``nbytes/n``."""
    if n <= 1:
        return 0.0
    return net.message((n - 1) / n * nbytes, n - 1)


def broadcast_time(cost: ModelCost, n: int, net: Network) -> float:
    """Rank 0's floating buffers (BatchNorm's running statistics) to ``n - 1`` devices down a
    binary tree, as a replicated strategy does before every forward pass: ``ceil(log2 n)``
    rounds of one message of all of them (0 for a model without buffers)."""
    if n <= 1 or cost.buffers == 0:
        return 0.0
    return math.ceil(math.log2(n)) * net.message(cost.buffers * net.value_bytes)


def pipeline_bubble(stages: int, microbatches: int) -> float:
    """The idle fraction of a GPipe (or 1F1B) schedule: ``(S-1) / (M+S-1)``. Stage ``s`` starts
    ``s`` slots late and finishes ``S-1-s`` slots early in each direction, out of
    ``M+S-1`` slots."""
    if stages < 1 or microbatches < 1:
        raise DivekitError(f"stages and micro-batches must be >= 1, got {stages} and "
                           f"{microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


def balanced_stages(flops: Sequence[float], stages: int) -> list[int]:
    """Split units with ``flops`` into ``stages`` contiguous, non-empty groups whose largest
    total is as small as possible: the cut ``--strategy pipeline`` makes
    (:func:`divekit.engine.pipeline.balance`). Returns the index of each group's last unit; the
    last is ``len(flops) - 1``."""
    from divekit.engine.pipeline import balance

    return [end - 1 for _, end in balance(flops, stages)]


# --------------------------------------------------------------------------- step times
@dataclass(frozen=True)
class StepTime:
    """One strategy on ``devices`` devices: seconds of compute (the per-step overhead ``t0``
    included), of communication and of waiting for the slowest device on the critical path,
    and the whole step (their sum, except for ``async``)."""

    strategy: str
    devices: int
    compute: float
    comm: float
    total: float
    note: str = ""
    wait: float = 0.0


def _data_parallel_compute(cost: ModelCost, n: int, batch: int, net: Network) -> float:
    # the busiest device
    return net.step_overhead + math.ceil(batch / n) * cost.train_flops / net.flops_per_s


def step_time(strategy: str, cost: ModelCost, n: int, batch: int, net: Network,
              microbatches: int | None = None) -> StepTime | None:
    """The predicted step of ``strategy`` on ``n`` devices for a global batch of ``batch``
    samples, or ``None`` where it cannot run (fewer samples than data-parallel devices, more
    pipeline stages than units, a tensor-parallel rank count the model's widths refuse)."""
    if strategy not in STRATEGIES:
        raise DivekitError(f"unknown strategy {strategy!r}; the planner knows "
                           f"{', '.join(STRATEGIES)}")
    if n < 1 or batch < 1:
        raise DivekitError(f"devices and batch size must be >= 1, got {n} and {batch}")
    pbytes = cost.params * net.value_bytes
    wait = net.wait(n)
    if strategy in DATA_PARALLEL:
        if n > batch:
            return None
        compute = _data_parallel_compute(cost, n, batch, net)
        if strategy == "allreduce":
            comm = ring_allreduce_time(pbytes, n, net) + broadcast_time(cost, n, net)
        elif strategy == "fsdp":
            comm = 3 * ring_gather_time(pbytes, n, net)  # gather, gather again, reduce-scatter
        else:  # the server's link
            comm = 2 * (n - 1) * net.message(pbytes) if n > 1 else 0.0
            if strategy == "ps":
                comm += broadcast_time(cost, n, net)
        if strategy == "async" and n > 1:  # no barrier: no wait for the slowest
            worker_round = compute + 2 * net.message(pbytes)  # its own push and pull
            total = max(worker_round, comm)
            return StepTime(strategy, n, compute, total - compute, total,
                            "server-bound" if comm > worker_round else "worker-bound")
        return StepTime(strategy, n, compute, comm, compute + comm + wait, wait=wait)
    if strategy == "tensor":
        active = cost.tensor_splits(n) if n > 1 else ()
        if active is None:
            return None
        split = sum(sp.flops for sp in active)
        flops = cost.forward_flops - split + split / n  # the replicated layers run whole
        compute = net.step_overhead + batch * TRAIN_FLOPS_FACTOR * flops / net.flops_per_s
        comm = sum(ring_allreduce_time(batch * sp.out_elems * net.value_bytes, n, net)
                   + ring_allreduce_time(batch * sp.in_elems * net.value_bytes, n, net)
                   for sp in active)
        return StepTime(strategy, n, compute, comm, compute + comm + wait,
                        f"{len(active)} of {len(cost.splits)} pairs split", wait=wait)
    # pipeline: S = n stages, M micro-batches of G/M samples (on average)
    if n > len(cost.units):
        return None
    m = min(microbatches or 4 * n, batch)
    ends = balanced_stages([u.flops for u in cost.units], n)
    starts = [0, *(e + 1 for e in ends[:-1])]
    slowest = max(sum(u.flops for u in cost.units[a:b + 1]) for a, b in zip(starts, ends))
    per_micro = batch / m
    slot_compute = per_micro * TRAIN_FLOPS_FACTOR * slowest / net.flops_per_s  # fwd + bwd
    boundary = max((cost.units[e].out_elems for e in ends[:-1]), default=0)
    send = net.message(per_micro * boundary * net.value_bytes) if n > 1 else 0.0
    # Blocking sends: every stage but the last (forward) or the first (backward) spends
    # compute + send per micro-batch, so a direction's critical path is M+S-1 such slots minus
    # the one send that has no receiver.
    slots = m + n - 1
    compute = net.step_overhead + slots * slot_compute
    comm = 2 * (slots - 1) * send if n > 1 else 0.0
    return StepTime(strategy, n, compute, comm, compute + comm + wait,
                    f"M={m}, bubble {pipeline_bubble(n, m):.0%}", wait=wait)


def single_device_time(cost: ModelCost, batch: int, net: Network) -> float:
    """Plain training on one device: ``t0 + G · 3F / R``."""
    return net.step_overhead + batch * cost.train_flops / net.flops_per_s


def efficiency(step: StepTime, cost: ModelCost, batch: int, net: Network) -> float:
    """``T(1) / (N · T(N))``."""
    return single_device_time(cost, batch, net) / (step.devices * step.total)


def batch_for_efficiency(strategy: str, cost: ModelCost, n: int, net: Network,
                         target: float = TARGET_EFFICIENCY, limit: int = 1 << 30,
                         microbatches: int | None = None) -> int | None:
    """The smallest global batch at which ``strategy`` on ``n`` devices reaches ``target``
    efficiency, or ``None`` if no batch up to ``limit`` does.

    For the data-parallel strategies the exchange is fixed and the busiest device computes
    ``ceil(G/N)`` samples, so the efficiency grows with ``G`` within each block
    ``((k-1)N, kN]`` and from block to block at its best point ``G = kN``, but drops at the
    start of a block (one device gets a sample more than the rest). So: a doubling search and
    a bisection over the multiples ``kN`` find the first block that reaches ``target``, and a
    bisection inside that block finds the smallest batch."""

    def ok(g: int) -> bool:
        step = step_time(strategy, cost, n, g, net, microbatches)
        return step is not None and efficiency(step, cost, g, net) >= target - 1e-12

    def first(lo: int, hi: int, good: Callable[[int], bool]) -> int:
        """The smallest x in (lo, hi] with good(x), given good(hi), not good(lo), monotone."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if good(mid) else (mid, hi)
        return hi

    k = 1
    while not ok(k * n):
        if k * n >= limit:
            return None
        k *= 2
    k = first(k // 2, k, lambda j: j > 0 and ok(j * n)) if k > 1 else 1
    return first(max((k - 1) * n, n - 1), k * n, ok) if k * n > n else n


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlanRow:
    devices: int
    steps: dict[str, StepTime | None]
    efficiencies: dict[str, float | None]
    batch_for_80: int | None  # allreduce: the smallest G with efficiency >= 0.8 at this N


@dataclass(frozen=True)
class Plan:
    cost: ModelCost
    net: Network
    batch: int
    microbatches: int | None
    rows: list[PlanRow] = field(default_factory=list)

    def verdict(self, strategy: str = "allreduce") -> dict[str, int | None]:
        """Where ``strategy`` stops paying off: the last N whose efficiency is >= 0.8
        (``last_efficient``), the N with the shortest step (``fastest``; beyond it more
        devices make a step slower), and the batch that makes the largest N efficient."""
        good = [r.devices for r in self.rows if (r.efficiencies.get(strategy) or 0)
                >= TARGET_EFFICIENCY - 1e-12]
        timed = [(s.total, r.devices) for r in self.rows
                 if (s := r.steps.get(strategy)) is not None]
        largest = self.rows[-1]
        return {"last_efficient": max(good) if good else None,
                "fastest": min(timed)[1] if timed else None,
                "largest": largest.devices, "batch_for_largest": largest.batch_for_80}


def device_counts(max_devices: int) -> list[int]:
    """1, 2, 4, ... up to ``max_devices`` (and ``max_devices`` itself)."""
    if max_devices < 1:
        raise DivekitError(f"--devices must be >= 1, got {max_devices}")
    counts = [1 << k for k in range(max_devices.bit_length()) if 1 << k <= max_devices]
    return counts if counts[-1] == max_devices else [*counts, max_devices]


def plan(cost: ModelCost, net: Network, batch: int, devices: Sequence[int],
         microbatches: int | None = None, strategies: Sequence[str] = STRATEGIES) -> Plan:
    """Every strategy at every device count of ``devices``."""
    if batch < 1:
        raise DivekitError(f"--batch-size must be >= 1, got {batch}")
    if microbatches is not None and microbatches < 1:
        raise DivekitError(f"--microbatches must be >= 1, got {microbatches}")
    rows = []
    for n in devices:
        steps = {s: step_time(s, cost, n, batch, net, microbatches) for s in strategies}
        effs = {s: (efficiency(t, cost, batch, net) if t is not None else None)
                for s, t in steps.items()}
        rows.append(PlanRow(n, steps, effs, batch_for_efficiency("allreduce", cost, n, net)))
    return Plan(cost, net, batch, microbatches, rows)


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def describe(p: Plan) -> str:
    """The plan's inputs in one line."""
    c, n = p.cost, p.net
    micro = f", {p.microbatches} micro-batches" if p.microbatches else ", 4 micro-batches/stage"
    buffers = f", {c.buffers:,} buffer values broadcast a step" if c.buffers else ""
    return (f"{c.name} ({c.shape}): {c.params / 1e6:.1f}M parameters{buffers}, "
            f"{_si(c.train_flops, 'FLOP')} per sample (fwd+bwd); R = {_si(n.flops_per_s, 'FLOP/s')}"
            f", B = {_si(n.bandwidth, 'B/s')}, alpha = {_seconds(n.latency)}, "
            f"t0 = {_seconds(n.step_overhead)}, sigma = {_seconds(n.jitter)}, "
            f"G = {p.batch}{micro}")


def format_plan(p: Plan) -> str:
    """Three tables (step time, samples/s, efficiency) by device count, then the verdict."""
    strategies = list(p.rows[0].steps) if p.rows else []
    w = max(9, *(len(s) + 1 for s in strategies))
    lines = [describe(p)]

    def table(title: str, cell: Callable[[PlanRow, str], str], extra: str = "",
              extra_cell: Callable[[PlanRow], str] | None = None) -> None:
        lines.append("")
        lines.append(title)
        cw = max([w, *(len(cell(r, s)) + 2 for r in p.rows for s in strategies)])
        header = f"{'devices':>7} " + "".join(f"{s:>{cw}}" for s in strategies)
        lines.append(header + (f"  {extra}" if extra else ""))
        for r in p.rows:
            row = f"{r.devices:>7} " + "".join(f"{cell(r, s):>{cw}}" for s in strategies)
            lines.append(row + (f"  {extra_cell(r):>{len(extra)}}" if extra_cell else ""))

    def step_cell(r: PlanRow, s: str) -> str:
        t = r.steps[s]
        return "-" if t is None else f"{t.total * 1e3:.4g}"

    def rate_cell(r: PlanRow, s: str) -> str:
        t = r.steps[s]
        return "-" if t is None else f"{p.batch / t.total:,.0f}"

    def eff_cell(r: PlanRow, s: str) -> str:
        e = r.efficiencies[s]
        return "-" if e is None else f"{e:.0%}"

    def batch_cell(r: PlanRow) -> str:
        return "-" if r.batch_for_80 is None else f"{r.batch_for_80:,}"

    table("step time (ms)", step_cell)
    table("samples/s", rate_cell)
    table("scaling efficiency T(1) / (N T(N))", eff_cell, "allreduce G for 80%", batch_cell)
    lines.append("")
    lines.append("'-': cannot run (fewer samples than data-parallel devices, more pipeline "
                 "stages than layers, a tensor rank count the heads or widths refuse)")
    if "allreduce" in strategies:
        lines.append(verdict_line(p))
    return "\n".join(lines)


def verdict_line(p: Plan) -> str:
    v = p.verdict("allreduce")
    parts = []
    if v["last_efficient"] is None or v["last_efficient"] == 1:
        parts.append("data parallelism (allreduce) is below 80% efficiency from 2 devices on")
    else:
        parts.append(f"data parallelism (allreduce) stays >= 80% efficient up to "
                     f"{v['last_efficient']} devices")
    if v["fastest"] is not None and v["fastest"] < v["largest"]:
        parts.append(f"steps are fastest at {v['fastest']} devices (more make them slower)")
    if v["batch_for_largest"] is not None:
        parts.append(f"at {v['largest']} devices it pays again from a global batch of "
                     f"{v['batch_for_largest']:,}")
    return "; ".join(parts)


def write_csv(p: Plan, path: str) -> str:
    """The plan as CSV text (one row per device count and strategy), written to ``path``."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["devices", "strategy", "step_s", "compute_s", "comm_s", "wait_s",
                "samples_per_s", "efficiency", "allreduce_batch_for_80", "note"])
    for r in p.rows:
        for s, t in r.steps.items():
            if t is None:
                w.writerow([r.devices, s, "", "", "", "", "", "", r.batch_for_80 or "",
                            "cannot run"])
            else:
                w.writerow([r.devices, s, f"{t.total:.6g}", f"{t.compute:.6g}", f"{t.comm:.6g}",
                            f"{t.wait:.6g}", f"{p.batch / t.total:.6g}",
                            f"{r.efficiencies[s]:.6g}", r.batch_for_80 or "", t.note])
    text = buf.getvalue()
    with open(path, "w", newline="") as f:
        f.write(text)
    return text


# --------------------------------------------------------------------------- measurement
def measure_flops_per_s(size: int = 1024, seconds: float = 0.5, device: str = "cpu") -> float:
    """FLOP/s of a float32 ``size × size`` matrix product on ``device`` (``2 size³`` FLOPs
    each), repeated for about ``seconds`` after one warm-up."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * reps / elapsed


def fit_alpha_beta(world: int, nbytes: Sequence[float], seconds: Sequence[float]
                   ) -> tuple[float, float]:
    """``(alpha, bandwidth)`` from timed ring all-reduces of ``nbytes`` over ``world`` devices:
    the least-squares line ``t = 2(W-1) alpha + (2(W-1)/W · bytes) / B`` (an intercept and a
    slope; a negative intercept from noise is clipped to 0)."""
    if world < 2 or len(nbytes) != len(seconds) or len(nbytes) < 2:
        raise DivekitError("fit_alpha_beta needs >= 2 devices and >= 2 timed sizes")
    x = [2 * (world - 1) / world * b for b in nbytes]
    mx, my = sum(x) / len(x), sum(seconds) / len(seconds)
    sxx = sum((xi - mx) ** 2 for xi in x)
    if sxx == 0:
        raise DivekitError("fit_alpha_beta needs at least two different sizes")
    slope = sum((xi - mx) * (yi - my) for xi, yi in zip(x, seconds)) / sxx
    if slope <= 0:
        raise DivekitError("the timed all-reduces do not grow with their size; time larger ones")
    intercept = my - slope * mx
    return max(intercept, 0.0) / (2 * (world - 1)), 1.0 / slope


# ----------------------------------------------------------------------------- profiling
def _units_of(model, counts: dict[str, float], root: str):
    """The pipeline units of ``model``: Sequential and ModuleList containers are opened, as is
    a module whose children include a ModuleList of blocks (BERT's encoder: its embeddings
    become a unit of their own, then each block). Yields ``(name, module_or_None, flops)``."""
    from torch import nn

    def flops_of(name: str) -> float:
        return sum(counts.get(f"{root}.{name}" if name else root, {}).values())

    def walk(prefix: str, module: nn.Module):
        children = list(module.named_children())
        lists = [(n, c) for n, c in children if isinstance(c, nn.ModuleList) and len(c) > 1]
        if isinstance(module, nn.Sequential | nn.ModuleList) and children:
            for n, c in children:
                yield from walk(f"{prefix}.{n}" if prefix else n, c)
        elif lists:
            inner = sum(flops_of(f"{prefix}.{n}.{i}") for n, c in lists for i in range(len(c)))
            yield (f"{prefix or root}(own)", None, flops_of(prefix) - inner)
            for n, c in lists:
                yield from walk(f"{prefix}.{n}" if prefix else n, c)
        else:
            yield (prefix, module, flops_of(prefix))

    top = []
    for name, child in model.named_children():
        top.extend(walk(name, child))
    own = flops_of("") - sum(f for _, _, f in top)
    if own > 0:  # computation in the root's own forward: with the last unit (the head)
        name, module, f = top[-1]
        top[-1] = (name, module, f + own)
    return top


def _tensor_pairs(model) -> list[tuple[str, str, tuple[str, ...], int, bool]]:
    """What ``--strategy tensor`` splits in ``model``, pair by pair, from its own plan
    (:func:`~divekit.engine.tensor_parallel.tensor_parallel_plan` with one rank, which splits
    every candidate): ``(first layer, last layer, the modules whose FLOPs are split, width the
    rank count must divide, whether a width it does not divide is refused)``. An attention module
    splits by heads, so its score and weighting products are split with its projections."""
    from divekit.engine.tensor_parallel import _attention_modules, tensor_parallel_plan

    try:
        plan_ = tensor_parallel_plan(model, 1)
    except DivekitError:  # nothing to split: every layer replicated
        return []

    def join(prefix: str, leaf: str) -> str:
        return f"{prefix}.{leaf}" if prefix else leaf

    found: list[tuple[str, str, tuple[str, ...], int, bool]] = []
    taken: set[str] = set()
    for name, m in _attention_modules(model):
        # the module's own input and output: a fused path may not call W_q and W_o alone
        found.append((name, name, (name,), int(m.num_heads), True))
        taken.update(join(name, w) for w in ("W_q", "W_k", "W_v", "W_o"))
    for name, m in model.named_modules():
        first = join(name, "dense1")
        if plan_.get(first) == "colwise" and first not in taken:
            second = join(name, "dense2")
            found.append((first, second, (first, second), m.dense1.out_features, True))
            taken.update((first, second))
    modules = dict(model.named_modules())
    names = [n for n in plan_ if n not in taken]
    for col, row in zip(names[::2], names[1::2]):  # the rest: (colwise, rowwise) in order
        found.append((col, row, (col, row), modules[col].out_features, False))
    return found


def profile_model(name: str, input_shape: tuple[int, int, int] | None = None,
                  seq_len: int = 128, num_classes: int = 1000) -> ModelCost:
    """Parameters, forward FLOPs and pipeline units of zoo model ``name`` for one sample,
    traced on the meta device (no memory, no arithmetic). Image classifiers take
    ``input_shape`` (C, H, W; default the model's own); BERT models ``seq_len`` tokens."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from divekit.models import create_model, model_info

    info = model_info(name)
    if info.task == "classify" and info.input_shape is not None:
        shape = tuple(input_shape or info.input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DivekitError(f"--input-shape must be C,H,W, got {shape}")
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, in_channels=shape[0])
        x: tuple = (torch.zeros(1, *shape, device="meta"),)
        described = "x".join(map(str, shape))
    elif info.task == "bert_pretrain":
        if input_shape is not None:
            raise DivekitError(f"{name} takes tokens: give --seq-len, not --input-shape")
        with torch.device("meta"):
            model = create_model(name)
        limit = model.config.max_len
        if not 1 <= seq_len <= limit:
            raise DivekitError(f"--seq-len must be in 1..{limit} for {name}, got {seq_len}")
        x = (torch.zeros(1, seq_len, dtype=torch.long, device="meta"),)
        described = f"seq {seq_len}"
    else:
        raise DivekitError(f"dist plan knows image classifiers and BERT; {name!r} is a "
                           f"{info.task} model")
    model.eval()
    outputs: dict[str, int] = {}  # per-sample output elements of every module
    inputs: dict[str, int] = {}  # and of its first input
    hooks = []
    for mname, module in model.named_modules():
        def record(mod, args, out, mname=mname):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor):
                outputs[mname] = t.numel()
            if args and isinstance(args[0], torch.Tensor):
                inputs[mname] = args[0].numel()
        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*x)
    except RuntimeError as e:
        raise DivekitError(f"{name} cannot take input {described}: {str(e).splitlines()[0]}") \
            from None
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = float(counter.get_total_flops())

    def flops_of(names: tuple[str, ...]) -> float:
        return float(sum(sum(counts.get(f"{root}.{n}", {}).values()) for n in names))

    pairs = _tensor_pairs(model)
    units = []
    for uname, module, flops in _units_of(model, counts, root):
        if module is None:  # the own part of an opened module (embeddings): it sends what
            units.append(Unit(uname, flops, -1))  # its first block receives, filled in below
            continue
        mine = [pr for pr in pairs if pr[0] == uname or pr[0].startswith(uname + ".")]
        splits = tuple(Split(width, flops_of(counted), inputs.get(first, 0),
                             outputs.get(last, 0), required)
                       for first, last, counted, width, required in mine)
        units.append(Unit(uname, flops, outputs.get(uname, 0), splits))
    for i, u in enumerate(units):  # blocks keep their input's size (Transformer blocks)
        if u.out_elems < 0:
            later = next((v.out_elems for v in units[i + 1:] if v.out_elems >= 0), 0)
            units[i] = Unit(u.name, u.flops, later, u.splits)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return ModelCost(name, params, total, tuple(units), described, buffers)
