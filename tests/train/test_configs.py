"""The shipped configs build valid settings, and run settings are checked before training."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import cpu_demo, finetune, pretrain
from sammed3d_jax.data.pipeline import DataConfig
from sammed3d_jax.train import loop
from sammed3d_jax.train.optim import OptimConfig


def _optim(config: ml_collections.ConfigDict) -> OptimConfig:
    return loop._dataclass_from(OptimConfig, config.optim, "optim")


@pytest.mark.parametrize(
    ("module", "arg"),
    [
        (cpu_demo, None),
        (cpu_demo, "steps=2"),
        (finetune, None),
        (finetune, "tiny"),
        (finetune, "steps=100"),
        (finetune, "steps=1000,accumulation=4"),
        (pretrain, None),
        (pretrain, "steps=1000,accumulation=4"),
    ],
)
def test_shipped_configs_are_valid(module, arg):
    config = module.get_config(arg)
    if not config.data.root:  # the pretrain and finetune configs are told where data are
        with pytest.raises(ValueError, match=r"no training data: set data\.root"):
            loop.check_config(config)
        config.data.records = "/data/shards"
    loop.check_config(config)
    cfg = loop.model_config(config)
    loop.data_config(config.data, cfg.img_size)
    _optim(config)


def test_pretrain_schedule_counts_optimizer_updates():
    optim = _optim(pretrain.get_config("steps=1000,accumulation=4"))
    assert optim.total_steps == 250 and optim.milestones == (150, 225)
    assert optim.grad_clip_norm is None  # the original clips nothing


def test_pretrain_pools_normalisation_over_the_originals_per_gpu_batch():
    assert pretrain.get_config().train.normalization_group == 12  # global batch 96
    assert pretrain.get_config("batch=20").train.normalization_group == 0
    config = cpu_demo.get_config()  # batch 4
    config.train.normalization_group = 3
    with pytest.raises(ValueError, match=r"train\.normalization_group=3 .*data\.batch_size=4"):
        loop.check_config(config)
    config.train.normalization_group = 2
    loop.check_config(config)


def test_finetune_schedule_counts_optimizer_updates(caplog):
    optim = _optim(finetune.get_config("steps=20000,accumulation=20"))
    assert (optim.total_steps, optim.warmup_steps, optim.accumulation_steps) == (1000, 100, 20)
    config = finetune.get_config("steps=20000,records=/data/shards")
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert not caplog.records
    config.optim.accumulation_steps = 20  # accumulation added without rescaling the schedule
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert "will not finish decaying" in caplog.text


def test_a_cosine_schedule_shorter_than_the_run_is_refused(caplog):
    config = cpu_demo.get_config("steps=20")
    config.total_steps = 120  # the schedule would sit at learning rate 0 for 100 steps
    with pytest.raises(ValueError, match=r"optim\.total_steps=20 .* set optim\.total_steps=120"):
        loop.check_config(config)
    config.optim.min_lr_ratio = 0.1  # it then trains on at the final rate: a warning
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert "ends before the run" in caplog.text


def test_multistep_milestones_beyond_the_run_are_named(caplog):
    config = finetune.get_config("steps=2000,records=/data/shards")
    config.optim.schedule = "multistep"  # milestones left at the pretraining defaults
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert "never decays at 120000, 180000" in caplog.text
    caplog.clear()
    config.optim.milestones = (1200, 1800)
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert "never decays" not in caplog.text
    config.optim.accumulation_steps = 2  # 1,000 updates: the milestones are never reached
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert "never decays at 1200, 1800" in caplog.text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"log_every": 0}, "log_every"),
        ({"eval_every": -1}, "eval_every"),
        ({"total_steps": True}, "total_steps"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
    ],
)
def test_bad_loop_values_are_named(override, message):
    config = cpu_demo.get_config()
    config.update(override)
    with pytest.raises(ValueError, match=message):
        loop.check_config(config)


def test_eval_every_zero_turns_in_training_evaluation_off():
    config = cpu_demo.get_config()
    assert config.val.root and config.eval_every > 0
    config.eval_every = 0
    loop.check_config(config)  # accepted
    assert not loop.Evaluator(config, None, None, None, 128, None).enabled


def test_config_arguments_are_typed_and_bad_ones_named():
    config = finetune.get_config("tiny=yes,steps=12,accumulation=2")
    assert config.model.variant == "tiny" and config.data.batch_size == 2
    assert config.total_steps == 12 and config.optim.accumulation_steps == 2
    assert config.optim.total_steps == 6  # the schedule counts optimizer updates
    assert finetune.get_config("tiny").total_steps == 50
    assert finetune.get_config("tiny=0").model.variant == finetune.get_config().model.variant
    assert finetune.get_config("batch=3").data.batch_size == 3
    for arg, message in (
        ("steps=1e3", r"steps='1e3': expected an integer"),
        ("tiny=maybe", r"tiny='maybe': expected one of"),
        ("bogus=1", r"unknown config argument 'bogus'"),
        ("steps=-5", r"steps=-5, accumulation=1: need"),
        ("steps=10,accumulation=20", r"steps >= accumulation"),
        ("batch=-2", r"batch=-2: must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            finetune.get_config(arg)
    with pytest.raises(ValueError, match="steps >= accumulation"):
        pretrain.get_config("steps=10,accumulation=20")


def test_bad_data_values_are_named():
    config = cpu_demo.get_config()
    config.val.clicks = (0,)
    with pytest.raises(ValueError, match=r"val\.clicks"):
        loop.check_config(config)
    config = cpu_demo.get_config()
    config.val.max_items = -1
    with pytest.raises(ValueError, match=r"val\.max_items must be an integer >= 0"):
        loop.check_config(config)
    with pytest.raises(ValueError, match=r"data\.spacing"):
        DataConfig(spacing=(0.0, 3.0, 3.0))
    config = cpu_demo.get_config()
    config.data.crop_size = 96
    with pytest.raises(ValueError, match="crop_size=96"):
        loop.data_config(config.data, 64)


def test_resume_with_another_architecture_is_refused(tmp_path):
    """A workdir's checkpoints only resume under the same model and optimizer structure."""
    config = cpu_demo.get_config()
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    cfg = loop.model_config(config)
    loop.check_resumable(tmp_path, config, cfg)  # same settings: fine
    numerics = cpu_demo.get_config()
    numerics.model.dtype = "bfloat16"  # numerics only: still resumable
    numerics.optim.lr = 1.0
    loop.check_resumable(tmp_path, numerics, loop.model_config(numerics))

    other = cpu_demo.get_config()
    other.model.variant = "small"
    with pytest.raises(ValueError, match=r"model\.encoder_embed_dim") as info:
        loop.check_resumable(tmp_path, other, loop.model_config(other))
    assert "new --workdir" in str(info.value)
    other = cpu_demo.get_config()
    other.optim.accumulation_steps = 2
    other.freeze_image_encoder = True
    with pytest.raises(ValueError, match=r"accumulation_steps: 1 -> 2.*freeze_image_encoder"):
        loop.check_resumable(tmp_path, other, loop.model_config(other))
    other = cpu_demo.get_config()
    other.optim.grad_clip_norm = 0.0
    with pytest.raises(ValueError, match="grad_clip_norm: True -> False"):
        loop.check_resumable(tmp_path, other, loop.model_config(other))
    other = cpu_demo.get_config()  # the saved data position counts global batches
    other.data.batch_size = 2 * config.data.batch_size
    other.seed = config.seed + 1
    with pytest.raises(ValueError, match=r"data\.batch_size: \d+ -> \d+; seed"):
        loop.check_resumable(tmp_path, other, loop.model_config(other))
    other = cpu_demo.get_config()  # another grid: inference would read the new spacing
    other.data.spacing = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"data\.spacing: \(3\.0, 3\.0, 3\.0\) -> \(1\.0"):
        loop.check_resumable(tmp_path, other, loop.model_config(other))
    other = cpu_demo.get_config()  # the data moved: resumable
    other.data.root = str(tmp_path / "moved")
    loop.check_resumable(tmp_path, other, loop.model_config(other))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["variant"] == "tiny"


