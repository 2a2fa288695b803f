"""The one rounding rule for channel counts.

Every width in hwslim (a supernet's layer widths at a width multiplier, every step of
a unit's grid, every latency-table key) goes through :func:`make_divisible`. It is
torchvision's ``_make_divisible`` (also MNasNet's ``_round_to_multiple_of``): round to
the nearest multiple of ``divisor``, never below ``divisor``, and never more than 10%
below the requested value.

>>> make_divisible(32 * 1.5)
48
>>> make_divisible(1280 * 0.35)
448
>>> make_divisible(16 / 12)
8
"""
from __future__ import annotations

DEFAULT_DIVISOR = 8
DIVISORS = (8, 16, 32)


def make_divisible(value: float, divisor: int = DEFAULT_DIVISOR, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` (torchvision's rule)."""
    if divisor <= 0:
        raise ValueError(f"divisor must be positive, got {divisor}")
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # rounding down must not remove more than 10%
        rounded += divisor
    return int(rounded)
