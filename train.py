r"""Train SAM-Med3D (from scratch or fine-tuning converted PyTorch weights).

    python train.py                                          # built-in CPU demo run
    python train.py --config configs/finetune.py:init_from=ckpt/turbo,data=/data/train \
        --workdir runs/ft --config.optim.lr=8e-5
    python train.py --config configs/pretrain.py:records=/gcs/bucket/shards \
        --workdir /gcs/bucket/run                            # pods/clusters

Resumes automatically from the latest checkpoint in --workdir. Multi-host runs start one
process per host; the cluster is detected (TPU pods, SLURM) or given with the flags below.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS

# config_flags reads a bad `--config` file or `--config.<field>` override as an exception from
# inside ml_collections (at definition for the default file, else while parsing): these
# turn it into one line naming the flag.
_CONFIG_ERRORS = (AttributeError, KeyError, OSError, TypeError, ValueError)


def _config_problem(error: BaseException, argv: list[str]) -> str:
    """One line: which `--config` flag is wrong and why."""
    cause = error
    while isinstance(cause, flags.Error) and cause.__cause__ is not None:
        cause = cause.__cause__
    # ConfigDict raises AttributeError(KeyError("'field'\nDid you mean ...?"))
    while isinstance(cause, (AttributeError, KeyError)) and cause.args:
        if not isinstance(cause.args[0], BaseException):
            break
        cause = cause.args[0]
    if isinstance(cause, (AttributeError, KeyError)):
        text = str(cause.args[0]) if cause.args else str(cause)
        field, *hint = text.splitlines()
        field = field.strip("'\"")
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        hits = [a for a in overrides if field in a.split("=")[0].split(".")[1:]] or overrides
        return f"{', '.join(hits) or '--config'}: the config has no field {field!r}" + "".join(
            f"; {h.strip()}" for h in hint if h.strip()
        )
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    # config_flags folds the config file's own traceback, or the paths it tried, into the
    # message: its last line says what went wrong.
    msg = lines[-1] if lines else type(cause).__name__
    msg = re.sub(r"^\w+(Error|Exception): ", "", msg)
    return f"--config {_config_arg(argv)}: {msg}"


def _config_arg(argv: list[str]) -> str:
    """The `--config` value on the command line, or the default file."""
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "configs/cpu_demo.py (the default)"


def _exit_on_config_problem(error: BaseException, argv: list[str]) -> None:
    sys.stderr.write(f"train.py: {_config_problem(error, argv)}\n")
    sys.exit(2)


try:
    config_flags.DEFINE_config_file(
        "config",
        str(REPO / "configs" / "cpu_demo.py"),
        "Python config file[:args].",
        lock_config=True,
    )
except _CONFIG_ERRORS as e:
    _exit_on_config_problem(e, sys.argv)
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sammed3d_jax.train.loop import (
        DataLostError,
        NonFiniteError,
        Preempted,
        train_and_evaluate,
        use_compilation_cache,
    )

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
        cache = use_compilation_cache(config.get("compilation_cache", "auto"), workdir)
        logging.info("compilation cache: %s", cache or "off")
        final = train_and_evaluate(config, workdir)
    except Preempted as e:
        # 128 + SIGTERM, as if the signal had ended the process: not "done", so job
        # controllers and retry loops start the run again, and it resumes.
        logging.warning("%s; run the same command again to resume", e)
        return 143
    except (NonFiniteError, DataLostError) as e:
        logging.error("training stopped: %s", e)
        return 3
    except (ValueError, OSError) as e:
        logging.error("training failed: %s", e)
        return 2
    summary = " ".join(f"{k}={v:.4g}" for k, v in sorted(final.items()))
    logging.info("done; workdir %s; %s", workdir, summary)
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every problem as one line instead of a traceback."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when used
    except flags.Error as e:
        if isinstance(e.__cause__, _CONFIG_ERRORS) or "Traceback" in str(e):
            _exit_on_config_problem(e, argv)
        sys.stderr.write(f"train.py: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(2)
    except _CONFIG_ERRORS as e:
        _exit_on_config_problem(e, argv)
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
