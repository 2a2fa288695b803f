from __future__ import annotations

from hwslim.cli import add_command
from hwslim.errors import HwslimError


def register(sub) -> None:
    add_command(sub, "demo", run, run.__doc__)


def run(args) -> int:
    """Not built yet (issue 6)."""
    raise HwslimError("'hwslim demo' is not built yet (issue 6)")
