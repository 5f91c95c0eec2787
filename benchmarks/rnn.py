"""Training throughput of the recurrent language models: tokens per second.

One training step is the course's: one-hot inputs ``(B, T)`` → recurrent network → linear
output → cross-entropy over all ``B·T`` positions → backward → global-norm clipping (θ = 1) →
SGD. Every implementation gets the same random token batches, sizes, thread count and step
function; only the model differs:

* divekit: ``rnn_scratch``, ``gru_scratch``, ``lstm_scratch`` (the course's equations with a
  hand-written backpropagation through time, ``divekit.models.rnn_fused``: input projection of
  all steps in one matmul, one fused hidden matmul per step, in-place gate math, the weight
  gradient in one matmul) and the concise ``rnn``, ``gru``, ``lstm``
  (``nn.RNN``/``nn.GRU``/``nn.LSTM``);
* the d2l package 1.0.3: ``RNNLMScratch(RNNScratch)`` (its from-scratch RNN), and
  ``RNNLM(RNN)`` / ``RNNLM(GRU)`` (its concise ones). d2l 1.0.3 ships no GRU or LSTM written from
  scratch and no LSTM class, so those rows have no d2l peer.

The hidden state starts at zero every batch (random sampling), as in d2l 1.0's ``RNNLM``.
Rounds alternate between implementations (in a rotating order); the median round is reported,
and each ratio as the median and min-max of the per-round ratios. Goals (issue 26), met only when
the whole spread clears them: ``rnn_scratch`` >= 1.2x d2l's scratch RNN, ``gru_scratch`` and
``lstm_scratch`` >= 0.9x ``nn.GRU``/``nn.LSTM`` (a goal not met adds both sides' top operators
to the ``--markdown`` section).

    python benchmarks/rnn.py                       # B=32, T=35, V=28, H=256, 2 threads
    python benchmarks/rnn.py --hidden 512 --steps 10 --rounds 5
    python benchmarks/rnn.py --smoke               # B=4, T=8, H=32, 2 steps: checks that it runs

Without the d2l package its rows are skipped (said in the output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import (
    COMPILE_GOAL,
    COMPILE_HEADERS,
    MEMORY_HEADERS,
    SUMMARY_NOTE,
    Report,
    add_markdown_arg,
    add_memory_args,
    compiled_vs_eager,
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
from torch import Tensor, nn

Model = Callable[[Tensor], Tensor]  # token ids (B, T) -> logits (B, T, V)


def divekit_models(vocab: int, hidden: int) -> dict[str, nn.Module]:
    from divekit.models import create_model

    names = ["rnn_scratch", "rnn", "gru_scratch", "gru", "lstm_scratch", "lstm"]
    return {f"divekit {n}": create_model(n, vocab_size=vocab, num_hiddens=hidden) for n in names}


def d2l_models(vocab: int, hidden: int, batch: Tensor) -> dict[str, nn.Module]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import d2l.torch as d2l
    except ImportError:
        print("d2l is not installed: its rows are skipped (pip install --no-deps d2l==1.0.3 && "
              "pip install requests ipython matplotlib-inline pandas)")
        return {}
    models = {
        "d2l RNNLMScratch(RNNScratch)": d2l.RNNLMScratch(d2l.RNNScratch(vocab, hidden), vocab),
        "d2l RNNLM(RNN)": d2l.RNNLM(d2l.RNN(vocab, hidden), vocab),
        "d2l RNNLM(GRU)": d2l.RNNLM(d2l.GRU(vocab, hidden, 1), vocab),
    }
    with torch.no_grad():
        for model in models.values():
            model(batch)  # materialise LazyLinear before the optimizer sees the parameters
    return models


def logits_of(model: nn.Module, X: Tensor) -> Tensor:
    out = model(X)
    return out[0] if isinstance(out, tuple) else out  # divekit returns (logits, state)


def train_steps(model: nn.Module, batches: list[tuple[Tensor, Tensor]], lr: float = 1.0) -> float:
    """Seconds for one SGD step per batch (forward, loss, backward, clip, update)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start = time.perf_counter()
    for X, Y in batches:
        logits = logits_of(model, X)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - start


