"""``divekit serve``: a run behind HTTP answers what ``divekit predict RUN`` answers.

Every reply is compared with the run's own ``predict`` (the command line's path, no server,
no batching) on the same files and texts. Servers run for real on 127.0.0.1 (uvicorn in a
thread, or the ``divekit serve`` command in a subprocess for the load test), and the tests talk
to them with ``urllib`` over TCP.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from divekit.engine.run import predict as run_predict  # noqa: E402
from divekit.errors import DivekitError  # noqa: E402
from divekit.serve import Batcher, ServedRun, build_app  # noqa: E402

TOL = 1e-6


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, device: str = "cpu", **options: Any) -> Iterator[str]:
    """uvicorn serving ``run`` in a thread of this process; yields the base URL."""
    import uvicorn

    app = build_app(ServedRun(run, device), **options)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def request(url: str, body: bytes | None = None, ctype: str | None = None,
            method: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body else "GET"))
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status, kind = r.read(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        raw, status, kind = e.read(), e.code, e.headers.get("content-type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None
              ) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def post_images(url: str, files: list[tuple[str, bytes]], **fields: str) -> tuple[int, Any]:
    body, ctype = multipart(files, {k: str(v) for k, v in fields.items()})
    return request(url + "/predict", body, ctype)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> list[Path]:
    """Eight of the embedded digits as 8x8 grayscale PNG files, one per class 0..7."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digits")
    paths = []
    for c in range(8):
        i = int(np.flatnonzero(d.target == c)[5])
        img = (d.images[i] / 16 * 255).round().astype(np.uint8)
        paths.append(root / f"digit{c}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def _same_topk(reply: dict[str, Any], expected: dict[str, Any]) -> None:
    got = [(p["class"], p["probability"]) for p in reply["predictions"]]
    assert [c for c, _ in got] == [c for c, _ in expected["predictions"]]
    assert np.allclose([p for _, p in got], [p for _, p in expected["predictions"]], atol=TOL)


# ----------------------------------------------------------------------------- images
def test_images_get_what_predict_run_gives_and_info_page_health(trained_lenet_run, digit_files):
    expected = run_predict(trained_lenet_run, [str(p) for p in digit_files], device="cpu",
                           top_k=3)
    with serving(trained_lenet_run) as url:
        status, reply = post_images(url, [(p.name, p.read_bytes()) for p in digit_files])
        assert status == 200, reply
        assert len(reply["predictions"]) == len(digit_files)
        for r, e, p in zip(reply["predictions"], expected, digit_files):
            assert r["image"] == p.name
            _same_topk(r, e)
        status, five = post_images(url, [(digit_files[0].name, digit_files[0].read_bytes())],
                                   top_k="5")
        assert status == 200 and len(five["predictions"][0]["predictions"]) == 5

        assert request(url + "/health") == (200, {"status": "ok"})
        status, info = request(url + "/info")
        assert status == 200 and info["task"] == "classify" and info["model"] == "lenet_bn"
        assert info["classes"] == [str(i) for i in range(10)]
        assert 0 <= info["metrics"]["val_acc"] <= 1 and info["input"] == "image"
        status, page = request(url + "/")
        assert status == 200 and "<!doctype html>" in page and "lenet_bn" in page
        assert 'fetch("predict"' in page


def test_bad_requests_get_one_line_4xx_and_the_server_answers_on(trained_lenet_run,
                                                                  digit_files, tmp_path):
    good = [(digit_files[3].name, digit_files[3].read_bytes())]
    with serving(trained_lenet_run, max_body=64 * 1024) as url:
        cases = [
            (post_images(url, [("notes.png", b"this is not an image")]), 400, "not an image"),
            (post_images(url, [("empty.png", b"")]), 400, "empty"),
            (post_images(url, good + [("bad.jpg", b"\xff\xd8\xff garbage")]), 400, "bad.jpg"),
            (request(url + "/predict", json.dumps({"text": "hi"}).encode(),
                     "application/json"), 415, "multipart/form-data"),
            (request(url + "/predict", b"x", "text/plain"), 415, "text/plain"),
            (post_images(url, [], note="no file"), 400, "field 'file'"),
            (post_images(url, good, top_k="0"), 400, "top_k"),
            (post_images(url, [("big.png", os.urandom(200 * 1024))]), 413, "over the limit"),
            (request(url + "/nowhere"), 404, "Not Found"),
            (request(url + "/predict", method="GET"), 405, "Method Not Allowed"),
        ]
        for (status, reply), code, words in cases:
            assert status == code, (code, reply)
            assert isinstance(reply, dict) and "\n" not in reply["error"], reply
            assert words in reply["error"], (words, reply)

        # a chunked body (no Content-Length) is counted while it streams in
        body, ctype = multipart([("big.png", os.urandom(200 * 1024))])
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", ctype)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        with contextlib.suppress(OSError):  # the server may close before the last chunk
            for i in range(0, len(body), 16 * 1024):
                chunk = body[i : i + 16 * 1024]
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        r = conn.getresponse()
        assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]
        conn.close()

        status, reply = post_images(url, good)  # still answering, correctly
        assert status == 200
        _same_topk(reply["predictions"][0],
                   run_predict(trained_lenet_run, [str(digit_files[3])], device="cpu")[0])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _load(url: str, files: list[tuple[str, bytes]], expected: dict[str, list[str]],
          n: int = 200, clients: int = 20) -> list[float]:
    """``n`` requests from ``clients`` threads; every reply checked; latencies in seconds."""
    def one(i: int) -> float:
        name, data = files[i % len(files)]
        t = time.perf_counter()
        status, reply = post_images(url, [(name, data)])
        took = time.perf_counter() - t
        assert status == 200, reply
        got = reply["predictions"][0]
        assert got["image"] == name and [p["class"] for p in got["predictions"]] == expected[name]
        return took

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc for memory")
@pytest.mark.parametrize("max_batch", [32, 1], ids=["batched", "unbatched"])
def test_200_requests_from_20_clients_all_answered_memory_flat(trained_lenet_run, digit_files,
                                                                max_batch):
    files = [(p.name, p.read_bytes()) for p in digit_files]
    expected = {p.name: [c for c, _ in e["predictions"]] for p, e in zip(
        digit_files, run_predict(trained_lenet_run, [str(p) for p in digit_files],
                                 device="cpu"))}
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "divekit", "serve", str(trained_lenet_run),
                             "--port", str(port), "--max-batch", str(max_batch),
                             "--max-wait-ms", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            with contextlib.suppress(OSError):
                if request(url + "/health")[0] == 200:
                    break
            assert time.monotonic() < deadline, "divekit serve did not start"
            time.sleep(0.1)
        _load(url, files, expected)  # warm-up: allocator pools, thread pools
        before = _rss_kib(proc.pid)
        latencies = _load(url, files, expected)
        latencies += _load(url, files, expected)
        grown = _rss_kib(proc.pid) - before
        assert len(latencies) == 400
        assert grown < 30 * 1024, f"the server grew by {grown} KiB over 400 requests"
        info = request(url + "/info")[1]["batching"]
        assert info["items"] == 600  # none lost, none answered twice
        if max_batch == 1:
            assert info["batches"] == 600
        else:
            assert info["batches"] < 600  # concurrent requests were answered together
        p50, p99 = np.percentile(latencies, [50, 99]) * 1000
        print(f"\nmax_batch={max_batch}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"{info['items'] / info['batches']:.1f} items/batch, RSS +{grown} KiB")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_segmentation_replies_hold_the_class_map_and_its_colour_overlay(tmp_path):
    """An FCN run with random weights: the served class map and shares equal predict RUN's,
    and the overlay PNG is the class map painted with the run's colour map."""
    import base64
    import dataclasses

    import torch
    from PIL import Image

    from divekit.engine.checkpoint import CheckpointDir
    from divekit.tasks.segment import SegmentationTask, SegmentConfig

    config = SegmentConfig(model="fcn_resnet18", data="shapes-seg", image_size=32, quiet=True)
    facts = {"classes": ["background", "disc", "square"],
             "colormap": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop": None}
    torch.manual_seed(0)
    net = SegmentationTask(config, record=facts).build_model().eval()
    run = tmp_path / "fcn"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "task": "segment", "divekit_version": "test", "command": "",
        "config": dataclasses.asdict(config), **facts}))
    CheckpointDir(run).save(net, {}, "epoch-0001")
    picture = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(picture)
    expected = run_predict(run, [str(picture)], device="cpu")[0]
    with serving(run) as url:
        status, reply = post_images(url, [("scene.png", picture.read_bytes())])
        info = request(url + "/info")[1]
    assert status == 200, reply
    got = reply["predictions"][0]
    label_map = np.array(got["label_map"])
    assert np.array_equal(label_map, expected["label_map"].numpy())
    assert got["fractions"] == pytest.approx(expected["fractions"])
    overlay = np.array(Image.open(io.BytesIO(base64.b64decode(got["overlay_png"]))))
    assert np.array_equal(overlay, np.array(facts["colormap"], dtype=np.uint8)[label_map])
    assert info["task"] == "segment" and info["classes"] == facts["classes"]


