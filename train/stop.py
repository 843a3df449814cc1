"""When a training run stops early: SIGINT / SIGTERM (the second one stops at once), ``train.stop_after``
steps and ``train.time_limit_min`` minutes in this invocation. Several processes agree on signals and time
limits at log rows only (one small all-reduce there), so every rank stops after the same step."""
from __future__ import annotations

import signal
import threading
import time

import torch

from . import distributed as dd


class StopControl:
    """Holds the stop reason; :meth:`install` catches the signals (main thread only) until :meth:`restore`."""

    def __init__(self):
        self.reason: str | None = None
        self._handlers: dict = {}
        self._start_step, self._t0 = 0, time.time()

    def _on_signal(self, signum, _frame) -> None:
        if self.reason is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def install(self) -> None:
        if not self._handlers and threading.current_thread() is threading.main_thread():
            self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, old in self._handlers.items():
            signal.signal(sig, old)
        self._handlers = {}

    def start(self, step: int) -> None:
        """This invocation's training starts at ``step`` (stop_after and the time limit count from here)."""
        self._start_step, self._t0 = step, time.time()

    def should_stop(self, step: int, train_cfg: dict, at_row: bool, distributed: bool, device: torch.device) -> bool:
        if train_cfg["stop_after"] and step - self._start_step >= train_cfg["stop_after"]:  # the same on every rank
            self.reason = self.reason or "stop_after"
            return True
        if train_cfg["time_limit_min"] and time.time() - self._t0 >= 60 * train_cfg["time_limit_min"]:
            self.reason = self.reason or "time_limit"
        if not distributed:
            return self.reason is not None
        if not at_row:
            return False
        if dd.any_rank(self.reason is not None, device):
            self.reason = self.reason or "another rank stopped"
            return True
        return False
