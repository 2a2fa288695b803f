from __future__ import annotations

from hwslim.cli import add_command
from hwslim.errors import HwslimError


def register(sub) -> None:
    add_command(sub, "profile", run, run.__doc__)


def run(args) -> int:
    """Not built yet (issue 4)."""
    raise HwslimError("'hwslim profile' is not built yet (issue 4)")