def test_detections_equal_predict_runs(tmp_path):
    """A tiny SSD trained one epoch on generated shapes: boxes, classes and scores of the
    served run are predict RUN's (same images in one batch, threshold 0 so boxes are found)."""
    from PIL import Image

    from divekit.engine.run import make_config, train
    from divekit.tasks.detect import DetectConfig, DetectionTask

    cfg = make_config(DetectConfig, {"model": "tiny_ssd", "image_size": 64, "quiet": True,
                                     "threads": 1, "device": "cpu", "epochs": 1,
                                     "batch_size": 16, "limit": 32, "pictures": 0,
                                     "out": str(tmp_path / "ssd")})
    run = train(DetectionTask(cfg)).run_dir
    rng = np.random.default_rng(1)
    pictures = []
    for i in range(2):
        pictures.append(tmp_path / f"scene{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(pictures[-1])
    expected = run_predict(run, [str(p) for p in pictures], threshold=0.0, device="cpu")
    with serving(run) as url:
        status, reply = post_images(url, [(p.name, p.read_bytes()) for p in pictures],
                                    threshold="0")
        bad = post_images(url, [(p.name, p.read_bytes()) for p in pictures], threshold="2")
    assert status == 200, reply
    assert sum(len(e["detections"]) for e in expected) > 0
    for got, e in zip(reply["predictions"], expected):
        assert len(got["detections"]) == len(e["detections"])
        for d, (c, score, box) in zip(got["detections"], e["detections"]):
            assert d["class"] == c and d["score"] == pytest.approx(score, abs=1e-5)
            assert d["box"] == pytest.approx(box, abs=0.11)
    assert bad[0] == 400 and "threshold" in bad[1]["error"]


@pytest.mark.cuda
def test_a_run_served_on_cuda_answers_as_on_the_cpu(trained_lenet_run, digit_files):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    expected = run_predict(trained_lenet_run, [str(p) for p in digit_files], device="cpu")
    with serving(trained_lenet_run, "cuda") as url:
        with ThreadPoolExecutor(8) as pool:  # concurrent requests: batches on the GPU
            replies = list(pool.map(lambda p: post_images(url, [(p.name, p.read_bytes())]),
                                    digit_files * 4))
    for (status, reply), e in zip(replies, expected * 4):
        assert status == 200, reply
        got = reply["predictions"][0]["predictions"]
        assert [p["class"] for p in got][:1] == [c for c, _ in e["predictions"]][:1]
        assert np.allclose([p["probability"] for p in got], [p for _, p in e["predictions"]],
                           atol=1e-4)


# ----------------------------------------------------------------------------- the batcher
def test_batcher_groups_waiting_jobs_and_isolates_a_bad_one():
    calls: list[list[Any]] = []
    gate = threading.Event()

    def predict(items: list[Any], **options: Any) -> list[Any]:
        gate.wait(5)  # hold the first call so the others queue up behind it
        calls.append(list(items))
        if "bad" in items:
            raise DivekitError("bad item")
        return [(x, options.get("k")) for x in items]

    b = Batcher(predict, max_batch=4, max_wait_ms=50)
    try:
        first = b.submit(["a"])
        time.sleep(0.1)  # the worker is inside predict(["a"]) now
        rest = [b.submit([x]) for x in "bcdef"] + [b.submit(["g"], {"k": 2}),
                                                   b.submit(["bad"], {"k": 2}),
                                                   b.submit(["h"], {"k": 2})]
        gate.set()
        assert first.result(5) == [("a", None)]
        assert [f.result(5) for f in rest[:5]] == [[(x, None)] for x in "bcdef"]
        assert rest[5].result(5) == [("g", 2)] and rest[7].result(5) == [("h", 2)]
        with pytest.raises(DivekitError, match="bad item"):
            rest[6].result(5)
    finally:
        b.close()
    # at most 4 a batch, options never mixed, the bad job retried alone after its batch failed
    assert calls[0] == ["a"] and calls[1] == list("bcde") and calls[2] == ["f"]
    assert calls[3] == ["g", "bad", "h"] and calls[4:] == [["g"], ["bad"], ["h"]]
    with pytest.raises(DivekitError, match="max-batch"):
        Batcher(predict, max_batch=0)


# ----------------------------------------------------------------------------- text

def test_bert_texts_get_what_predict_run_gives_and_bad_texts_are_refused(bert_run):
    texts = ["a wonderful film, I loved every minute", "dull and far too long",
             "the plot " + "goes on and on " * 20]
    with pytest.warns(UserWarning, match="truncated to max_len 32"):  # the command line's way
        expected = run_predict(bert_run, texts, device="cpu", top_k=2)
    with serving(bert_run, max_wait_ms=20) as url:
        def post(body: Any) -> tuple[int, Any]:
            return request(url + "/predict", json.dumps(body).encode(), "application/json")

        status, one = post({"text": texts[0]})
        assert status == 200 and one["predictions"][0]["label"] == expected[0]["label"]
        status, many = post({"texts": texts, "top_k": 2})
        assert status == 200
        for got, e in zip(many["predictions"], expected):
            assert [c for c, _ in got["top"]] == [c for c, _ in e["top"]]
            assert np.allclose([p for _, p in got["top"]], [p for _, p in e["top"]], atol=1e-5)
        assert "truncated" not in many["predictions"][0]
        assert many["predictions"][2]["truncated"]["max_len"] == 32
        assert many["predictions"][2]["truncated"]["tokens"] > 32

        # concurrent single texts are batched and still get their own answers
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda t: post({"text": t}), texts * 4))
        assert all(s == 200 and r["predictions"][0]["label"] == e["label"]
                   for (s, r), e in zip(replies, expected * 4))

        for body, words in [({"text": "   "}, "empty sentence"), ({"texts": []}, "non-empty"),
                            ({"texts": ["ok", ""]}, "empty sentence"),
                            ({"pairs": [["a", "b"]]}, "not pairs"), ([1, 2], "object"),
                            ({"text": "x", "texts": ["y"]}, "exactly one"),
                            ({"txt": "x"}, "unknown field"), ({"text": 5}, "string"),
                            ({"text": "fine", "top_k": -1}, "top_k")]:
            status, reply = post(body)
            assert status == 400 and words in reply["error"], (body, reply)
        status, reply = request(url + "/predict", b"{not json", "application/json")
        assert status == 400 and "not valid JSON" in reply["error"]
        status, reply = post_images(url, [("x.png", b"123")])
        assert status == 415 and "JSON" in reply["error"]
        status, info = request(url + "/info")
        assert info["task"] == "bert_finetune" and info["head"] == "classify"
        assert info["max_len"] == 32 and info["input"] == "text"
        assert post({"text": texts[1]})[1]["predictions"][0]["label"] == expected[1]["label"]


