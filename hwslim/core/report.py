"""Fixed-width text tables: what the CLI, ``hwslim verify`` and the kernel reports print; and
the "did you mean" of a mistyped name."""
from __future__ import annotations

import sys
from typing import Iterable


def print_table(rows: list[dict], columns: list[str] | None = None, file=None) -> None:
    """Print ``rows`` as a fixed-width table."""
    file = file or sys.stdout
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=file)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def did_you_mean(word: str, choices: Iterable[object]) -> str:
    """`` did you mean 'resnet20'?`` for the closest of ``choices`` to a mistyped ``word`` (else empty)."""
    import difflib

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""
