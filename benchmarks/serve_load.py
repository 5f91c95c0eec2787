"""``divekit serve`` under load: latency and throughput with and without dynamic batching.

A classifier (ResNet-18 of the zoo on the embedded digits at 32x32, trained one short epoch so
its answers are a real model's) is served twice by the ``divekit serve`` command, in two
processes on 127.0.0.1: with ``--max-batch 32 --max-wait-ms 5`` and with ``--max-batch 1``
(each request its own forward pass). ``--clients`` threads send ``--requests`` single-image
requests (multipart PNG) as fast as the replies come back; every reply is checked against
``divekit predict RUN`` on the same file, and every request must be answered. Rounds alternate
the two servers so a busy machine slows both alike; the table gives the medians over rounds of
each round's p50 and p99 latency and its throughput, the mean items per forward pass, and how
much the server's resident memory grew over the timed rounds (after one warm-up round).

    python benchmarks/serve_load.py                  # 200 requests, 20 clients, 3 rounds
    python benchmarks/serve_load.py --smoke          # lenet_bn, 40 requests, 8 clients, 1 round
    python benchmarks/serve_load.py --markdown serve_load.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import Report, add_markdown_arg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from divekit.engine.run import predict as run_predict  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, name: str, data: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"'
            f"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/predict", data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``divekit serve RUN`` in a subprocess, waited for until ``/health`` answers."""

    def __init__(self, run: Path, *options: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "divekit", "serve", str(run), "--port", str(self.port),
             *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"divekit serve failed: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if _get(self.url + "/health")["status"] == "ok":
                    return
            if time.monotonic() > deadline:
                raise SystemExit("divekit serve did not start in 120 s")
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def load_round(url: str, files: list[tuple[str, bytes]], expected: dict[str, str],
               requests: int, clients: int) -> tuple[list[float], float]:
    """Per-request latencies (s) and the round's wall time; every reply checked."""
    def one(i: int) -> float:
        name, data = files[i % len(files)]
        t = time.perf_counter()
        reply = _post(url, name, data)["predictions"][0]
        took = time.perf_counter() - t
        if reply["image"] != name or reply["predictions"][0]["class"] != expected[name]:
            raise SystemExit(f"wrong answer for {name}: {reply}")
        return took

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    if len(latencies) != requests:
        raise SystemExit(f"{requests - len(latencies)} requests lost")
    return latencies, wall


def make_run(root: Path, model: str, side: int) -> Path:
    from divekit.tasks import train
    from divekit.tasks.classify import ClassifyConfig

    out = root / f"{model}-digits"
    train(ClassifyConfig(model=model, data="digits", epochs=1, limit=400, batch_size=32,
                         lr=0.05, resize=side, quiet=True, device="cpu", out=str(out)))
    return out


def digit_pngs(root: Path, n: int = 16) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    paths = []
    for i in range(n):
        paths.append(root / f"digit-{i}-{d.target[i]}.png")
        Image.fromarray((d.images[i] / 16 * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--side", type=int, default=32, help="the run's image side (--resize)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="lenet_bn, 40 requests, 8 clients")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:
        args.model, args.side, args.requests, args.clients, args.rounds = "lenet_bn", 28, 40, 8, 1
    torch.set_num_threads(1)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

    with tempfile.TemporaryDirectory(prefix="divekit-serve-load-") as tmp:
        root = Path(tmp)
        run = make_run(root, args.model, args.side)
        paths = digit_pngs(root)
        expected = {q.name: r["predictions"][0][0] for q, r in
                    zip(paths, run_predict(run, [str(q) for q in paths], device="cpu"))}
        files = [(q.name, q.read_bytes()) for q in paths]
        modes = {"dynamic batching (32, 5 ms)": ("--max-batch", "32", "--max-wait-ms", "5"),
                 "no batching (--max-batch 1)": ("--max-batch", "1")}
        servers = {name: Server(run, *opts) for name, opts in modes.items()}
        try:
            for s in servers.values():  # warm-up: allocators, thread pools, first batches
                load_round(s.url, files, expected, args.requests, args.clients)
            rss0 = {name: _rss_mb(s.proc.pid) for name, s in servers.items()}
            results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in servers}
            for _ in range(args.rounds):
                for name, s in servers.items():
                    lat, wall = load_round(s.url, files, expected, args.requests, args.clients)
                    p50, p99 = np.percentile(lat, [50, 99]) * 1000
                    results[name].append((float(p50), float(p99), args.requests / wall))
            rows = []
            for name, s in servers.items():
                info = _get(s.url + "/info")["batching"]
                rounds = results[name]
                rows.append([name, f"{statistics.median(r[0] for r in rounds):.1f}",
                             f"{statistics.median(r[1] for r in rounds):.1f}",
                             f"{statistics.median(r[2] for r in rounds):.0f}",
                             f"{info['items'] / info['batches']:.1f}",
                             f"{_rss_mb(s.proc.pid) - rss0[name]:+.1f}"])
        finally:
            for s in servers.values():
                s.close()

    headers = ["server", "p50 ms", "p99 ms", "requests/s", "items/pass", "RSS growth MB"]
    what = (f"{args.model} at 1x{args.side}x{args.side}, {args.requests} requests from "
            f"{args.clients} clients a round, {args.rounds} round(s), every reply checked")
    print(what)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    report = Report("Serving under load: dynamic batching on and off", threads=threads)
    report.table(headers, rows, caption=what + ".")
    report.text("Both servers run on the same machine as the clients (127.0.0.1), one "
                "intra-op thread each; the figures are medians over rounds and move with "
                "whatever else the machine is doing.")
    report.write(args.markdown)


if __name__ == "__main__":
    main()
