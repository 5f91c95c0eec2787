"""``divekit serve RUN``: a trained run behind HTTP (FastAPI and uvicorn), with a page to try
it, ``POST /predict``, ``GET /health`` and ``GET /info`` (:mod:`divekit.serve`)."""

from __future__ import annotations

import argparse

from divekit.cli._common import add_command
from divekit.errors import DivekitError

COMMANDS = ("serve",)
DESCRIPTION = (
    "Serve RUN's newest weights: POST /predict (images as multipart field 'file', several "
    "allowed; texts as JSON {\"text\": ...}, {\"texts\": [...]} or {\"pairs\": [[a, b]]}), GET / "
    "(a page), GET /health, GET /info. Requests that arrive together are answered in one batch "
    "(--max-batch, --max-wait-ms).")

EXAMPLES = """\
examples:
  divekit serve runs/resnet18-digits                      http://127.0.0.1:8000/ in a browser
  curl -F file=@seven.png http://127.0.0.1:8000/predict   top-k classes as JSON
  curl -H 'content-type: application/json' -d '{"text": "a fine film"}' \\
      http://127.0.0.1:8000/predict                       a BERT run's labels
  divekit serve runs/resnet18-digits --max-batch 1        no dynamic batching
"""


def _size(text: str) -> int:
    """``"10M"``, ``"512k"``, ``"1048576"`` → bytes (k, M, G are powers of 1024)."""
    units = {"k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = int(float(number) * unit)
    except ValueError:
        raise DivekitError(f"--max-body must be a size in bytes (k, M, G allowed, e.g. 10M), "
                           f"got {text!r}") from None
    if value < 1:
        raise DivekitError(f"--max-body must be at least 1 byte, got {text!r}")
    return value


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = add_command(sub, parent, "serve", description=DESCRIPTION, examples=EXAMPLES,
                    help="serve a run over HTTP, with a page to try it")
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by `divekit train`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="most items answered by one forward pass (1: no batching; default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more requests after its first (default 5)")
    p.add_argument("--max-body", type=_size, default="10M", metavar="SIZE",
                   help="largest request body, larger ones get 413 (default 10M)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from divekit.serve import serve

    serve(args.run_dir, host=args.host, port=args.port, device=args.device,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body=args.max_body)
