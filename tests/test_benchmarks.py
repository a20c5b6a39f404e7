"""The benchmark harness's timing helper and variant names."""

from __future__ import annotations

import pytest

from benchmarks.run import interleaved_medians, parse_variant, variant_key


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


def test_variants_name_config_changes():
    assert parse_variant("cudnn") == ({"attention_impl": "cudnn"}, set())
    changes, flags = parse_variant("cudnn+exact+unroll+remat", train=True)
    assert changes == {"attention_impl": "cudnn", "gelu": "exact", "remat": True}
    assert flags == {"unroll", "remat"}
    assert variant_key("cudnn+tanh") == "cudnn_tanh"
    with pytest.raises(ValueError, match="unknown flag 'unroll'"):
        parse_variant("cudnn+unroll")  # a training flag is no encoder variant
    assert parse_variant("cudnn+scan", train=True)[1] == {"scan"}
    with pytest.raises(ValueError, match="exclude each other"):
        parse_variant("cudnn+scan+unroll", train=True)
    with pytest.raises(ValueError, match="unknown flag 'fast'"):
        parse_variant("cudnn+fast", train=True)
