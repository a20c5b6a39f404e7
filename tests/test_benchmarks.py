"""The benchmark harness's timing helper."""

from __future__ import annotations

from benchmarks.run import interleaved_medians


def test_interleaved_medians_runs_round_robin_after_one_warm_up_each():
    calls, synced = [], []

    def fn(name):
        return lambda: calls.append(name) or name

    times = interleaved_medians(
        {"ours": (fn("ours"), synced.append), "torch": (fn("torch"), synced.append)}, 3
    )
    assert calls == ["ours", "torch"] * 4  # warm-up round, then 3 timed rounds
    assert synced == calls  # every result is synced, inside the timed region
    assert set(times) == {"ours", "torch"} and all(t >= 0 for t in times.values())
