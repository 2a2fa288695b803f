from __future__ import annotations

from hwslim.cli import add_command
from hwslim.errors import HwslimError


def register(sub) -> None:
    add_command(sub, "train", run, run.__doc__)


def run(args) -> int:
    """Not built yet (issue 3)."""
    raise HwslimError("'hwslim train' is not built yet (issue 3)")