def test_resume_check_reads_the_checkpoint_config(tmp_path):
    """Without config.json the newest checkpoint's own record of its config decides."""
    config = cpu_demo.get_config()
    meta = tmp_path / "checkpoints" / "5" / "meta" / "metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"config": json.loads(config.to_json_best_effort())}))
    loop.check_resumable(tmp_path, config, loop.model_config(config))
    other = cpu_demo.get_config()
    other.model.variant = "small"
    with pytest.raises(ValueError, match=r"model\.encoder_embed_dim"):
        loop.check_resumable(tmp_path, other, loop.model_config(other))


def test_tfds_source_is_settable():
    config = cpu_demo.get_config()
    assert loop.data_config(config.data, 64).tfds_dir is None
    config.data.tfds_dir = "/data/sammed3d_tfds/1.0.0"
    assert loop.data_config(config.data, 64).tfds_dir == "/data/sammed3d_tfds/1.0.0"


def test_workdirs_a_run_would_damage_are_refused(tmp_path):
    """A file, a converted model checkpoint, or a folder whose config.json is not a training
    run's: the run would write its config.json over it."""
    (tmp_path / "afile").write_text("x")
    model_ckpt = tmp_path / "ckpt"
    (model_ckpt / "params").mkdir(parents=True)
    (model_ckpt / "config.json").write_text('{"encoder_depth": 12}')
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{broken")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("x")
    for workdir, message in (
        (tmp_path / "afile", "is a file"),
        (blocked, "checkpoints is a file where the run keeps a folder"),
        (model_ckpt, "holds a converted model checkpoint"),
        (foreign, "not a training run's config"),
        (tmp_path / ("run" + os.fsdecode(b"\xff")), "--workdir folders must have names that are"),
    ):
        with pytest.raises(ValueError, match=message):
            loop.check_workdir(workdir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cpu_demo.get_config().to_json_best_effort())
    loop.check_workdir(run)  # an earlier run's own config: replaced on restart
    loop.check_workdir(tmp_path / "new")
    with pytest.raises(ValueError, match="--workdir is empty"):
        loop.train_and_evaluate(cpu_demo.get_config(), "")


def test_process_settings_without_a_coordinator_are_refused():
    dist = cpu_demo.get_config().distributed
    dist.process_id = 3
    with pytest.raises(ValueError, match="coordinator_address"):
        loop.maybe_initialize_distributed(dist)


def test_distributed_settings_reach_jax(monkeypatch):
    """Unset process counts are left for JAX to detect; device ids reach it on every path."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False, raising=False)
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    dist = cpu_demo.get_config().distributed
    dist.coordinator_address = "host:1234"
    loop.maybe_initialize_distributed(dist)
    assert calls[-1] == {
        "coordinator_address": "host:1234",
        "num_processes": None,
        "process_id": None,
    }
    dist = cpu_demo.get_config().distributed
    dist.local_device_ids = "0,1"
    monkeypatch.setenv("SLURM_NTASKS", "4")
    loop.maybe_initialize_distributed(dist)
    assert calls[-1] == {"local_device_ids": [0, 1]}
    dist.local_device_ids = "a"
    with pytest.raises(ValueError, match=r"distributed\.local_device_ids must be"):
        loop.maybe_initialize_distributed(dist)


def test_profile_steps_are_checked():
    config = cpu_demo.get_config()
    for good in ((), (0, 1), (10, 15)):
        config.profile_steps = good
        loop.check_config(config)
    for bad in ((5,), (5, 5), (7, 3), (-1, 2), (1, 2, 3), (True, 2), (1.5, 3)):
        config.profile_steps = bad
        with pytest.raises(ValueError, match="profile_steps must be"):
            loop.check_config(config)


def test_held_out_data_settings():
    """The held-out set keeps the training data's preparation but not its index file, which
    each set would otherwise rewrite for the other (a full rescan at every restart)."""
    config = cpu_demo.get_config()
    config.data.index_path = "/tmp/train_index.json"
    config.data.flip_prob = 0.5
    val = loop.val_data_config(config, 64)
    assert val.index_path is None and val.root == config.val.root
    assert val.flip_prob == 0.0 and val.min_crop_voxels == 1
    assert val.spacing == tuple(config.data.spacing) and val.eval_batch_size == 4


def test_data_loss_is_decided_over_every_process():
    """Batches in a row in which any process read no sample stop the run on every process
    at the same step; one good batch in between resets the count."""
    watch = loop._DataLossWatch("data.root /d", processes=2)
    no, host1, both = np.array([False, False]), np.array([False, True]), np.array([True, True])
    for step, flags in enumerate([host1, host1, no, host1, both]):
        watch.update(step, flags)
    with pytest.raises(loop.DataLostError, match=r"3 batches in a row on process\(es\) \[0, 1\]"):
        watch.update(5, host1)
    single = loop._DataLossWatch("data.root /d", processes=1)
    single.step(0, np.array([False, False]))
    single.step(1, np.array([False, True]))  # one readable sample: the count starts over
    single.step(2, np.array([False]))
    single.step(3, np.array([False]))
    with pytest.raises(
        loop.DataLostError,
        match=r"data.root /d: no readable sample in 3 batches in a row at step 4",
    ):
        single.step(4, np.array([False, False]))


def test_a_workdir_in_use_is_refused(tmp_path):
    """A second run on a workdir whose run still holds it stops before building anything."""
    import fcntl

    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        with pytest.raises(ValueError, match=r"another training run is using it \(pid 12345"):
            loop.train_and_evaluate(cpu_demo.get_config(), workdir)
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lr", -1.0, "optim.lr must be > 0"),
        ("b1", 1.5, r"optim.b1 must be in \[0, 1\)"),
        ("b2", 1.0, r"optim.b2 must be in \[0, 1\)"),
        ("eps", 0.0, "optim.eps must be > 0"),
        ("weight_decay", -0.1, "optim.weight_decay must be >= 0"),
        ("prompt_decoder_lr_mult", -1.0, "optim.prompt_decoder_lr_mult must be >= 0"),
        ("gamma", 0.0, "optim.gamma must be > 0"),
        ("min_lr_ratio", 2.0, r"optim.min_lr_ratio must be in \[0, 1\]"),
        ("schedule", "bogus", "optim.schedule must be 'multistep'"),
    ],
)
def test_optimizer_values_out_of_range_are_named(field, value, message):
    config = cpu_demo.get_config()
    config.optim[field] = value
    with pytest.raises(ValueError, match=message):
        _optim(config)


def test_accumulation_and_seed_are_checked(caplog):
    config = cpu_demo.get_config()
    config.total_steps = 3
    config.optim.accumulation_steps = 4
    with pytest.raises(ValueError, match="no optimizer update"):
        loop.check_config(config)
    config.optim.accumulation_steps = 2
    with caplog.at_level("WARNING"):
        loop.check_config(config)
    assert "the last 1 micro-batches are computed but never applied" in caplog.text
    config = cpu_demo.get_config()
    config.seed = -1
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        loop.check_config(config)


def test_section_errors_name_their_section():
    from sammed3d_jax.train.step import TrainConfig

    config = cpu_demo.get_config()
    config.train.num_clicks = 0
    with pytest.raises(ValueError, match=r"^train: num_clicks must be >= 1"):
        loop._dataclass_from(TrainConfig, config.train, "train")
