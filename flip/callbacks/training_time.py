"""Training time as the paper counts it: the time spent in training steps (wall clock and
this process's CPU time), without validation, checkpointing or start-up. Logged every step
as ``time/train_wall_s`` and ``time/train_cpu_s`` next to ``train/samples_seen``, so an
accuracy-vs-time curve (paper Fig. 1/3) reads both from one metrics file; carried in
checkpoints, so a resumed run keeps counting."""

import time

import lightning as L


class TrainingTime(L.Callback):
    def __init__(self):
        self.wall = self.cpu = 0.0  # seconds spent in training steps so far
        self._start: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]
        self._start = None
        pl_module.log_dict(
            {"time/train_wall_s": self.wall, "time/train_cpu_s": self.cpu}, rank_zero_only=True
        )

    def state_dict(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu}

    def load_state_dict(self, state: dict) -> None:
        self.wall, self.cpu = state["wall"], state["cpu"]
