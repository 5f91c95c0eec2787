"""What ``--strategy fsdp`` saves: the bytes of parameters, gradients and Adam's state per rank.

One process holds the whole model ``P``, its gradient ``P`` and Adam's two moments ``2P`` (plus
a step counter per tensor). Under ``ddp`` every one of ``N`` ranks holds all of that again.
FSDP2 (``fully_shard``, divekit's :class:`~divekit.engine.fsdp.FSDPStrategy`) cuts every
parameter into ``N`` row blocks, and the gradient and the optimizer state follow the parameter,
so each rank should hold about ``P/N + P/N + 2P/N``: a ratio of ``1/N`` to one process.

What is measured: one Adam step of each model (random inputs) in one process, then on ``N``
gloo CPU processes under ``FSDPStrategy``; after the step each process adds up the storage of
its parameters, gradients and optimizer state tensors (for FSDP's DTensors, the local shard's
storage, each storage once: :func:`divekit.engine.fsdp.local_bytes`). The ratio is the largest
rank's bytes over one process's. It exceeds ``1/N`` by the padding of a first dimension that
does not split evenly (FSDP pads it to a multiple of ``N``) and by the per-tensor step
counters that every rank keeps whole; activations, and the block gathered whole for the
moment it computes, come on top and are not counted here.

    python benchmarks/fsdp_memory.py                 # lenet, resnet18, bert_small, bert_base
    python benchmarks/fsdp_memory.py --smoke         # lenet and a narrow bert_small (seconds)
    python benchmarks/fsdp_memory.py --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from divekit.engine.distributed import DistEnv
from divekit.engine.fsdp import FSDPStrategy, local_bytes
from divekit.engine.launch import spawn_local
from divekit.models.registry import create_model, model_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, add_markdown_arg  # noqa: E402

FULL = {"lenet": {}, "resnet18": {}, "bert_small": {}, "bert_base": {}}
SMOKE = {"lenet": {}, "bert_small": {"vocab_size": 1000, "num_hiddens": 32,
                                     "ffn_num_hiddens": 64}}
PARTS = ("params", "grads", "optimizer")


def _build(name: str, options: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **options)


def _loss(name: str, model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A loss of the model on random inputs (classes for an image model, tokens for BERT)."""
    g = torch.Generator().manual_seed(1)
    shape = model_info(name).input_shape
    if shape is not None:
        x = torch.randn(batch, *shape, generator=g)
        return F.cross_entropy(model(x), torch.randint(0, 10, (batch,), generator=g))
    vocab = model.encoder.token_embedding.num_embeddings  # type: ignore[union-attr]
    tokens = torch.randint(0, vocab, (batch, 16), generator=g)
    positions = torch.randint(0, 16, (batch, 3), generator=g)
    _, mlm, nsp = model(tokens, None, None, positions)
    return (F.cross_entropy(mlm.reshape(-1, vocab), torch.randint(0, vocab, (batch * 3,), generator=g))
            + F.cross_entropy(nsp, torch.randint(0, 2, (batch,), generator=g)))


def _adam_step(name: str, model: nn.Module) -> dict[str, int]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # foreach: DTensors too
    _loss(name, model).backward()
    optimizer.step()
    return local_bytes(model, optimizer)


def _worker(rank: int, models: dict[str, dict[str, Any]], nproc: int, out: str) -> None:
    held = {}
    for name, options in models.items():
        model = _build(name, options)
        FSDPStrategy(model, DistEnv(rank, nproc, rank))
        held[name] = _adam_step(name, model)
    Path(out, f"rank{rank}.json").write_text(json.dumps(held))


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="two small models: checks that it runs")
    p.add_argument("--nproc", type=int, default=2, help="FSDP ranks (gloo CPU processes)")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.nproc < 2:
        p.error("--nproc must be at least 2")
    models = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)
    whole = {name: _adam_step(name, _build(name, opts)) for name, opts in models.items()}
    with tempfile.TemporaryDirectory() as out:
        spawn_local(_worker, args.nproc, models, args.nproc, out)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.nproc)]

    headers = ["model", "parameters", "1 process MB", f"fsdp rank MB (max of {args.nproc})",
               "params ratio", "grads ratio", "Adam state ratio", "total ratio"]
    rows = []
    for name in models:
        one = whole[name]
        worst = max(ranks, key=lambda r: sum(r[name].values()))[name]
        count = sum(p.numel() for p in _build(name, models[name]).parameters())
        ratios = [worst[k] / one[k] for k in PARTS]
        total = sum(worst.values()) / sum(one.values())
        rows.append([name, f"{count:,}", _mb(sum(one.values())), _mb(sum(worst.values())),
                     *(f"{r:.3f}" for r in ratios), f"{total:.3f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"1/N = {1 / args.nproc:.3f}: each rank holds its shard of every parameter, gradient "
          "and Adam moment; padding and Adam's per-tensor step counters are the excess")

    report = Report(f"FSDP memory per rank: parameters, gradients and Adam state on "
                    f"{args.nproc} ranks against one process", threads=1)
    report.table(headers, rows)
    report.text(f"Bytes held after one Adam step (local shards' storage, each once), the "
                f"largest of {args.nproc} gloo CPU ranks over one process; 1/N = "
                f"{1 / args.nproc:.3f}. Activations and the block gathered whole while it "
                "computes are not counted.")
    report.write(args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
