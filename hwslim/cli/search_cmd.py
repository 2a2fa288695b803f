from __future__ import annotations

from hwslim.cli import add_command
from hwslim.errors import HwslimError


def register(sub) -> None:
    add_command(sub, "search", run, run.__doc__)


def run(args) -> int:
    """Not built yet (issue 5)."""
    raise HwslimError("'hwslim search' is not built yet (issue 5)")