def test_translations_and_their_attention_equal_the_runs(tmp_path):
    """A tiny Transformer trained one epoch on numbers-fr: the served translations are
    predict RUN's, and the attention is the run's ``attention_map`` with its heads averaged."""
    from divekit.engine.run import load_run, make_config, train
    from divekit.tasks.translate import TranslateConfig, TranslationTask

    cfg = make_config(TranslateConfig, dict(
        model="transformer", data="numbers-fr", max_examples=400, batch_size=64, epochs=1,
        bleu_examples=20, quiet=True, device="cpu", num_hiddens=32, ffn_num_hiddens=64,
        num_heads=2, num_blks=1, dropout=0.1, out=str(tmp_path / "mt")))
    run = train(TranslationTask(cfg)).run_dir
    sentences = ["twenty one .", "three hundred and four ."]
    expected = run_predict(run, sentences, device="cpu")
    with serving(run) as url:
        status, reply = request(url + "/predict", json.dumps(
            {"texts": sentences, "attention": True}).encode(), "application/json")
        bad = request(url + "/predict", json.dumps({"text": "x", "attention": "yes"}).encode(),
                      "application/json")
    assert status == 200, reply
    opened = load_run(run)
    assert any(e["translation"] for e in expected)  # some attention is compared
    for got, e in zip(reply["predictions"], expected):
        assert got["translation"] == e["translation"] and got["source"] == e["source"]
        if not e["translation"]:
            assert got["attention"] is None
            continue
        want = opened.task.attention_map(opened.model, e["source"], e["translation"])
        assert got["attention"]["source_tokens"] == want.src_tokens
        assert got["attention"]["output_tokens"] == want.out_tokens
        assert np.allclose(got["attention"]["weights"], want.weights.float().mean(0).numpy(),
                           atol=1e-4)
    assert bad[0] == 400 and "attention" in bad[1]["error"]


