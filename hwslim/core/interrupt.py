"""Ctrl-C (SIGINT) and SIGTERM that never end in a traceback.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside an
import that can be turned into something else: numpy's C extension (which ONNX
Runtime, pandas and torch import) reports an interrupted import as ``ImportError:
import numpy failed`` and prints the traceback itself. So while an import is running
the interrupt is held back and delivered (as KeyboardInterrupt) as soon as the import
is done; the CLI turns it into one line and exit status 130. SIGTERM (``kill``, a job
scheduler's stop) is handled the same way, ending with status 143 (128 + 15): the
atomic writes leave the last good state either way.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

_RETRY_S = 0.02
_state = {"received": False, "signal": 0}


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _deliver(signum, frame) -> None:
    _state["received"] = True
    if signum != signal.SIGALRM:
        _state["signal"] = signum
    if _in_import(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)  # try again once the import is done
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    raise KeyboardInterrupt


def received() -> bool:
    """Whether a SIGINT or SIGTERM arrived while :func:`handled` was active."""
    return _state["received"]


def exit_status() -> int:
    """What the interrupted command exits with: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + (_state["signal"] or signal.SIGINT)


def what() -> str:
    """The word for the interruption on the command's one line."""
    return "terminated (SIGTERM)" if _state["signal"] == signal.SIGTERM else "interrupted"


@contextmanager
def handled():
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt, never inside an import."""
    try:
        old_int = signal.signal(signal.SIGINT, _deliver)
        old_term = signal.signal(signal.SIGTERM, _deliver)
        old_alarm = signal.signal(signal.SIGALRM, _deliver)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    _state.update(received=False, signal=0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