PEERS = {  # divekit model -> the d2l implementation of the same network
    "divekit rnn_scratch": "d2l RNNLMScratch(RNNScratch)",
    "divekit rnn": "d2l RNNLM(RNN)",
    "divekit gru": "d2l RNNLM(GRU)",
}
GOALS = {  # issue 26: (divekit model, what it is compared with) -> the same-run goal
    ("divekit rnn_scratch", "d2l RNNLMScratch(RNNScratch)"): 1.2,
    ("divekit gru_scratch", "divekit gru"): 0.9,
    ("divekit lstm_scratch", "divekit lstm"): 0.9,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=35)
    p.add_argument("--vocab", type=int, default=28, help="the course's character vocabulary")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="training steps per round")
    p.add_argument("--rounds", "--repeats", type=int, default=5,
                   help="interleaved rounds (every implementation once per round, the order "
                        "rotating); medians and the min-max of per-round ratios are reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true",
                   help="B=4, T=8, H=32, 2 steps, 1 round, 1 thread: checks that it runs (seconds)")
    add_markdown_arg(p)
    add_memory_args(p)
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="the scratch networks eager vs --compile (compile time apart); skipped "
                        "by --smoke (compiling takes minutes)")
    args = p.parse_args()
    if args.smoke:
        args.batch_size, args.num_steps, args.hidden, args.steps, args.rounds = 4, 8, 32, 2, 1
        args.threads = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch_size, args.num_steps + 1)
    seqs = [torch.randint(1, args.vocab, shape) for _ in range(args.steps)]
    batches = [(s[:, :-1], s[:, 1:]) for s in seqs]
    if args.memory_of:  # memory_table's fresh process: this model alone
        one = memory_model(args.memory_of, args, batches[0][0])
        print_peak_rss(lambda: train_steps(one, batches))
        return
    models = {**divekit_models(args.vocab, args.hidden), **d2l_models(args.vocab, args.hidden, batches[0][0])}
    for model in models.values():
        train_steps(model, batches[:2])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(args.rounds):  # rotate the order so no implementation always runs last
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(train_steps(models[name], batches))
    tokens = args.steps * args.batch_size * args.num_steps
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}

    def versus(name: str, other: str | None):  # per-round ratio of times: other's / name's
        return paired_ratio(times[other], times[name]) if other in times else None

    print(f"training tokens/s, B={args.batch_size} T={args.num_steps} V={args.vocab} H={args.hidden}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps "
          f"(torch {torch.__version__})")
    print(f"{'implementation':<30} {'tokens/s':>10}  {'vs d2l':>7}  {'vs concise':>10}")
    rows = []
    for name, r in rate.items():
        concise = name.replace("_scratch", "") if name.endswith("_scratch") else None
        d2l_ratio, concise_ratio = versus(name, PEERS.get(name)), versus(name, concise)
        vs_d2l = f"{d2l_ratio.median:.2f}x" if d2l_ratio else "-"
        vs_concise = f"{concise_ratio.median:.2f}x" if concise_ratio else "-"
        print(f"{name:<30} {r:>10,.0f}  {vs_d2l:>7}  {vs_concise:>10}")
        rows.append([name, f"{r:,.0f}", d2l_ratio.md() if d2l_ratio else "—",
                     concise_ratio.md() if concise_ratio else "—"])
    goal_rows, profiles = [], []
    for (name, other), goal in GOALS.items():
        ratio = versus(name, other)
        if ratio is None:
            print(f"goal {name} / {other} >= {goal}x: {other} not measured (d2l is not installed)")
            goal_rows.append([name, other, "—", goal_cell(goal), "peer not installed"])
            continue
        print(f"goal {name} / {other} >= {goal}x: {ratio} {verdict(ratio, goal)}")
        goal_rows.append([name, other, ratio.md(), goal_cell(goal), verdict(ratio, goal)])
        # where the time goes, both sides (a smoke profiles one goal: it checks the path)
        if verdict(ratio, goal) != "met" and not (args.smoke and profiles):
            profiles.append((name, other, verdict(ratio, goal), profile_table(
                {k: lambda k=k: train_steps(models[k], batches[:2]) for k in (name, other)})))
    report = Report("Recurrent language models", threads=args.threads)
    report.table(["implementation", "tokens/s", "vs d2l (min–max)", "vs concise (min–max)"],
                 rows,
                 caption=f"Training tokens/s, batch {args.batch_size}, sequence length "
                         f"{args.num_steps}, vocabulary {args.vocab}, {args.hidden} hidden "
                         f"units, {args.threads} "
                         f"thread(s); median of {args.rounds} interleaved rounds of {args.steps} "
                         "SGD steps (the order rotating each round); ratios: median and min–max "
                         "of the per-round ratios.")
    report.table(["divekit", "against", "ratio (min–max)", "goal", "verdict"], goal_rows,
                 align="llrll")
    for name, other, outcome, (headers, rows_) in profiles:
        report.table(headers, rows_, align="lll",
                     caption=f"{outcome.capitalize()}: {name} against {other}, the top "
                             "operators by self CPU time over 2 training steps of each "
                             f"(torch.profiler). {SUMMARY_NOTE}")
    if args.compile == "on" and not args.smoke:
        compile_table(args, report, batches)
    if not args.no_memory:
        memory_table(args, report, list(models))
    report.write(args.markdown)