# ----------------------------------------------------------------------------- command line
def test_serve_command_defaults_to_this_machine_and_refuses_in_one_line(tmp_path, capsys,
                                                                      monkeypatch):
    import divekit.serve
    from divekit.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(divekit.serve, "serve", lambda run, **kw: seen.update(run=run, **kw))
    assert main(["serve", "RUN", "--max-body", "2M", "--max-batch", "1"]) == 0
    assert seen == {"run": "RUN", "host": "127.0.0.1", "port": 8000, "device": "cpu",
                    "max_batch": 1, "max_wait_ms": 5.0, "max_body": 2 * 2**20}
    monkeypatch.undo()

    for argv, words in [(["serve", str(tmp_path / "nope")], "nope"),
                        (["serve", str(tmp_path), "--max-body", "lots"], "--max-body"),
                        (["serve", str(tmp_path), "--port", "70000"], "--port")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and "\n" not in err, err


# ----------------------------------------------------------------------------- the page
def _chromium() -> str | None:
    """Debian's Chromium (`apt-get install chromium`) driven by playwright's client, or
    playwright's own download where there is one; None when either piece is missing."""
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    system = shutil.which("chromium") or shutil.which("chromium-browser")
    if system:
        return system
    try:
        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # noqa: BLE001 - no browser installed
        return None
    return path if path and Path(path).is_file() else None


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install chromium) "
                    "and playwright (pip install playwright)")
