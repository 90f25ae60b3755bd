"""Stopping a run cleanly: SIGTERM (what cluster schedulers send some seconds before they kill) and Ctrl-C
(SIGINT) ask the trainer to finish the current optimizer step, write a checkpoint and stop; a second signal
stops at once."""
from __future__ import annotations

import signal
import threading
from types import FrameType

from ..errors import LoramixError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(LoramixError):
    """The run stopped on a signal after writing a checkpoint; exits with 128 + the signal's number."""

    label = "interrupted"

    def __init__(self, signum: int, message: str) -> None:
        self.exit_code = 128 + signum
        super().__init__(message)


class StopRequest:
    """While active (``with StopRequest() as stop:``), SIGTERM and SIGINT set ``stop.signum`` instead of ending
    the process; a second one raises KeyboardInterrupt. Signal handlers exist only in the main thread: elsewhere
    this does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
