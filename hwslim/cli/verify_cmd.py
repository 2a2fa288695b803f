from __future__ import annotations

from hwslim.cli import add_command
from hwslim.errors import HwslimError


def register(sub) -> None:
    add_command(sub, "verify", run, run.__doc__)


def run(args) -> int:
    """Not built yet (issue 6)."""
    raise HwslimError("'hwslim verify' is not built yet (issue 6)")