def test_page_in_headless_chromium_shows_the_top1_of_an_uploaded_digit(trained_lenet_run,
                                                                       digit_files, tmp_path):
    from playwright.sync_api import sync_playwright

    expected = run_predict(trained_lenet_run, [str(digit_files[7])], device="cpu")[0]
    with serving(trained_lenet_run) as url, sync_playwright() as p:
        browser = p.chromium.launch(headless=True, executable_path=_chromium(),
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#file", str(digit_files[7]))
            page.wait_for_selector("#top1", timeout=20_000)
            assert page.inner_text("#top1") == expected["predictions"][0][0]
            assert page.is_visible("#picture")
            page.screenshot(path=str(tmp_path / "serve.png"))  # how docs/serve.png was made
            assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            browser.close()


def test_page_is_self_contained_and_escapes_the_run_facts(trained_lenet_run):
    from divekit.serve.page import page_html

    info = ServedRun(trained_lenet_run).info()
    html_text = page_html({**info, "classes": ["</script><b>x"], "model": "<i>m</i>"})
    assert "</script><b>" not in html_text and "&lt;i&gt;m&lt;/i&gt;" in html_text
    assert "http://" not in html_text and "https://" not in html_text  # nothing from elsewhere
    assert json.loads(html_text.split("const INFO = ", 1)[1].split(";\n", 1)[0])["classes"] \
        == ["</script><b>x"]


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs node")
@pytest.mark.parametrize("kind", ["image", "text"])
def test_the_page_script_parses(tmp_path, kind):
    """Where no browser is installed, node at least parses the page's script (a syntax error
    would leave the page dead in every browser)."""
    from divekit.serve.page import page_html

    info = {"run": "r", "task": "classify" if kind == "image" else "translate", "head": None,
            "model": "m", "input": kind, "classes": ["a"], "metrics": {"val_acc": 0.5}}
    script = page_html(info).split("<script>", 1)[1].split("</script>", 1)[0]
    (tmp_path / "page.js").write_text(script)
    proc = subprocess.run(["node", "--check", str(tmp_path / "page.js")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# the page's script under node with a minimal DOM: its upload goes to the real server and the
# reply is rendered into the result element (fetch, FormData and File are node's own)
_NODE_DOM = r"""
const fs = require("fs");
const [script, base, image] = process.argv.slice(2);
const elements = {};
const el = (id) => elements[id] || (elements[id] = {
  id, hidden: true, textContent: "", innerHTML: "", value: "", files: [],
  classList: {add() {}, remove() {}}, click() {}, appendChild() {}});
globalThis.document = {getElementById: el, createElement: () => el("created")};
globalThis.URL.createObjectURL = () => "blob:x";
const realFetch = globalThis.fetch;
globalThis.fetch = (path, init) => realFetch(new URL(path, base), init);
eval(fs.readFileSync(script, "utf8"));
const input = el("file");
input.files = [new File([fs.readFileSync(image)], "digit.png", {type: "image/png"})];
input.onchange();
const start = Date.now();
(function wait() {
  const html = el("result").innerHTML;
  if (html.includes('id="top1"') || el("error").textContent) {
    console.log(JSON.stringify({hidden: el("image-input").hidden, result: html,
                                error: el("error").textContent}));
  } else if (Date.now() - start > 20000) { console.log("timeout"); process.exit(1); }
  else setTimeout(wait, 20);
})();
"""


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs node")
def test_the_page_script_uploads_and_shows_the_top1_under_node(trained_lenet_run, digit_files,
                                                               tmp_path):
    expected = run_predict(trained_lenet_run, [str(digit_files[7])], device="cpu")[0]
    (tmp_path / "dom.js").write_text(_NODE_DOM)
    with serving(trained_lenet_run) as url:
        status, page = request(url + "/")
        (tmp_path / "page.js").write_text(page.split("<script>", 1)[1].split("</script>", 1)[0])
        proc = subprocess.run(["node", str(tmp_path / "dom.js"), str(tmp_path / "page.js"),
                               url + "/", str(digit_files[7])],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["error"] == "" and shown["hidden"] is False
    top1 = expected["predictions"][0][0]
    assert f'<strong id="top1">{top1}</strong>' in shown["result"]
    for name, _ in expected["predictions"]:
        assert f'<td class="cls">{name}</td>' in shown["result"]
