"""``divekit serve RUN``: a trained run behind HTTP, on FastAPI and uvicorn.

The server does no inference of its own: every request goes through the run's task's
``predict`` (the one ``divekit predict RUN`` calls), so an image is converted exactly as in
training and a reply holds what the command line prints. What the server adds:

* **Dynamic batching.** Requests that arrive together are answered by one call of ``predict``
  (:class:`Batcher`): the first request opens a batch, which closes after ``max_wait_ms`` or
  at ``max_batch`` items. One worker thread owns the model, so requests never run it
  concurrently. ``max_batch=1`` turns batching off (each request is its own call). A batch
  that fails on one bad item is answered request by request, so only that request fails.
* **Bad input in one line.** Every refusal is a 4xx JSON ``{"error": "..."}``: a body over
  ``max_body`` bytes (413, checked while the body streams in), a wrong content type (415), a
  file that is not an image, an empty sentence (400). A sentence past the model's length is
  cut, as in training, and its reply says so (``"truncated"``).
* ``GET /`` a page to try the model, ``GET /health``, ``GET /info`` (task, model, classes,
  the run's last metrics).

It binds to 127.0.0.1 unless told otherwise: a model server is not meant to face a network
without a proxy in front of it.
"""
# no ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# (``request: Request``, imported inside build_app) as objects

import asyncio
import base64
import contextlib
import csv
import io
import json
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divekit.errors import DivekitError

IMAGE_TASKS = ("classify", "detect", "segment")
TEXT_TASKS = ("bert_finetune", "translate")  # a language model generates: not served
MAX_ITEMS = 64  # images or texts in one request
DEFAULT_MAX_BODY = 10 * 2**20


def require_server_packages() -> None:
    """One line naming the extra when FastAPI, uvicorn or python-multipart is missing."""
    from importlib.util import find_spec

    missing = [name for mod, name in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                      ("multipart", "python-multipart"))
               if find_spec(mod) is None]
    if missing:
        raise DivekitError(f"divekit serve needs {', '.join(missing)}: "
                           "pip install 'divekit[serve]'")


# ----------------------------------------------------------------------------- inputs
class Upload(io.BytesIO):
    """An uploaded file as the tasks' ``predict`` reads it: PIL opens it like a path, and
    ``str()`` gives the upload's file name, which the task puts in its reply."""

    def __init__(self, data: bytes, filename: str):
        super().__init__(data)
        self.filename = filename

    def __str__(self) -> str:
        return self.filename