COMPILED = ("divekit rnn_scratch", "divekit gru_scratch", "divekit lstm_scratch")


def compile_table(args: argparse.Namespace, report: Report,
                  batches: list[tuple[Tensor, Tensor]]) -> None:
    """The scratch networks eager and through torch.compile (``--compile``; the model compiled
    in place), interleaved rounds, the compile time apart (:func:`compiled_vs_eager`)."""
    from divekit.engine.compile import compile_model
    from divekit.models import create_model

    def build(name: str, compiled: bool):
        torch.manual_seed(0)
        model = create_model(name.removeprefix("divekit "), vocab_size=args.vocab,
                             num_hiddens=args.hidden)
        if compiled:
            compile_model(model)
        return lambda: train_steps(model, batches[:1])

    rows = []
    tokens = args.batch_size * args.num_steps
    for name in COMPILED:
        result = compiled_vs_eager(lambda c, name=name: build(name, c), min(args.rounds, 3),
                                   args.steps)
        print(f"--compile {name}: {result}")
        rows.append(result.cells(name, lambda sec: f"{tokens / sec:,.0f} tokens/s"))
    report.table(COMPILE_HEADERS, rows, align="lrrrrrl",
                 caption="`--compile`: divekit's scratch networks eager and through "
                         f"torch.compile, {min(args.rounds, 3)} interleaved rounds (each builds "
                         f"both afresh, in-process caches cleared), {args.steps} SGD steps after "
                         "the first; the compile time apart (first run: Inductor's disk cache "
                         f"empty; later runs: warm). A family whose median reaches "
                         f"{COMPILE_GOAL}× gets --compile by default.")


def memory_model(name: str, args: argparse.Namespace, batch: Tensor) -> nn.Module:
    """``name``'s model alone (a d2l one: built with its two siblings, a few hundred kB, which
    d2l_models materialises together)."""
    if name.startswith("divekit "):
        from divekit.models import create_model

        return create_model(name.removeprefix("divekit "), vocab_size=args.vocab,
                            num_hiddens=args.hidden)
    return d2l_models(args.vocab, args.hidden, batch)[name]


def memory_table(args: argparse.Namespace, report: Report, names: list[str]) -> None:
    """Peak RSS of each implementation training ``--steps`` steps alone in a fresh process
    (``--memory-of NAME``); divekit ≤ d2l where d2l has the same network (issue 26 item 6)."""
    argv = forwarded_argv()
    mem = sides_peak_rss(__file__, [name for name in names if not args.smoke or name in
                                    ("divekit rnn_scratch", PEERS["divekit rnn_scratch"])], argv,
                         runs=memory_runs(args))
    rows = []
    for name, cells in mem.items():
        peer = PEERS.get(name)
        goal = memory_verdict(cells, mem[peer]) if peer in mem else "—"
        if peer in mem:
            print(f"peak RSS {name}: {cells[0]:,.0f} MB, {peer} {mem[peer][0]:,.0f} MB (goal "
                  f"divekit <= d2l: {goal})")
        rows.append([name, *memory_cells(cells), goal])
    report.table(["implementation", *MEMORY_HEADERS[1:], "divekit ≤ d2l"], rows,
                 align="lrrrl",
                 caption=f"Peak resident memory: each implementation alone in a fresh process, "
                         f"{args.steps} training steps (`VmHWM`; \"of which the call\": above the "
                         "RSS once the model and batches are built). Goal: divekit ≤ d2l. "
                         f"{memory_note(memory_runs(args))}")


if __name__ == "__main__":
    main()
