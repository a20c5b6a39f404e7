"""The benchmark harness's timing helper and variant names."""

from __future__ import annotations

import pytest

from benchmarks.run import cpu_model, interleaved_medians, parse_variant, variant_key


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


def test_cpu_model_names_the_generation(tmp_path):
    info = tmp_path / "cpuinfo"
    core = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
    core += "model name\t: AMD EPYC\nstepping\t: 1\n\n"
    info.write_text(core.format(0) + core.format(1).replace("26", "25"))
    assert cpu_model(info) == "AMD EPYC (cpu family 26, model 2, stepping 1)"  # first CPU only
    assert cpu_model(tmp_path / "missing")  # falls back to the platform's name
