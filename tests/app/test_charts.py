"""Axis ticks of the server-rendered charts."""

from __future__ import annotations

import math

import pytest

from app.charts import log_ticks


@pytest.mark.parametrize("low,high", [(0.08, 0.35), (0.05, 0.1), (1e-3, 10), (0.2, 0.9), (0.7, 1.2), (3, 400)])
def test_log_ticks_are_round_spaced_and_inside(low, high):
    ticks = log_ticks(low, high)
    assert len(ticks) >= 3 and ticks == sorted(ticks)
    assert all(low <= t <= high for t in ticks)
    gap = (math.log10(high) - math.log10(low)) / 7
    assert all(math.log10(b / a) >= gap - 1e-12 for a, b in zip(ticks, ticks[1:]))  # never crowded
    assert all(round(t / 10 ** math.floor(math.log10(t)), 9) in range(1, 10) for t in ticks)  # one digit


def test_a_power_of_ten_wins_over_the_digit_next_to_it():
    ticks = log_ticks(0.085, 0.35)  # 0.09 and 0.1 are too close to both be shown
    assert 0.1 in ticks and 0.09 not in ticks


def test_a_count_axis_has_whole_ticks():
    """The training page's dead latents: 0 or 1 latents is not an axis with 0.5 on it."""
    from app.charts import training_charts

    curve = {"tokens": [1024, 11264, 21504], "fvu": [0.7, 0.4, 0.3], "dead": [0, 1, 0]}
    fvu, dead = training_charts(curve)
    assert [tick.label for tick in dead.y_ticks] == ["0", "1"]
    assert [tick.label for tick in dead.x_ticks] == [tick.label for tick in fvu.x_ticks] and "10k" in [t.label for t in fvu.x_ticks]
    assert [len(line.points) for line in fvu.lines + dead.lines] == [3, 3]
