"""Two processes on localhost (4 fake CPU devices each, gloo collectives) train on one
8-device mesh, checkpoint, and the run resumes in a single process on 4 devices; the losses
equal those of a single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

COMMON = [
    "--config.train.num_clicks=1",
    "--config.train.no_point_low=0",
    "--config.train.no_point_high=0",
    "--config.data.batch_size=8",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.eval_every=1000",
    "--config.val.root=",
    "--config.optim.schedule=constant",
    "--config.async_checkpointing=False",
]


def env(devices: int, compilation_cache: bool = True) -> dict[str, str]:
    out = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    if not compilation_cache:  # two processes would write the same cache entries at once
        out.pop("JAX_COMPILATION_CACHE_DIR", None)
    return out


def cmd(workdir: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--workdir={workdir}",
        f"--config.total_steps={steps}",
        *COMMON,
        *extra,
    ]


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(
    workdir: Path, steps: int, *extra: str, devices: int, returncode: int = 0
) -> list[str]:
    """train.py as two processes on localhost; asserts both exit with `returncode`, returns
    their stderr."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                "timeout",
                "-k",
                "10",
                "600",
                *cmd(
                    workdir,
                    steps,
                    *extra,
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ),
            ],
            cwd=REPO,
            env=env(devices, compilation_cache=False),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=700)[1] for p in procs]
    for p, e in zip(procs, errs):
        assert p.returncode == returncode, e[-3000:]
    return errs


def test_two_processes_then_resume_with_one(tmp_path):
    single = tmp_path / "single"
    # The reference run uses the resumed run's 4 devices: the same compiled step.
    proc = subprocess.run(
        cmd(single, 4), cwd=REPO, env=env(4), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    errs = run_two_processes(multi, 2, devices=4)
    assert "process 0/2" in errs[0] and "process 1/2" in errs[1]
    assert (multi / "checkpoints" / "2").is_dir()

    proc = subprocess.run(
        cmd(multi, 4), cwd=REPO, env=env(4), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved by 2 process(es)" in proc.stderr

    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1])
def test_resume_on_fewer_devices(tmp_path, devices):
    """A checkpoint saved on an 8-device fsdp mesh restores onto one device."""
    work = tmp_path / "fsdp"
    proc = subprocess.run(
        cmd(work, 2, "--config.mesh.data=2", "--config.mesh.fsdp=4"),
        cwd=REPO,
        env=env(8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Its weights load for inference on one device (host arrays, not the saved sharding).
    load = (
        "import sys; from sammed3d_jax.checkpoint import load_model; "
        "m = load_model(sys.argv[1]); print(m.image_encoder.blocks[0].attn.qkv.kernel[...].shape)"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", load, str(work)],
        cwd=REPO,
        env=env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        cmd(work, 3, "--config.mesh.data=1", "--config.mesh.fsdp=1"),
        cwd=REPO,
        env=env(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(work)) == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_with_one_device_each(tmp_path):
    """One local device per process (a 2-device mesh over 2 hosts) trains and checkpoints."""
    work = tmp_path / "one_each"
    errs = run_two_processes(work, 2, devices=1)
    assert "2 devices (1 local)" in errs[0]
    assert (work / "checkpoints" / "2").is_dir()


@pytest.mark.slow
def test_batch_replicated_over_hosts_loads_the_same_samples(tmp_path):
    """A tensor axis across two processes: both hold every batch row, so both must load the
    same samples (the losses equal a one-process run of the same mesh)."""
    mesh = ["--config.mesh.data=1", "--config.mesh.tensor=2", "--config.data.batch_size=4"]
    single = tmp_path / "single"
    proc = subprocess.run(
        cmd(single, 2, *mesh), cwd=REPO, env=env(2), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = tmp_path / "multi"
    run_two_processes(multi, 2, *mesh, devices=1)
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2]
    np.testing.assert_allclose([b[1], b[2]], [a[1], a[2]], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    """Only one host gets the preemption notice: both save the same step and exit, instead
    of one saving while the other waits in the next step's collectives."""
    import signal
    import time

    work = tmp_path / "preempted"
    port = free_port()
    procs = [
        subprocess.Popen(
            cmd(
                work,
                1000,
                "--config.checkpoint_every=100",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=env(1, compilation_cache=False),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        end = time.time() + 600
        while not ((work / "metrics.jsonl").exists() and losses(work)):
            assert time.time() < end and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, e in zip(procs, errs):
        assert p.returncode == 143, e[-3000:]
    saved = sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and saved[-1] == max(losses(work)) < 1000
    assert all("saving a checkpoint at step" in e for e in errs)


def test_a_workdir_in_use_stops_every_process_with_one_line(tmp_path):
    """Only process 0 holds the workdir's lock: its refusal reaches the other process too,
    which exits with the same kind of one-line error instead of timing out in a collective."""
    import fcntl
    import time

    work = tmp_path / "busy"
    work.mkdir()
    with open(work / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another run would
        t0 = time.time()
        errs = run_two_processes(work, 2, devices=1, returncode=2)
    assert all("Traceback" not in e for e in errs), errs
    assert "another training run is using it" in errs[0]
    assert "refused by process 0" in errs[1]
    assert time.time() - t0 < 120  # no collective waited for its deadline
    assert not (work / "checkpoints").exists()
