import pytest

from hwslim.core.rounding import make_divisible
from hwslim.core.units import GRID_STEPS, ChannelUnit, step_width, width_grid


@pytest.mark.parametrize("value,divisor,expected", [
    (48.0, 8, 48), (32 * 1.5, 8, 48), (1280 * 0.35, 8, 448), (16 / 12, 8, 8), (100, 8, 104),
    (37, 16, 48), (20, 32, 32), (0.1, 8, 8),
])
def test_make_divisible(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


def test_make_divisible_never_drops_more_than_ten_percent():
    for v in range(8, 2000):
        r = make_divisible(v)
        assert r % 8 == 0 and r >= 0.9 * v


def test_grid_is_twelve_rounded_steps():
    assert width_grid(96) == tuple(range(8, 97, 8))
    assert len(width_grid(1920)) == GRID_STEPS
    assert width_grid(1920)[0] == 160 and width_grid(1920)[-1] == 1920
    assert width_grid(16) == (8, 16)


@pytest.mark.parametrize("divisor", [8, 16, 32])
def test_grid_respects_divisor_and_max(divisor):
    for max_width in (24, 40, 144, 200, 1280, 2048):
        grid = width_grid(max_width, divisor)
        assert grid[-1] == max_width
        assert all(w % divisor == 0 for w in grid[:-1])
        assert list(grid) == sorted(set(grid)) and all(w <= max_width for w in grid)


def test_step_width_and_narrower():
    assert step_width(96, 6) == 48
    assert step_width(96, 12) == 96
    unit = ChannelUnit.build("u", 96)
    assert unit.narrower(96) == 88
    assert unit.narrower(8) is None
    with pytest.raises(ValueError):
        step_width(96, 13)
