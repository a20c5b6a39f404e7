"""The deviceless GPU kernel count: thunk counting (on CPU programs) and the command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks.gpu_kernel_count import count_thunks

ROOT = Path(__file__).resolve().parents[1]


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_loop_bodies_count_once_per_trip():
    x = jnp.ones((32, 32), jnp.float32)

    def loop(trips):
        return lambda v: jax.lax.fori_loop(0, trips, lambda i, v: jnp.sin(v) @ v, v)

    totals = {t: sum(count_thunks(_compiled_text(loop(t), x))[0].values()) for t in (3, 6, 9)}
    per_trip = (totals[6] - totals[3]) / 3
    assert per_trip >= 1
    assert totals[9] - totals[6] == 3 * per_trip  # linear in the trip count
    by_source, by_kind = count_thunks(_compiled_text(lambda v: jnp.sin(v) @ v, x))
    assert sum(by_kind.values()) == sum(by_source.values()) >= 1
    assert all(":" in s or s == "?" for s in by_source)  # file:function of the source line


def test_text_without_an_entry_computation_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        count_thunks("HloModule m\n")


def test_command_line_compiles_for_a_gpu_or_names_the_missing_plugin():
    """Without the CUDA plugin the script stops with one line saying what to install;
    with it, the batch-1 encoder compiles for an H200 and its thunks are counted."""
    plugin = importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "benchmarks/gpu_kernel_count.py")
    run = subprocess.run(
        [sys.executable, script, "--target", "encoder", "--batch", "1", "--top", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if not plugin:
        assert run.returncode == 2, run.stderr[-2000:]
        assert "install the CUDA plugin" in run.stderr and "Traceback" not in run.stderr
        return
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["target"] == "encoder" and result["thunks"] > 100
    assert any("cudnn" in kind for kind in result["by_kind"])  # fused attention on the GPU
