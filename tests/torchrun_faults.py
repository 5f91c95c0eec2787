"""Callbacks for the two-node torchrun tests (``--callbacks torchrun_faults:NodeLog,...`` with
this folder on PYTHONPATH): a log of every worker start, and one ``kill -9`` per job.

They live apart from faults.KillWorker, which kills in the first attempt of each node
(``TORCHELASTIC_RESTART_COUNT`` 0). Across two agents that is not "once": a node restarted
because the *other* node failed keeps restart count 0, so the kill here is keyed on a marker
file that the first kill creates.
"""

from __future__ import annotations

import json
import os
import signal

from divekit.engine.callbacks import Callback


class NodeLog(Callback):
    """Append one JSON line per worker start to ``$DIVEKIT_NODE_LOG``: its pid, global rank,
    node (``GROUP_RANK``), the node's restart count and the step it starts from (0 for a
    fresh start, the checkpoint's step after a resume)."""

    def on_fit_start(self, trainer) -> None:
        line = {"pid": os.getpid(), "rank": trainer.env.rank,
                "node": int(os.environ.get("GROUP_RANK", -1)),
                "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", -1)),
                "step": trainer.global_step}
        with open(os.environ["DIVEKIT_NODE_LOG"], "a") as f:  # one short write per start
            f.write(json.dumps(line) + "\n")


class KillOnce(Callback):
    """SIGKILL the worker of global rank ``$DIVEKIT_CRASH_RANK`` right after global step
    ``$DIVEKIT_CRASH_AT_STEP``, once per job: the kill first creates ``$DIVEKIT_CRASH_MARKER``
    (exclusively), and a worker that finds the file there lets the step pass."""

    def on_train_batch_end(self, trainer, index, logs) -> None:
        if trainer.global_step != int(os.environ["DIVEKIT_CRASH_AT_STEP"]):
            return
        if trainer.env.rank != int(os.environ["DIVEKIT_CRASH_RANK"]):
            return
        try:
            os.close(os.open(os.environ["DIVEKIT_CRASH_MARKER"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
