"""Ctrl-C (SIGINT) that never ends in a traceback.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside an
import that can be turned into something else: numpy's C extension (which ONNX
Runtime, pandas and torch import) reports an interrupted import as ``ImportError:
import numpy failed`` and prints the traceback itself. So while an import is running
the interrupt is held back and delivered (as KeyboardInterrupt) as soon as the import
is done; the CLI turns it into one line and exit status 130.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

_RETRY_S = 0.02
_state = {"received": False}


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _deliver(signum, frame) -> None:
    _state["received"] = True
    if _in_import(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)  # try again once the import is done
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    raise KeyboardInterrupt


def received() -> bool:
    """Whether a SIGINT arrived while :func:`handled` was active."""
    return _state["received"]


@contextmanager
def handled():
    """Within the block, SIGINT raises KeyboardInterrupt, never inside an import."""
    try:
        old_int = signal.signal(signal.SIGINT, _deliver)
        old_alarm = signal.signal(signal.SIGALRM, _deliver)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    _state["received"] = False
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGINT, old_int)
