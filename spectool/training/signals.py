"""Ctrl-C and SIGTERM during training: the first asks for a checkpoint and a stop after the current step; a second
Ctrl-C stops at once (one process only; under torchrun the launcher escalates by itself)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: The exit code of a run stopped by each signal.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequests:
    """The stop signal this process received (``received``) and whether any process did (``anywhere``, agreed at
    every step's all-reduce when there are ``several_processes``)."""

    def __init__(self, several_processes: bool) -> None:
        self.several_processes = several_processes
        self.received: int | None = None
        self.anywhere = False

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Catch SIGINT / SIGTERM while the block runs (main thread only), then put the old handlers back."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, _frame: Any) -> None:
            if self.received is None:
                self.received = signum
                # One process: a second Ctrl-C stops at once. Under torchrun the launcher forwards the terminal's
                # Ctrl-C once more and escalates by itself, so repeated signals are ignored there.
                if not self.several_processes:
                    signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether to stop: a signal here, or (with several processes) in any process as of the step's all-reduce,
        so that every process decides alike."""
        return self.anywhere if self.several_processes else self.received is not None
