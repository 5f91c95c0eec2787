"""Complexity, measured: a 1-D convolution, a GRU and self-attention over sequence length n.

The course's table (d2l 11.6.2) compares the three ways to map a sequence of n tokens of d
features to another:

    layer            computation   sequential ops   max path length
    CNN (kernel k)   O(k n d²)     O(1)             O(n / k)
    RNN              O(n d²)       O(n)             O(n)
    self-attention   O(n² d)       O(1)             O(1)

This script times a forward and backward pass of each at d = 256 (a ``Conv1d`` with k = 3 and
padding 1, one ``nn.GRU`` layer, divekit's ``MultiHeadAttention`` with 4 heads as
self-attention) on one sequence of n = 64 … 4,096 tokens, fits the slope of log time against
log n (over n ≥ 256, where fixed overheads no longer dominate), draws ``docs/complexity.png``,
and says where self-attention's n² d term overtakes its n d² term: it times the two parts
apart, the four projections ``W_q, W_k, W_v, W_o`` (4 n d² multiply-adds) and the attention
proper, ``softmax(Q Kᵀ / √(d/h)) V`` over the heads (2 n² d), and finds the n where the second
becomes the larger (counting multiply-adds: 4 n d² = 2 n² d at n = 2d = 512).

    python benchmarks/complexity.py
    python benchmarks/complexity.py --max-n 1024 --out /tmp/complexity.png
    python benchmarks/complexity.py --smoke      # d = 32, n <= 512: checks that it runs (seconds)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import Report, add_markdown_arg
from torch import nn

from divekit.models.attention import MultiHeadAttention

ROOT = Path(__file__).resolve().parents[1]
TABLE = [("CNN (k=3)", "O(knd²)", "O(1)", "O(n/k)", 1), ("RNN (GRU)", "O(nd²)", "O(n)", "O(n)", 1),
         ("self-attention", "O(n²d)", "O(1)", "O(1)", 2)]


def fwd_bwd_time(layer, x, repeats):
    best = float("inf")
    for _ in range(repeats):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        t = time.perf_counter()
        layer(x).sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


class Conv(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv = nn.Conv1d(d, d, 3, padding=1)

    def forward(self, x):  # (1, n, d)
        return self.conv(x.transpose(1, 2))


class GRU(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.rnn = nn.GRU(d, d, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mha = MultiHeadAttention(d, 4, query_size=d, key_size=d, value_size=d)

    def forward(self, x):
        return self.mha(x, x, x)


class Projections(nn.Module):
    """Self-attention's n d² part: the four projections of a :class:`MultiHeadAttention`."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        m = self.mha
        return m.W_o(m.W_q(x) + m.W_k(x) + m.W_v(x))


