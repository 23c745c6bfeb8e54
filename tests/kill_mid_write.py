"""Test-only checkpoint writer: the ``at_save``-th checkpoint write of the process stops
halfway through its bytes with SIGKILL (no handler, no clean-up runs), as a spot
instance or the OOM killer would."""

import io
import os
import signal

import torch

from flip.resume import AtomicCheckpointIO


class KillMidWrite(AtomicCheckpointIO):
    def __init__(self, at_save: int):
        super().__init__()
        self.at_save, self.saves = at_save, 0

    def write(self, checkpoint: dict, f) -> None:
        self.saves += 1
        if self.saves < self.at_save:
            return super().write(checkpoint, f)
        data = io.BytesIO()
        torch.save(checkpoint, data)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
