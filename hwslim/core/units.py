"""Channel units: groups of channels that must keep equal widths, and their grids.

A unit is every channel dimension tied together by the graph: both sides of a residual
add, a depthwise conv's input and output. Slimming a unit to width ``w`` keeps the
first ``w`` channels everywhere it appears.

Each unit's grid has ``GRID_STEPS`` (12) steps, ``i/12`` of its maximum width for
i = 1..12, each rounded by :func:`hwslim.core.rounding.make_divisible` and capped at the
maximum; duplicates merge, so a narrow unit has fewer distinct widths:

>>> width_grid(96)
(8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96)
>>> width_grid(16)
(8, 16)
>>> width_grid(64, divisor=32)
(32, 64)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hwslim.core.rounding import DEFAULT_DIVISOR, make_divisible

GRID_STEPS = 12


def step_width(max_width: int, step: int, divisor: int = DEFAULT_DIVISOR) -> int:
    """Width of grid step ``step`` (1..GRID_STEPS) of a unit of ``max_width`` channels."""
    if not 1 <= step <= GRID_STEPS:
        raise ValueError(f"grid step must be in 1..{GRID_STEPS}, got {step}")
    if step == GRID_STEPS:
        return max_width
    return min(make_divisible(max_width * step / GRID_STEPS, divisor), max_width)


def width_grid(max_width: int, divisor: int = DEFAULT_DIVISOR) -> tuple[int, ...]:
    """Sorted distinct widths a unit of ``max_width`` channels may take."""
    return tuple(sorted({step_width(max_width, i, divisor) for i in range(1, GRID_STEPS + 1)}))


@dataclass(frozen=True)
class ChannelUnit:
    """A named group of tied channels with its allowed widths (ascending).

    ``divisor`` is what every width is a multiple of: the rounding divisor, or a multiple
    of it that is also a multiple of the unit's quantum (a grouped conv's group width).
    """

    name: str
    max_width: int
    grid: tuple[int, ...]
    divisor: int = DEFAULT_DIVISOR

    @classmethod
    def build(cls, name: str, max_width: int, divisor: int = DEFAULT_DIVISOR, quantum: int = 1) -> "ChannelUnit":
        d = math.lcm(divisor, max(1, int(quantum)))
        return cls(name, max_width, width_grid(max_width, d), d)

    def step(self, step: int) -> int:
        """The width at grid step ``step`` (1..GRID_STEPS)."""
        return step_width(self.max_width, step, self.divisor)

    def narrower(self, width: int) -> int | None:
        """The next grid width below ``width``, or None at the bottom of the grid."""
        i = self.grid.index(width)
        return self.grid[i - 1] if i > 0 else None
