"""Fault injection for the kill/restart tests: a Trainer callback that only tests add
(`divekit train ... --callbacks faults:KillWorker` with this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

from divekit.engine.callbacks import Callback


class KillWorker(Callback):
    """``DIVEKIT_CRASH_AT_STEP=K`` kills one worker after global step K, under
    torch.distributed's elastic agent and in its first attempt only (``TORCHELASTIC_RESTART_COUNT``
    is 0), like a machine failure. ``DIVEKIT_CRASH_RANK`` picks the rank (default: the last)."""

    def on_train_batch_end(self, trainer, index, logs) -> None:
        at = os.environ.get("DIVEKIT_CRASH_AT_STEP")
        if not at or trainer.global_step != int(at) or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0":
            return
        env = trainer.env
        if env.rank == int(os.environ.get("DIVEKIT_CRASH_RANK", env.world_size - 1)):
            os.kill(os.getpid(), signal.SIGKILL)
