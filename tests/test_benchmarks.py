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


def test_spread_over_processes():
    from benchmarks.repeat_processes import spread
    from benchmarks.run import target_report

    runs = [
        {"ratio_encoder_b1": 0.048, "encoder_b1_ms": 284.0, "device": "cpu", "only_here": 1},
        {"ratio_encoder_b1": 0.052, "encoder_b1_ms": 310.0, "device": "cpu"},
        {"ratio_encoder_b1": 0.049, "encoder_b1_ms": 290.0, "device": "cpu"},
    ]
    for r in runs:
        r["targets"] = target_report(r, "cpu")
    s = spread(runs)
    assert s["processes"] == 3 and "device" not in s and "only_here" not in s
    r = s["ratio_encoder_b1"]
    assert (r["median"], r["min"], r["max"], r["met"]) == (0.049, 0.048, 0.052, 2)
    assert (r["target"], r["better"]) == (0.05, "lower")
    assert s["encoder_b1_ms"]["median"] == 290.0 and "met" not in s["encoder_b1_ms"]


def test_targets_know_their_direction():
    """A throughput ratio meets its target from above, a time ratio from below."""
    from benchmarks.run import target_report

    marks = target_report(
        {
            "ratio_train_throughput": 10.5,
            "ratio_click_b1": 0.13,
            "ratio_encoder_best_throughput_vs_compiled": 17.3,
            "ratio_train_peak_memory": 0.3,
        },
        "gpu",
    )
    assert {k: m["met"] for k, m in marks.items()} == {
        "ratio_train_throughput": False,
        "ratio_click_b1": True,
        "ratio_encoder_best_throughput_vs_compiled": True,
        "ratio_train_peak_memory": False,
    }
    assert marks["ratio_train_throughput"]["better"] == "higher"


def test_a_side_failing_at_warm_up_keeps_the_other_timed():
    errors: dict[str, str] = {}

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    times = interleaved_medians(
        {"ours": (lambda: 1, lambda o: o), "torch": (out_of_memory, lambda o: o)}, 2, errors
    )
    assert set(times) == {"ours"}
    assert errors == {"torch": "RuntimeError: CUDA out of memory"}
    with pytest.raises(RuntimeError, match="out of memory"):  # without `errors`: raises
        interleaved_medians({"torch": (out_of_memory, lambda o: o)}, 2)


def test_dispatch_overhead_ways_agree_and_report_each_figure(capsys):
    import json

    from benchmarks.dispatch_overhead import WAYS, main

    assert main(["--variant", "tiny", "--repeats", "1", "--pipeline", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["packed_equals_separate"] is True
    sizes = result["weight_arrays"]
    assert sizes["packed"] < sizes["separate"]
    for way in WAYS:
        assert set(result[way]) == {"serial_ms", "dispatch_ms", "pipelined_ms"}
        assert all(v > 0 for v in result[way].values())
