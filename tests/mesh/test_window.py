"""The adaptive credit window (`mesh._work._window`): pure sizing rules."""

from __future__ import annotations

from mesh._work._window import HORIZON, MIN_WINDOW, initial, next_window


def test_a_slow_worker_shrinks_by_half_per_step_down_to_the_floor() -> None:
    window, steps = initial(8192), []
    while window > MIN_WINDOW:
        window = next_window(window, rate=100.0, starved=False, prefetch=8192)
        steps.append(window)
    assert steps == [128, 64, 32, 16]
    assert next_window(window, rate=0.0, starved=False, prefetch=8192) == MIN_WINDOW


def test_a_starved_worker_doubles_up_to_prefetch_never_beyond() -> None:
    window, steps = 256, []
    for _ in range(7):
        window = next_window(window, rate=1000.0, starved=True, prefetch=8192)
        steps.append(window)
    assert steps == [512, 1024, 2048, 4096, 8192, 8192, 8192]


def test_a_fast_worker_aims_at_the_horizon_of_its_rate() -> None:
    assert next_window(256, rate=300_000.0, starved=False, prefetch=8192) == int(300_000 * HORIZON)
    assert next_window(256, rate=10_000_000.0, starved=False, prefetch=8192) == 8192


def test_a_small_prefetch_is_an_exact_fixed_window() -> None:
    for prefetch in (1, 4, MIN_WINDOW):
        assert initial(prefetch) == prefetch
        for rate, starved in ((0.0, False), (1e6, True), (50.0, True)):
            assert next_window(prefetch, rate, starved, prefetch) == prefetch