def check_image(data: bytes, filename: str) -> None:
    """Refuse (one line) an upload PIL cannot decode, before it can spoil a batch."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DivekitError(f"{filename!r} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DivekitError(f"{filename!r} is not an image this server can read: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def text_items(body: Any, task: str, head: str | None) -> list[str]:
    """The texts of a JSON body, ``{"text": ...}``, ``{"texts": [...]}``, ``{"pairs": [[a, b],
    ...]}`` or ``{"text": a, "text_pair": b}``, as the strings the task's ``predict`` takes
    (a pair as ``A ||| B``, the command line's form)."""
    if not isinstance(body, dict):
        raise DivekitError('the JSON body must be an object: {"text": ...}, {"texts": [...]} '
                           'or {"pairs": [[a, b], ...]}')
    known = {"text", "texts", "pairs", "text_pair", "top_k", "attention"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise DivekitError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(sorted(known))}")
    given = [k for k in ("text", "texts", "pairs") if k in body]
    if len(given) != 1:
        raise DivekitError('give exactly one of "text", "texts" or "pairs"')
    if "pairs" in body or "text_pair" in body:
        if head not in ("pair", "qa"):
            raise DivekitError(f"this {task} run takes single texts, not pairs")
        pairs = body.get("pairs") if "pairs" in body else [[body.get("text"), body["text_pair"]]]
        if not isinstance(pairs, list) or not pairs:
            raise DivekitError('"pairs" must be a non-empty list of [text, text] pairs')
        items = []
        for p in pairs:
            if (not isinstance(p, list | tuple) or len(p) != 2
                    or not all(isinstance(s, str) for s in p)):
                raise DivekitError(f"a pair is a list of two strings, got {str(p)[:60]}")
            if not p[0].strip() or not p[1].strip():
                raise DivekitError("cannot predict on an empty sentence")
            items.append(f"{p[0].strip()} ||| {p[1].strip()}")
    else:
        texts = [body["text"]] if "text" in body else body["texts"]
        if not isinstance(texts, list) or not texts:
            raise DivekitError('"texts" must be a non-empty list of strings')
        if head in ("pair", "qa"):
            raise DivekitError(f'this run\'s {head} head takes sentence pairs: '
                               '{"pairs": [[a, b]]} or {"text": a, "text_pair": b}')
        items = []
        for t in texts:
            if not isinstance(t, str):
                raise DivekitError(f"a text must be a string, got {type(t).__name__}")
            if not t.strip():
                raise DivekitError("cannot predict on an empty sentence")
            items.append(t.strip())
    if len(items) > MAX_ITEMS:
        raise DivekitError(f"{len(items)} texts in one request; at most {MAX_ITEMS}")
    return items


def _fraction(text: str, name: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise DivekitError(f"{name} must be a number in [0, 1], got {text[:20]!r}")
    return value


def top_k_of(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise DivekitError(f"top_k must be a whole number in [1, 100], got {value!r}")
    return value


# ----------------------------------------------------------------------------- batching
@dataclass
class _Job:
    items: list[Any]
    options: dict[str, Any]
    future: Future = field(default_factory=Future)


class Batcher:
    """One worker thread that owns the model and answers jobs, several at a time.

    ``submit(items, options)`` returns a Future of the job's results (one per item, in
    order). The worker takes the first waiting job, then keeps taking jobs with the same
    options until ``max_batch`` items are in hand or ``max_wait_ms`` has passed since the first
    one, and answers them all with one ``predict(items, **options)``. Batches counts the calls,
    for ``/info`` and the tests.
    """

    def __init__(self, predict: Any, max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise DivekitError(f"--max-batch must be at least 1, got {max_batch}")
        if not 0 <= max_wait_ms <= 10_000:
            raise DivekitError(f"--max-wait-ms must be in [0, 10000], got {max_wait_ms}")
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.items = 0
        self._held: _Job | None = None  # a job whose options did not fit the last batch
        self._thread = threading.Thread(target=self._work, name="divekit-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list[Any], options: dict[str, Any] | None = None) -> Future:
        job = _Job(list(items), dict(options or {}))
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else \
            self.queue.get_nowait()

    def _work(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            jobs, count = [first], len(first.items)
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch:
                try:
                    job = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)  # stop after this batch
                    break
                if job.options != first.options or count + len(job.items) > self.max_batch:
                    self._held = job
                    break
                jobs.append(job)
                count += len(job.items)
            self._answer(jobs)

    def _run(self, items: list[Any], options: dict[str, Any]) -> list[Any]:
        self.batches += 1
        self.items += len(items)
        with warnings.catch_warnings():  # truncation is reported in the reply, not on stderr
            warnings.simplefilter("ignore")
            return self.predict(items, **options)

    def _answer(self, jobs: list[_Job]) -> None:
        items = [x for job in jobs for x in job.items]
        try:
            results = self._run(items, jobs[0].options)
        except Exception as e:  # noqa: BLE001 - handed to the requests, the server goes on
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
                return
            for job in jobs:  # one bad job must not fail its neighbours
                self._answer([job])
            return
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.items)])
            start += len(job.items)


# ----------------------------------------------------------------------------- the served run
class ServedRun:
    """An opened run and what the server says about it: task, head, classes, metrics, and
    the JSON form of its predictions."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        from divekit.engine.run import load_run

        self.run = load_run(run_dir, device)
        self.dir = Path(run_dir)
        self.task_name = str(self.run.record.get("task", "classify"))
        if self.task_name not in IMAGE_TASKS + TEXT_TASKS:
            raise DivekitError(f"{run_dir} is a {self.task_name} run; divekit serve takes "
                               f"{', '.join(IMAGE_TASKS + TEXT_TASKS)} runs")
        self.head = getattr(self.run.config, "task", None) if self.task_name == "bert_finetune" \
            else None
        if self.task_name == "bert_finetune" and self.head not in ("classify", "pair", "tag"):
            raise DivekitError(f"{run_dir}: divekit serve takes the classify, pair and tag heads "
                               f"of bert_finetune, not {self.head!r}")

    @property
    def kind(self) -> str:
        return "image" if self.task_name in IMAGE_TASKS else "text"

    def predict(self, items: list[Any], **options: Any) -> list[Any]:
        """The task's ``predict`` on a batch; ``attention=True`` (translation) adds each
        translation's encoder-decoder attention (heads averaged) with its tokens."""
        task, model = self.run.task, self.run.model
        assert task is not None and model is not None
        attention = bool(options.pop("attention", False))
        if self.task_name == "translate":
            options.pop("top_k", None)
        results = task.predict(model, items, **options)
        if attention:
            for item in results:
                item["attention"] = self._attention(item["source"], item["translation"])
        return results

    def _attention(self, source: str, translation: str) -> dict[str, Any] | None:
        if not translation or not hasattr(self.run.task, "attention_map"):
            return None
        try:
            found = self.run.task.attention_map(self.run.model, source, translation)
        except DivekitError:  # a model without attention (plain seq2seq)
            return None
        weights = found.weights.float()
        weights = weights.mean(0) if weights.ndim == 3 else weights  # (T_out, T_src)
        return {"weights": [[round(v, 4) for v in row] for row in weights.tolist()],
                "source_tokens": list(found.src_tokens), "output_tokens": list(found.out_tokens)}

    def classes(self) -> list[str] | None:
        task = self.run.task
        for source in (getattr(task, "facts", None) or {}, self.run.record):
            if isinstance(source, dict) and isinstance(source.get("classes"), list):
                return [str(c) for c in source["classes"]]
        for name in ("classes", "labels"):
            value = getattr(task, name, None)
            if isinstance(value, list | tuple):
                return [str(c) for c in value]
        return None

    def metrics(self) -> dict[str, Any]:
        """The last row of the run's ``metrics.csv`` (numbers as numbers)."""
        path = self.dir / "metrics.csv"
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError:
            return {}
        if not rows:
            return {}
        out: dict[str, Any] = {}
        for k, v in rows[-1].items():
            try:
                out[k] = float(v) if v not in ("", None) else None
            except ValueError:
                out[k] = v
        return out

    def info(self) -> dict[str, Any]:
        config = self.run.config
        return {"run": str(self.dir), "task": self.task_name, "head": self.head,
                "model": getattr(config, "model", None), "data": getattr(config, "data", None),
                "input": self.kind, "classes": self.classes(), "metrics": self.metrics(),
                "max_len": self._max_len()}

    def _tokenizer(self) -> Any:
        return getattr(self.run.task, "tokenizer", None) if self.task_name == "bert_finetune" \
            else None

    def _max_len(self) -> int | None:
        tok = self._tokenizer()
        return int(tok.max_len) if tok is not None and hasattr(tok, "max_len") else None

    def truncation(self, text: str) -> dict[str, int] | None:
        """``{"tokens", "max_len"}`` when the text is longer than the model takes (it will be
        cut, as in training), else None."""
        tok = self._tokenizer()
        if tok is None or not hasattr(tok, "ids"):
            return None
        a, sep, b = text.partition(" ||| ")
        parts = [a, b] if sep else [a]
        total = sum(len(ids) for ids in tok.ids(parts))
        specials = 3 if sep else 2
        return {"tokens": total + specials, "max_len": tok.max_len} \
            if total + specials > tok.max_len else None

    def to_json(self, item: dict[str, Any]) -> dict[str, Any]:
        """A prediction as JSON: tensors as lists; a segmentation map also as a colour
        overlay (a PNG in base64) for the page."""
        out = {k: _jsonable(v) for k, v in item.items() if k != "label_map"}
        if "label_map" in item:
            out["label_map"] = _jsonable(item["label_map"])
            facts = getattr(self.run.task, "facts", {}) or {}
            if facts.get("colormap"):
                out["overlay_png"] = _colour_png(item["label_map"], facts["colormap"])
        if "predictions" in out:  # classify: [(class, p)] as objects
            out["predictions"] = [{"class": c, "probability": p} for c, p in out["predictions"]]
        if "detections" in out:
            out["detections"] = [{"class": c, "score": s, "box": b}
                                 for c, s, b in out["detections"]]
        return out


def _jsonable(v: Any) -> Any:
    import torch

    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float | int | str | bool) or v is None:
        return v
    return str(v)


def _colour_png(label_map: Any, colormap: list[Any]) -> str:
    import numpy as np
    from PIL import Image

    colours = np.asarray(colormap, dtype=np.uint8).reshape(-1, 3)
    idx = np.asarray(label_map, dtype=np.int64).clip(0, len(colours) - 1)
    buf = io.BytesIO()
    Image.fromarray(colours[idx]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- the app
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 in one JSON line,
    by its Content-Length before it is read, or while it streams in (chunked uploads)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, 413, self._message(int(length)))
            return
        seen = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self._message(seen))
            return message

        await self.app(scope, counted_receive, send)

    def _message(self, size: int) -> str:
        return f"request body of {size:,} bytes or more is over the limit of {self.limit:,}"


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build_app(served: ServedRun, *, max_batch: int = 32, max_wait_ms: float = 5.0,
              max_body: int = DEFAULT_MAX_BODY) -> Any:
    """The FastAPI application of an opened run (wrapped in the body limit)."""
    require_server_packages()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from divekit.serve.page import page_html

    check_options(max_batch=max_batch, max_wait_ms=max_wait_ms, max_body=max_body)
    batcher = Batcher(served.predict, max_batch, max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        yield
        batcher.close()

    app = FastAPI(title=f"divekit: {served.dir.name}", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.batcher, app.state.served = batcher, served

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message.splitlines()[0] if message else "error"},
                            status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        return error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg')}")

    @app.exception_handler(DivekitError)
    async def divekit_error(_: Request, exc: DivekitError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page_html(served.info())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {**served.info(), "batching": {"max_batch": batcher.max_batch,
                                              "max_wait_ms": batcher.max_wait * 1000,
                                              "batches": batcher.batches,
                                              "items": batcher.items},
                "max_body": max_body}

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        options: dict[str, Any] = {}
        notes: list[dict[str, Any] | None] = []
        if served.kind == "image":
            if ctype != "multipart/form-data":
                return error(415, f"this {served.task_name} server takes images as "
                             f"multipart/form-data (field 'file'), not {ctype or 'no type'}")
            items = await _uploads(request, options)
        else:
            if ctype != "application/json":
                return error(415, f"this {served.task_name} server takes JSON "
                             f'({{"text": ...}}), not {ctype or "no type"}')
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError) as e:
                return error(400, f"the body is not valid JSON: {e}")
            items = text_items(body, served.task_name, served.head)
            if isinstance(body, dict) and body.get("top_k") is not None:
                options["top_k"] = top_k_of(body["top_k"])
            if isinstance(body, dict) and body.get("attention") is not None:
                if served.task_name != "translate" or not isinstance(body["attention"], bool):
                    raise DivekitError('"attention" is true or false, for translation runs')
                options["attention"] = body["attention"]
            notes = [served.truncation(t) for t in items]
        if served.task_name == "translate":
            options.pop("top_k", None)
        results = await asyncio.wrap_future(batcher.submit(items, options))
        out = [served.to_json(r) for r in results]
        for item, note in zip(out, notes):
            if note is not None:
                item["truncated"] = note
        return {"predictions": out}

    async def _uploads(request: Request, options: dict[str, Any]) -> list[Upload]:
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=MAX_ITEMS, max_fields=8)
        except StarletteHTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's
            raise DivekitError(f"cannot read the multipart body: {e}") from None
        try:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                raise DivekitError("no image in the request: send it as multipart field 'file'")
            if form.get("top_k") is not None:
                try:
                    options["top_k"] = top_k_of(int(str(form.get("top_k"))))
                except ValueError:
                    raise DivekitError(f"top_k must be a whole number, got "
                                       f"{str(form.get('top_k'))[:20]!r}") from None
            if served.task_name != "classify":
                options.pop("top_k", None)
            if served.task_name == "detect" and form.get("threshold") is not None:
                options["threshold"] = _fraction(str(form.get("threshold")), "threshold")
            uploads = []
            for f in files:
                data = await f.read()
                name = f.filename or "upload"
                check_image(data, name)
                uploads.append(Upload(data, name))
            return uploads
        finally:
            await form.close()

    return BodyLimit(app, max_body)


def check_options(*, port: int = 8000, max_batch: int = 32, max_wait_ms: float = 5.0,
                  max_body: int = DEFAULT_MAX_BODY) -> None:
    """The server's numbers, checked before the run is opened (one line each)."""
    import math

    if not 0 <= port <= 65535:
        raise DivekitError(f"--port must be in [0, 65535], got {port}")
    if max_batch < 1:
        raise DivekitError(f"--max-batch must be at least 1, got {max_batch}")
    if not (math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= 10_000):
        raise DivekitError(f"--max-wait-ms must be in [0, 10000], got {max_wait_ms}")
    if max_body < 1:
        raise DivekitError(f"--max-body must be at least 1 byte, got {max_body}")


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu", max_batch: int = 32, max_wait_ms: float = 5.0,
          max_body: int = DEFAULT_MAX_BODY, log_level: str = "warning") -> None:
    """Open the run and serve it with uvicorn until interrupted."""
    require_server_packages()
    import uvicorn

    check_options(port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body=max_body)
    served = ServedRun(run_dir, device)
    app = build_app(served, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body=max_body)
    print(f"serving {run_dir} ({served.task_name}) on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
