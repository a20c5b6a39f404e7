"""The training-step profiler attributes the step's op time to the model's modules."""

from __future__ import annotations

import json

import pytest

from benchmarks import profile_train_step


@pytest.mark.slow  # a whole training step compiled and traced (the encoder test covers the tool)
def test_profile_maps_ops_to_modules(capsys):
    args = "--device cpu --variant tiny --clicks 2 --repeats 1 --top 3".split()
    assert profile_train_step.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cats = result["by_category_ms"]
    modules = {key.split("/")[0] for key in cats}
    assert {"image encoder", "mask decoder", "loss", "upsampling", "optimizer"} <= modules
    # Both directions and both places are seen: the click loop and the encoder's backward.
    assert any(key.endswith("/bwd/loop") for key in cats)
    assert "image encoder/bwd/main" in cats
    assert result["unmapped_ms"] < 0.05 * result["summed_op_ms"]
    assert sum(result["ops_by_category"].values()) <= result["ops_per_call"] + 1e-6


def test_encoder_profile_by_source(capsys, tmp_path):
    args = "--device cpu --variant tiny --target encoder --by source --repeats 1 --top 3".split()
    assert profile_train_step.main([*args, "--dump-hlo", str(tmp_path / "encoder.hlo")]) == 0
    assert (tmp_path / "encoder.hlo").read_text().startswith("HloModule")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sources = {key.split("/")[0] for key in result["by_category_ms"]}
    # Rows name the project's functions: the attention and MLP of the encoder blocks.
    assert "common.py:MLPBlock.__call__" in sources
    assert any(s.startswith("image_encoder.py:Attention.") for s in sources)
    assert all(key.endswith("/fwd/main") for key in result["by_category_ms"])
    assert result["ops_per_call"] > 0
