"""The one grid + bisection search behind selection.greedy and faithfulness.minimal_circuit."""

from __future__ import annotations

import pytest

from circuitkit import CircuitkitError
from circuitkit.circuits.selection import bisect_top_n, log_sizes


def _curve(values: dict[int, float]):
    calls: list[int] = []

    def effect(n: int) -> float:
        calls.append(n)
        return values[n]
    return effect, calls


def test_bisection_finds_the_first_crossing_after_the_grid_point_before():
    f = {n: 0.1 * n for n in range(0, 17)}  # crosses 0.9 at 9
    effect, calls = _curve(f)
    sizes = [1, 2, 4, 8, 16]
    n, fn, reached = bisect_top_n(sizes, [f[s] for s in sizes], 0.9, effect)
    assert (n, reached) == (9, True) and fn == pytest.approx(0.9)
    assert set(calls) <= set(range(9, 16)) and 8 not in calls  # only sizes strictly between 8 and 16


def test_the_first_grid_point_that_reaches_wins_over_later_ones():
    # not monotone: 4 reaches, 8 does not, 16 does; the search refines between 2 and 4
    f = {0: 0.0, 1: 0.2, 2: 0.5, 3: 0.95, 4: 0.92, 8: 0.7, 16: 1.0}
    effect, calls = _curve(f)
    sizes = [1, 2, 4, 8, 16]
    assert bisect_top_n(sizes, [f[s] for s in sizes], 0.9, effect) == (3, 0.95, True)
    assert calls == [3]


def test_first_grid_point_is_bisected_against_zero_and_unreached_gives_the_last():
    f = {1: 0.3, 2: 0.9, 3: 0.95, 4: 0.97}
    effect, calls = _curve(f)
    assert bisect_top_n([4], [0.97], 0.9, effect) == (2, 0.9, True)
    assert calls == [2, 1]
    effect, calls = _curve({})
    assert bisect_top_n([1, 2, 4], [0.1, 0.2, 0.3], 0.9, effect) == (4, 0.3, False) and calls == []
    with pytest.raises(CircuitkitError, match="ascending"):
        bisect_top_n([4, 2], [0.1, 0.2], 0.9, effect)
    with pytest.raises(CircuitkitError, match="one explained effect per grid size"):
        bisect_top_n([1, 2], [0.1], 0.9, effect)


def test_log_sizes_cover_the_small_end_and_the_whole_graph():
    s = log_sizes(479)
    assert s[:8] == list(range(1, 9)) and s[-1] == 479 and s == sorted(set(s))
    assert log_sizes(3) == [1, 2, 3]
