"""The adaptive credit window (`mesh._work._window`): pure sizing rules."""

from __future__ import annotations

from mesh._work._window import LATENCY, MIN_WINDOW, RTT_MULTIPLE, horizon, initial, next_window


def test_a_slow_worker_shrinks_by_half_per_step_down_to_the_floor() -> None:
    window, steps = initial(8192), []
    while window > MIN_WINDOW:
        window = next_window(window, rate=100.0, starved=False, prefetch=8192)
        steps.append(window)
    assert steps == [128, 64, 32, 16]
    assert next_window(window, rate=0.0, starved=False, prefetch=8192) == MIN_WINDOW


def test_a_starved_worker_doubles_up_to_its_round_trips_worth_never_beyond_prefetch() -> None:
    # 1,000 messages/s through a window of 256 is a round trip of ~0.25 s: the window
    # doubles while it is credit-bound, up to four round trips of the rate it reaches
    window, steps = 256, []
    for _ in range(7):
        window = next_window(window, rate=window / 0.25, starved=True, prefetch=8192, rtt=0.25)
        steps.append(window)
    assert steps == [512, 1024, 2048, 4096, 8192, 8192, 8192]


def test_a_starved_worker_grows_no_further_than_its_horizon_and_never_shrinks() -> None:
    # loopback (round trip 0.1 ms) at 1,000,000 messages/s: the horizon is LATENCY
    aim = int(1_000_000 * LATENCY)
    window = 256
    for _ in range(10):
        window = next_window(window, rate=1_000_000.0, starved=True, prefetch=8192, rtt=0.0001)
    assert window == aim
    # a round trip longer than measured lowers the rate the window yields: it holds
    assert next_window(4096, rate=100_000.0, starved=True, prefetch=8192, rtt=0.0001) == 4096


def test_a_fast_worker_aims_at_the_horizon_of_its_rate() -> None:
    assert next_window(256, rate=300_000.0, starved=False, prefetch=8192) == int(300_000 * LATENCY)
    assert next_window(256, rate=100_000_000.0, starved=False, prefetch=8192) == 8192
    # a long round trip stretches the horizon: the credit must come back in time
    assert horizon(0.01) == RTT_MULTIPLE * 0.01
    assert next_window(256, rate=100_000.0, starved=False, prefetch=8192, rtt=0.01) == \
        int(100_000 * RTT_MULTIPLE * 0.01)


def test_a_small_prefetch_is_an_exact_fixed_window() -> None:
    for prefetch in (1, 4, MIN_WINDOW):
        assert initial(prefetch) == prefetch
        for rate, starved in ((0.0, False), (1e6, True), (50.0, True)):
            assert next_window(prefetch, rate, starved, prefetch) == prefetch
