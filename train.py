"""Train SAM-Med3D (from scratch or fine-tuning converted PyTorch weights).

    python train.py                                          # built-in CPU demo run
    python train.py --config configs/finetune.py:init_from=ckpt/turbo,data=/data/train \
        --workdir runs/ft --config.optim.lr=8e-5
    python train.py --config configs/pretrain.py --workdir /gcs/bucket/run   # pods/clusters

Resumes automatically from the latest checkpoint in --workdir. Multi-host runs start one
process per host; the cluster is detected (TPU pods, SLURM) or given with the flags below.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(REPO / "configs" / "cpu_demo.py"), "Python config file[:args].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sammed3d_jax.train.loop import NonFiniteError, Preempted, train_and_evaluate

    config = FLAGS.config
    with config.unlocked():
        if FLAGS.coordinator_address:
            config.distributed.coordinator_address = FLAGS.coordinator_address
        if FLAGS.num_processes is not None:
            config.distributed.num_processes = FLAGS.num_processes
        if FLAGS.process_id is not None:
            config.distributed.process_id = FLAGS.process_id
    workdir = FLAGS.workdir
    if workdir is None:
        name = Path(flags.FLAGS["config"].config_filename.split(":")[0]).stem
        workdir = str(REPO / "runs" / name)
    try:
        final = train_and_evaluate(config, workdir)
    except Preempted as e:
        # 128 + SIGTERM, as if the signal had ended the process: not "done", so job
        # controllers and retry loops start the run again, and it resumes.
        logging.warning("%s; run the same command again to resume", e)
        return 143
    except NonFiniteError as e:
        logging.error("training stopped: %s", e)
        return 3
    except (ValueError, OSError) as e:
        logging.error("training failed: %s", e)
        return 2
    summary = " ".join(f"{k}={v:.4g}" for k, v in sorted(final.items()))
    logging.info("done; workdir %s; %s", workdir, summary)
    return 0


if __name__ == "__main__":
    app.run(main)
