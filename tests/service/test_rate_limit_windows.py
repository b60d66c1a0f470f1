"""The in-process moving windows of ``ftune serve``'s rate limits: the rate holds, the window
moves, and no thread is started per hit."""

from __future__ import annotations

import threading
import time

from limits import parse

from ftune.service.ratelimit import InProcessWindows


def test_a_key_gets_its_rate_per_window_and_the_window_moves():
    windows, rate = InProcessWindows(), parse("3/second")
    started = time.time()
    assert [windows.hit(rate, "predictions", "k1") for _ in range(4)] == [True] * 3 + [False]
    assert windows.hit(rate, "predictions", "k2")  # another key has its own window
    assert started + 1 <= windows.reset_time(rate, "predictions", "k1") <= time.time() + 1
    time.sleep(1.05)
    assert windows.hit(rate, "predictions", "k1")  # the oldest hits left the window


def test_hits_start_no_threads():
    windows, rate = InProcessWindows(), parse("1000000/minute")
    before = threading.active_count()
    for _ in range(2000):
        windows.hit(rate, "predictions", "k")
        time.sleep(0)
    assert threading.active_count() == before