class AttentionCore(nn.Module):
    """Self-attention's n² d part: scaled dot-product attention of 4 heads over Q = K = V."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        q = self.mha.transpose_qkv(x)  # (1, heads, n, d / heads)
        return self.mha.attention(q, q, q)


def crossover(ns, low, high):
    """The n (log-interpolated) where ``high`` first exceeds ``low``; None if it never does."""
    for i in range(1, len(ns)):
        a0, a1 = np.log(high[i - 1] / low[i - 1]), np.log(high[i] / low[i])
        if a0 <= 0 < a1:
            f = -a0 / (a1 - a0)
            return float(np.exp(np.log(ns[i - 1]) + f * (np.log(ns[i]) - np.log(ns[i - 1]))))
    return float(ns[0]) if high[0] > low[0] else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--max-n", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="the figure (default: docs/complexity.png)")
    p.add_argument("--smoke", action="store_true",
                   help="d = 32, n up to 512, 1 repeat, the figure in a temporary folder: checks "
                        "that it runs (seconds)")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:
        args.d, args.max_n, args.repeats = 32, 512, 1
    with tempfile.TemporaryDirectory(prefix="dk-bench-") as tmp:
        if args.out is None:
            folder = Path(tmp) if args.smoke else ROOT / "docs"
            args.out = str(folder / "complexity.png")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.d
    ns = [n for n in (64, 128, 256, 512, 1024, 2048, 4096) if n <= args.max_n]
    attention = SelfAttention(d)
    layers = {"CNN (k=3)": Conv(d), "RNN (GRU)": GRU(d), "self-attention": attention,
              "  projections": Projections(attention.mha), "  attention core": AttentionCore(attention.mha)}
    times: dict[str, list[float]] = {name: [] for name in layers}
    print(f"{'n':>6} " + " ".join(f"{name:>16}" for name in layers) + "   (ms, forward + backward)")
    for n in ns:
        x = torch.randn(1, n, d, requires_grad=True)
        for name, layer in layers.items():
            times[name].append(fwd_bwd_time(layer, x, args.repeats))
        print(f"{n:>6} " + " ".join(f"{times[k][-1] * 1e3:>16.2f}" for k in layers), flush=True)

    big = [i for i, n in enumerate(ns) if n >= 256]
    slopes = {k: float(np.polyfit(np.log([ns[i] for i in big]), np.log([t[i] for i in big]), 1)[0])
              for k, t in times.items()}
    print(f"\n{'layer':<16} {'computation':<12} {'sequential':<11} {'max path':<9} "
          f"{'expected slope':>14} {'measured slope':>15}")
    for name, comp, seq, path, expected in TABLE:  # the parts' slopes are on the figure
        print(f"{name:<16} {comp:<12} {seq:<11} {path:<9} {expected:>14} {slopes[name]:>15.2f}")

    cross = crossover(ns, times["  projections"], times["  attention core"])
    where = f"n ≈ {cross:.0f}" if cross is not None else f"no n up to {ns[-1]}"
    print(f"\nself-attention's n² d part (the attention core) overtakes its n d² part (the "
          f"projections) at {where} on this machine (multiply-add count: n = 2d = {2 * d})")

    from matplotlib.figure import Figure

    from divekit.viz import save_figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for name, t in times.items():
        style = "o-" if not name.startswith(" ") else ".:"
        ax.loglog(ns, np.array(t) * 1e3, style, label=f"{name.strip()} (slope {slopes[name]:.2f})")
    if cross is not None:
        ax.axvline(cross, color="gray", linestyle="--",
                   label=f"attention: n² d part = n d² part at n≈{cross:.0f}")
    ax.set(xlabel="sequence length n", ylabel="forward + backward (ms)",
           title=f"d = {d}, one sequence, {args.threads} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = save_figure(fig, args.out)
    print(f"wrote {written}")
    report = Report("Complexity: CNN, RNN, self-attention", threads=args.threads)
    report.table(["n", *(f"{name.strip()} (ms)" for name in layers)],
                 [[f"{n:,}", *(f"{times[k][i] * 1e3:.3g}" for k in layers)]
                  for i, n in enumerate(ns)], align="r" * (len(layers) + 1),
                 caption=f"Forward + backward at d = {d}, one sequence, {args.threads} "
                         f"thread(s), the best of {args.repeats} (\"projections\" and "
                         "\"attention core\" are self-attention's two parts).")
    report.table(["layer", "computation", "sequential ops", "max path length", "expected slope",
                  "measured slope (n ≥ 256)"],
                 [[name, comp, seq, path, expected, f"{slopes[name]:.2f}"]
                  for name, comp, seq, path, expected in TABLE], align="llllrr")
    report.text(f"Self-attention's n² d part (its attention core) overtakes its n d² part (the "
                f"projections) at {where} on this machine (multiply-add count: n = 2d = "
                f"{2 * d}). Figure: `{Path(written).name}`"
                + ("" if args.smoke else " (`docs/complexity.png` by default)") + ".")
    report.write(args.markdown)


if __name__ == "__main__":
    main()
