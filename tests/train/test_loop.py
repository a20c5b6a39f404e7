"""`train.py` end to end: resume after kill -9 is exact, SIGTERM saves, NaN stops the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import REPO

# Small and fast: the tiny model, 2 clicks per step, one checkpoint every 3 steps.
FAST = [
    "--config.train.num_clicks=2",
    "--config.train.no_point_low=0",
    "--config.train.no_point_high=0",
    "--config.data.batch_size=2",
    "--config.log_every=1",
    "--config.checkpoint_every=3",
    "--config.eval_every=1000",
    "--config.val.root=",
    "--config.optim.schedule=constant",
]


def train_cmd(workdir: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--workdir={workdir}",
        f"--config.total_steps={steps}",
        *FAST,
        *extra,
    ]


def run(workdir: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(workdir, steps, *extra), cwd=REPO, capture_output=True, text=True, timeout=900
    )


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def params_at(workdir: Path, step: int) -> dict[str, np.ndarray]:
    from sammed3d_jax.checkpoint import _restore_model_parts

    tree = _restore_model_parts(workdir / "checkpoints" / str(step) / "state")
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}")
        else:
            flat[prefix] = np.asarray(node)

    walk(tree["params"], "")
    return flat


def in_process_config(steps: int, eval_every: int):
    """The demo config, small as FAST, with a two-item held-out evaluation."""
    from configs.cpu_demo import get_config

    config = get_config(f"steps={steps},batch=2")
    config.train.num_clicks = 2
    config.train.no_point_low = config.train.no_point_high = 0
    config.val.max_items = 2
    config.val.batch_size = 2
    config.val.clicks = (1,)
    config.eval_every = eval_every
    return config


def wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-3000:]}")
        f = workdir / "metrics.jsonl"
        if f.exists() and any(s >= step for s in losses(workdir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_resume_after_kill_is_exact(tmp_path, capsys):
    straight = tmp_path / "straight"
    proc = run(straight, 6)
    assert proc.returncode == 0, proc.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    p = subprocess.Popen(
        train_cmd(interrupted, 6, "--config.async_checkpointing=False"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_step(interrupted, 4, p)  # the step-3 checkpoint exists, step 4 ran
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    assert (interrupted / "checkpoints" / "3").is_dir()
    assert not (interrupted / "checkpoints" / "6").exists()
    proc = run(interrupted, 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 3" in proc.stderr
    # The resumed run's step is the straight run's program: read back, not compiled again.
    assert "train step loaded from the compilation cache" in proc.stderr

    a, b = losses(straight), losses(interrupted)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bitwise: same data order, same arithmetic
    pa, pb = params_at(straight, 6), params_at(interrupted, 6)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)

    # A workdir is a checkpoint too: its latest parameters load, and inference uses the grid
    # spacing the run trained on (the default config's 3 mm) unless told otherwise.
    from flax import nnx

    from sammed3d_jax.__main__ import main
    from sammed3d_jax.checkpoint import CheckpointError, load_model

    loaded = nnx.to_flat_state(nnx.state(load_model(straight), nnx.Param))
    flat = {"/" + "/".join(str(k) for k in path): v.get_value() for path, v in loaded}
    assert {k.removesuffix("/value") for k in pa} == flat.keys()
    for k, v in pa.items():
        np.testing.assert_array_equal(v, flat[k.removesuffix("/value")], err_msg=k)
    image = REPO / "demo_data" / "val" / "imagesTr" / "totalseg_ct_pelvis_0000.nii.gz"
    argv = ["segment", "--image", str(image), "--checkpoint", str(straight), "--point", "60,50,40"]
    assert main([*argv, "--out", str(tmp_path / "mask.nii.gz")]) == 0
    assert "3x3x3 mm grid" in capsys.readouterr().out

    # A damaged latest checkpoint (truncated array files) is one line naming its directory
    # and the step to fall back to, not orbax's tracebacks of reads left in flight.
    for f in (interrupted / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:100])
    proc = run(interrupted, 8)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "training failed" in x]
    assert f"{interrupted / 'checkpoints' / '6'}: cannot restore the training state" in line
    assert line.endswith("move it aside to resume from step 3")
    with pytest.raises(CheckpointError, match="checkpoints/6/state: cannot restore parameters"):
        load_model(interrupted)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "preempted"
    p = subprocess.Popen(
        train_cmd(workdir, 1000),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(workdir, 2, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]  # saved but unfinished: to be run again
    assert "SIGTERM" in err and "run the same command again to resume" in err
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and saved[-1] == max(losses(workdir))
    # A run told to stop before the saved step is refused, and nothing is rewritten.
    config = (workdir / "config.json").read_bytes()
    proc = run(workdir, saved[-1] - 1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"total_steps={saved[-1] - 1} is below step {saved[-1]}" in proc.stderr
    assert (workdir / "config.json").read_bytes() == config


@pytest.mark.slow
def test_sigterm_during_evaluation_still_saves(tmp_path):
    """The signal arrives after the step's (skipped) save, while the evaluation runs."""
    workdir = tmp_path / "preempted_in_eval"
    val = REPO / "demo_data" / "val"
    extra = [f"--config.val.root={val}", "--config.val.batch_size=2", "--config.eval_every=2"]
    p = subprocess.Popen(
        train_cmd(workdir, 1000, *extra, "--config.checkpoint_every=100"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(workdir, 2, p)  # step 2's training row is written before its evaluation
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved[-1] == max(losses(workdir)) >= 2, (saved, err[-2000:])
    # Resumed past the start of a profiled window: no trace to stop, the run finishes.
    window = f"--config.profile_steps=(1, {saved[-1] + 1})"
    proc = run(workdir, saved[-1] + 1, *extra, "--config.checkpoint_every=100", window)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_non_finite_loss_stops_with_step_and_metric(tmp_path):
    workdir = tmp_path / "nan"
    # Checkpoints every step, metrics logged every 5: a non-finite state is never saved.
    proc = run(
        workdir,
        20,
        "--config.optim.lr=1e30",
        "--config.optim.grad_clip_norm=0",
        "--config.checkpoint_every=1",
        "--config.log_every=5",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr and "train/" in proc.stderr
    assert "step " in proc.stderr.split("non-finite")[0].splitlines()[-1]
    bad = int(proc.stderr.split("non-finite")[0].split("step ")[-1].split(":")[0])
    saved = [int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()]
    assert all(s < bad for s in saved), (bad, saved)
    for s in saved:
        assert all(np.isfinite(v).all() for v in params_at(workdir, s).values())


@pytest.mark.slow
def test_training_files_lost_mid_run_stop_training(tmp_path):
    """Files deleted (or a data mount gone) during a run: the all-unreadable batches change
    no weight, and a few of them in a row stop the run with the data folder named."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / "demo_data" / "train", data)
    workdir = tmp_path / "lost"
    log = tmp_path / "stderr.txt"
    extra = [f"--config.data.root={data}", "--config.data.cache_items=0"]
    with log.open("w") as err:
        p = subprocess.Popen(
            train_cmd(workdir, 1000, *extra), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            end = time.time() + 600
            while not (workdir / "metrics.jsonl").exists() or not losses(workdir):
                assert p.poll() is None and time.time() < end, log.read_text()[-3000:]
                time.sleep(0.2)
            for image in data.rglob("*_0000.nii.gz"):
                image.unlink()
            p.wait(timeout=300)
        finally:
            p.kill()
    stderr = log.read_text()
    assert p.returncode == 3, stderr[-3000:]
    assert f"data.root {data}: no readable sample in 3 batches in a row" in stderr
    assert "Traceback" not in stderr


def test_rerun_without_checkpoint_rewrites_the_metrics(tmp_path):
    """A run that died before its first checkpoint starts over: its old rows (and a torn
    last line) are dropped, not appended to."""
    workdir = tmp_path / "restart"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 123.0}\n{"step": 2, "tr')
    # Without a cache chosen by the environment, the run keeps its compiled programs in the
    # workdir (config.compilation_cache = "auto").
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run(
        train_cmd(workdir, 1), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["train/loss"] != 123.0
    assert f"compilation cache: {workdir / 'compilation_cache'}" in proc.stderr
    assert any(
        p.name.startswith("jit_train_step") for p in (workdir / "compilation_cache").iterdir()
    )


def test_compilation_cache_setting(tmp_path):
    from sammed3d_jax.train.loop import use_compilation_cache

    saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert use_compilation_cache("auto", tmp_path / "w") == tmp_path / "w" / "compilation_cache"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "w" / "compilation_cache")
        # A folder the environment chose (JAX_COMPILATION_CACHE_DIR) is kept.
        assert (
            use_compilation_cache("auto", tmp_path / "other")
            == tmp_path / "w" / "compilation_cache"
        )
        assert use_compilation_cache(str(tmp_path / "c"), tmp_path / "w") == tmp_path / "c"
        assert use_compilation_cache("", tmp_path / "w") is None
        assert not jax.config.jax_enable_compilation_cache
        (tmp_path / "file").write_text("")
        for bad, match in [
            ("gs://bucket/cache", "compilation_cache=gs://bucket/cache: URLs are not supported"),
            (str(tmp_path / "file"), "exists and is not a folder"),
            (None, "compilation_cache must be a folder, 'auto' or ''"),
        ]:
            with pytest.raises(ValueError, match=match):
                use_compilation_cache(bad, tmp_path / "w")
    finally:
        jax.config.update("jax_enable_compilation_cache", saved[0])
        jax.config.update("jax_compilation_cache_dir", saved[1])


def test_bad_inputs_are_one_line_errors(tmp_path, fixtures_dir):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    other = fixtures_dir / "golden_small" / "checkpoint_train_format.pth"  # a larger model
    for extra, workdir, message in (
        ([f"--config.init_from={bad}"], tmp_path / "w1", f"{bad}: not a zip archive"),
        (
            [f"--config.init_from={other}"],
            tmp_path / "w0",
            "its architecture differs from config.model: encoder_embed_dim=96 (config.model: 48)",
        ),
        ([], "gs://bucket/run", "--workdir=gs://bucket/run: URLs are not supported"),
        (["--config.data.records=s3://b/shards"], tmp_path / "w3", "data.records=s3://b/shards"),
        ([f"--config.val.root={tmp_path}/nope"], tmp_path / "w4", f"val.root {tmp_path}/nope:"),
        ([f"--config.val.root={tmp_path}"], tmp_path / "w6", f"val.root: {tmp_path}: no dataset"),
        (["--config.val.batch_size=-1"], tmp_path / "w5", "val.batch_size must be"),
    ):
        proc = run(workdir, 1, *extra)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
    for refused in ("w0", "w1"):  # a refused start leaves neither a config nor checkpoints/
        assert {p.name for p in (tmp_path / refused).iterdir()} <= {".lock"}


def test_bad_config_flags_are_one_line_errors(tmp_path):
    """Problems that ml_collections reports as exceptions (at flag definition or while
    parsing) come out as one line naming the flag, exit status 2."""
    for args, message in (
        (["--config.train.num_clics=2"], "--config.train.num_clics=2: the config has no field"),
        (["--config", "configs/missing.py"], "--config configs/missing.py: [Errno 2]"),
        (["--config=configs/finetune.py:stepz=3"], "unknown config argument 'stepz'"),
        (["--config.optim.lr=fast"], "--config.optim.lr=fast: could not convert"),
        (["--config.train.num_clics"], "--config.train.num_clics"),
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "train.py"), f"--workdir={tmp_path}", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, (args, proc.stderr[-3000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not any(tmp_path.iterdir())


def test_bad_config_value_is_a_clear_error(tmp_path):
    proc = run(tmp_path / "bad", 2, "--config.data.root=/does/not/exist")
    assert proc.returncode == 2
    assert "/does/not/exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_default_main_job_learns(tmp_path):
    """`python train.py` (the README's first command): held-out Dice rises clearly."""
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/dice_5" in r]
    assert evals[-1]["eval/dice_5"] > evals[0]["eval/dice_5"] + 0.1
    for name in ("curves.png", "predictions.png", "config.json"):
        assert (workdir / name).exists()


@pytest.mark.slow
def test_sigterm_after_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    """A signal during the last step's evaluation: everything is saved, the run is done."""
    from sammed3d_jax.train import loop

    config = in_process_config(steps=2, eval_every=2)
    evaluate = loop.Evaluator.__call__
    calls = []

    def signalled(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluations run at steps 0 and 2
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(loop.Evaluator, "__call__", signalled)
    last = loop.train_and_evaluate(config, tmp_path / "run")  # no Preempted raised
    assert np.isfinite(last["train/loss"])
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert max(losses(tmp_path / "run")) == 2 and len(calls) == 2


@pytest.mark.slow
def test_stop_at_an_evaluation_step_defers_the_evaluation_to_the_resumed_run(tmp_path, monkeypatch):
    """A stop leaves the preemption's grace period to the save: the step's evaluation runs
    first thing in the resumed run."""
    from sammed3d_jax.train import loop

    config = in_process_config(steps=3, eval_every=1)
    config.async_checkpointing = False
    workdir = tmp_path / "run"
    stop = loop._Preemption.stop

    def stop_at_2(self, step):  # as a SIGTERM during step 2
        self.requested = self.requested or step == 2
        return stop(self, step)

    monkeypatch.setattr(loop._Preemption, "stop", stop_at_2)
    with pytest.raises(loop.Preempted):
        loop.train_and_evaluate(config, workdir)

    def eval_steps() -> list[int]:
        rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "eval/dice_1" in r]

    assert eval_steps() == [0, 1]  # not at the stop
    meta = json.loads((workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["eval_pending"] is True
    monkeypatch.undo()
    loop.train_and_evaluate(config, workdir)
    assert eval_steps() == [0, 1, 2, 3]
    assert "eval_pending" not in json.loads(
        (workdir / "checkpoints" / "3" / "meta" / "metadata").read_text()
    )


@pytest.mark.slow
def test_resume_on_another_item_list_is_named(tmp_path):
    """The saved position counts batches of one item list: a resume on another says so."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / "demo_data" / "train", data)
    workdir = tmp_path / "run"
    proc = run(workdir, 1, f"--config.data.root={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (data / "labelsTr" / "totalseg_ct_abdomen.nii.gz").unlink()  # a case with items
    (data / "imagesTr" / "totalseg_ct_abdomen_0000.nii.gz").unlink()
    proc = run(workdir, 2, f"--config.data.root={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "when checkpoint step 1 was saved: the resumed run does not continue" in proc.stderr
