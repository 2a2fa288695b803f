"""The one JSON reader of every file hwslim reads (configs, table metadata, search states,
graph files, ONNX metadata values, sidecars).

Python's ``json`` recurses once per nesting level, so a crafted file nested 100,000 deep
ends in RecursionError (a traceback) instead of a refusal. :func:`loads` measures the
nesting first and refuses anything deeper than :data:`MAX_DEPTH` with a ValueError, the
exception every caller already turns into its one line for a malformed file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# hwslim's own files nest at most ~6 deep (a graph file's node attributes); 100 leaves room
MAX_DEPTH = 100
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class JsonTooDeepError(ValueError):
    """JSON nested deeper than :data:`MAX_DEPTH` (a crafted file): refused before parsing."""


def nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (strings skipped), without recursion."""
    depth = deepest = 0
    for ch in _BRACKET.findall(_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses (ValueError) JSON nested deeper than :data:`MAX_DEPTH`."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if nesting(text) > MAX_DEPTH:
        raise JsonTooDeepError(f"JSON nested more than {MAX_DEPTH} levels deep")
    return json.loads(text)


def load(path: str | os.PathLike) -> Any:
    """The JSON in the file ``path`` (UTF-8), read with :func:`loads`. Raises OSError, ValueError."""
    return loads(Path(path).read_text(encoding="utf-8"))


__all__ = ["MAX_DEPTH", "JsonTooDeepError", "load", "loads", "nesting"]
