"""Loading and saving model weights: converted Orbax checkpoints and PyTorch `.pth` files.

A converted checkpoint is a directory:

    OUT_DIR/
      params/                 Orbax checkpoint of the Flax parameter tree (float32)
      config.json             the `Sam3DConfig` (architecture inferred from the weights)
      conversion_report.json  source file and hash, where the weights were found, mapping

It is written to a temporary sibling directory and renamed into place, so a failed
conversion never leaves a partial directory behind.

A `train.py` workdir loads too (its latest checkpoint); its ``config.json`` also records the
grid spacing the model was trained on (:func:`recorded_spacing`), which inference and
evaluation use unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import nnx

from sammed3d_jax.convert.pth import PthError, find_state_dict, load_pth, save_pth
from sammed3d_jax.convert.torch_to_jax import (
    ConversionError,
    flax_state_to_torch,
    infer_config,
    strip_prefix,
    torch_to_flax_state,
)
from sammed3d_jax.files import current_umask, fsync_dir, fsync_tree, replace_durably, temp_prefix
from sammed3d_jax.model.config import NUMERIC_FIELDS, VARIANTS, Sam3DConfig, matching_variant
from sammed3d_jax.model.sam import Sam3D

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
REPORT_FILE = "conversion_report.json"


class CheckpointError(ValueError):
    """A checkpoint path is missing, unreadable or not a model checkpoint."""


def require_utf8_path(path: str | os.PathLike, what: str) -> None:
    """Orbax (through TensorStore) opens only paths that are valid UTF-8; a name holding
    other bytes fails inside it with a type-cast message. Raise `CheckpointError` first."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"{os.fsdecode(path)!r}: {what} folders must have names that are valid UTF-8 "
            "(Orbax cannot open others); rename it or link it under another name"
        ) from None


def restore_error(where: str | os.PathLike, what: str, error: BaseException) -> CheckpointError:
    """One-line `CheckpointError` for a failed Orbax restore of `where`.

    Orbax wraps TensorStore's reason (a truncated file, a missing array) in exceptions whose
    text is a multi-line spec dump; the innermost cause's first line names the array and the
    fault.
    """
    silence_orphaned_reads()
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = str(inner).strip().splitlines() or [type(inner).__name__]
    # A long first line ends with the system's reason ("No space left on device").
    reason = lines[0] if len(lines[0]) <= 400 else lines[0][:240] + " ... " + lines[0][-160:]
    return CheckpointError(f"{where}: {what}: {reason}")


_unraisable_filter_installed = False


def silence_orphaned_reads() -> None:
    """Drop the "Event loop is closed" tracebacks of reads a failed Orbax restore left in
    flight: they finish on the restore's closed event loop, one traceback per array, after
    the restore has already raised. Call before restoring (the first can land before an
    except clause runs)."""
    global _unraisable_filter_installed
    if _unraisable_filter_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _unraisable_filter_installed = True


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_torch_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Weights of a `.pth` file (any of the original's layouts) plus a description.

    Never imports torch and never runs code from the file.
    """
    obj = load_pth(path)
    state_dict, where = find_state_dict(obj, path=path)
    state_dict = dict(state_dict)
    stripped = strip_prefix(state_dict)
    first, first_stripped = next(iter(state_dict), ""), next(iter(stripped), "")
    prefix = first[: len(first) - len(first_stripped)]
    info: dict[str, Any] = {
        "weights_found_at": where,
        "ddp_prefix_stripped": "module." in prefix,
        "prefix_stripped": prefix,  # DDP's "module.", torch.compile's "_orig_mod.", nested
    }
    if isinstance(obj, dict) and where != "top level":
        info["other_top_level_keys"] = sorted(str(k) for k in obj if k != "model_state_dict")
        if "epoch" in obj and isinstance(obj["epoch"], int):
            info["epoch"] = obj["epoch"]
    return stripped, info


def model_from_state_dict(
    state_dict: dict[str, np.ndarray],
    cfg: Sam3DConfig | None = None,
    *,
    allow_custom_architecture: bool = False,
    **config_overrides: Any,
) -> tuple[Sam3D, Any]:
    """A `Sam3D` filled from a PyTorch state dict (architecture inferred when cfg is None).

    An inferred architecture must be a known variant unless `allow_custom_architecture`:
    the depths are counted from the keys present, so a checkpoint missing its last blocks
    (or every qkv bias) would otherwise load as a smaller model (ConversionError).
    """
    if cfg is None:
        cfg = infer_config(state_dict)
        if not allow_custom_architecture:
            require_known_architecture(cfg)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    nested, report = torch_to_flax_state(state_dict, cfg)
    model = nnx.eval_shape(lambda: Sam3D(cfg, rngs=nnx.Rngs(0)))
    _fill(model, nested)
    return model, report


def require_known_architecture(cfg: Sam3DConfig) -> None:
    """ConversionError unless `cfg`'s architecture is one of the registry's variants."""
    if matching_variant(cfg) is not None:
        return
    shown = ", ".join(
        f"{k}={getattr(cfg, k)}"
        for k in (
            "img_size",
            "encoder_embed_dim",
            "encoder_depth",
            "encoder_global_attn_indexes",
            "qkv_bias",
            "decoder_depth",
            "iou_head_depth",
        )
    )
    raise ConversionError(
        f"the weights describe an architecture of no known variant ({shown}; known: "
        f"{', '.join(sorted(VARIANTS))}): a checkpoint missing whole blocks would read as a "
        "smaller model. If this architecture is intended, allow it (convert_torch_weights.py "
        "--allow-custom-architecture, load_model(..., allow_custom_architecture=True))"
    )


def _fill(model: Sam3D, nested: dict) -> None:
    """Put `nested` (a pure dict of arrays) into the abstract `model`; every array must have
    the shape the model's config gives it (ValueError naming the first few that do not)."""
    state = nnx.state(model)
    expected = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)))
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(nested):
        want = expected.get(path)
        if want is not None and tuple(np.shape(leaf)) != tuple(want.shape):
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))} vs {want.shape}")
    if bad:
        raise ValueError(
            f"{len(bad)} parameter shape(s) differ from the model configuration (stored vs "
            f"configured): " + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
        )
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, nested))
    nnx.update(model, state)


_CHECKPOINT_ENTRIES = frozenset({CONFIG_FILE, PARAMS_DIR, REPORT_FILE})


def _atomic_dir(out_dir: Path, overwrite: bool):
    """Context manager: yields a temp dir that becomes `out_dir` on success."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists() and not overwrite:
            raise CheckpointError(f"{out_dir} already exists (pass overwrite to replace it)")
        if out_dir.exists() and not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} is a file, not a checkpoint directory to replace")
        if out_dir.is_dir():
            # Only what save_model writes may be replaced: never a folder of other files
            # (a dataset, the folder holding the source .pth, a training run).
            other = sorted({p.name for p in out_dir.iterdir()} - _CHECKPOINT_ENTRIES)
            if other:
                shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
                raise CheckpointError(
                    f"{out_dir} is not a converted checkpoint (it holds {shown}); refusing to "
                    f"replace it: choose a new folder or remove it yourself"
                )
        tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out_dir.name)}tmp-", dir=out_dir.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        try:
            yield tmp
            if out_dir.exists():
                # The new tree is on disk before the old one moves aside, so the two
                # renames are all that separates them.
                fsync_tree(tmp)
                old = out_dir.with_name(f"{temp_prefix(out_dir.name)}old-{os.getpid()}")
                os.replace(out_dir, old)
                try:
                    os.replace(tmp, out_dir)
                except BaseException:
                    os.replace(old, out_dir)
                    raise
                fsync_dir(out_dir.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                replace_durably(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return cm()


def save_model(
    model: Sam3D,
    out_dir: str | os.PathLike,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`'s weights and config as a converted checkpoint directory."""
    out_dir = Path(out_dir).absolute()
    require_utf8_path(out_dir, "checkpoint")
    pure = nnx.to_pure_dict(nnx.state(model))
    pure = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), pure)
    with _atomic_dir(out_dir, overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, _stringify_keys(pure))
        ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(model.config.replace(dtype="float32").to_json() + "\n")
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return out_dir


def _stringify_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def _restore_int_keys(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _restore_int_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def load_config(path: str | os.PathLike) -> Sam3DConfig:
    path = Path(path)
    f = path / CONFIG_FILE if path.is_dir() else path
    try:
        return Sam3DConfig.from_dict(json.loads(f.read_text()))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; is this a converted checkpoint?") from e
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{f}: invalid model config: {e}") from e


def _is_training_run(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoints").is_dir() and not (path / PARAMS_DIR).exists()


def weights_stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """What identifies the weights `load_model(path)` would load, cheaply: the step (for a
    training run) and a digest of the names, sizes and modification times of the files that
    hold the weights.

    Results computed under one stamp are not to be mixed with another's (a training run that
    saved a newer step, a `.pth` or converted folder replaced in place). None when `path`
    does not exist.
    """
    path = Path(path)

    def digest(*roots: Path) -> str:
        h = hashlib.sha256()
        for root in roots:
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            for f in files:
                st = f.stat()
                h.update(
                    f"{f.relative_to(root.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                        errors="surrogateescape"
                    )
                )
        return h.hexdigest()[:16]

    try:
        if not path.exists():
            return None
        if path.is_file():
            return {"files": digest(path)}
        if _is_training_run(path):
            steps = [int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit()]
            if not steps:
                return {"step": None}
            step = max(steps)
            return {"step": step, "files": digest(path / "checkpoints" / str(step) / "state")}
        for need, is_there in ((CONFIG_FILE, Path.is_file), (f"{PARAMS_DIR}/", Path.is_dir)):
            if not is_there(path / need.rstrip("/")):
                raise CheckpointError(
                    f"{path}: no {need}; not a converted checkpoint or a training run's folder"
                )
        return {"files": digest(path / PARAMS_DIR, path / CONFIG_FILE)}
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e


def recorded_spacing(path: str | os.PathLike) -> tuple[float, float, float] | None:
    """The model-grid spacing (mm) a checkpoint was trained on, where the checkpoint says.

    A `train.py` workdir records its data spacing (``data.spacing`` in its ``config.json``);
    converted checkpoints and `.pth` files do not (the released models use 1.5 mm): None.

    Raises:
      CheckpointError: a workdir whose ``config.json`` is unreadable or holds an invalid
        spacing.
    """
    path = Path(path)
    if not _is_training_run(path):
        return None
    f = path / "config.json"
    try:
        value = json.loads(f.read_text())["data"]["spacing"]
        spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(value, float), (3,)))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: training run without config.json") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: no valid data.spacing: {e}") from e
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise CheckpointError(f"{f}: data.spacing must be positive, got {value}")
    return spacing  # type: ignore[return-value]


def _training_run_model(path: Path, **config_overrides: Any) -> Sam3D:
    """Parameters of the latest checkpoint of a `train.py` workdir."""
    f = path / "config.json"
    try:
        model_cfg = dict(json.loads(f.read_text())["model"])
        cfg = Sam3DConfig.from_variant(model_cfg.pop("variant"), **model_cfg)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: no valid model config ({type(e).__name__}: {e})") from e
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
        raise CheckpointError(f"{path}: training run has no checkpoint yet")
    model = nnx.eval_shape(lambda: Sam3D(cfg, rngs=nnx.Rngs(0)))
    like = nnx.to_pure_dict(nnx.state(model))
    state_dir = path / "checkpoints" / str(steps[-1]) / "state"
    silence_orphaned_reads()
    try:
        restored = _restore_model_parts(state_dir.absolute())
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise restore_error(state_dir, "cannot restore parameters", e) from e
    merged: dict = {}
    for part in ("params", "rest"):
        _deep_update(merged, _strip_value(restored[part]))
    try:
        _fill(model, _restore_int_keys(merged, like))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{state_dir}: parameters do not match {cfg}: {e}") from e
    return model


def _restore_model_parts(state_dir: Path) -> dict:
    """The model's parts ("params", "rest") of a training state as host arrays; the
    optimizer state (twice the parameters' size for Adam) is not read."""
    ckptr = ocp.PyTreeCheckpointer()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # "no _CHECKPOINT_METADATA": expected here
    try:
        meta = ckptr.metadata(state_dir)
    finally:
        absl_logging.set_verbosity(verbosity)
    tree = getattr(getattr(meta, "item_metadata", None), "tree", None) or meta.tree
    parts = {k: tree[k] for k in ("params", "rest") if k in tree}
    as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
    args = ocp.args.PyTreeRestore(
        item=jax.tree_util.tree_map(lambda _: 0, parts),
        restore_args=jax.tree_util.tree_map(lambda _: as_numpy, parts),
        partial_restore=True,
    )
    return ckptr.restore(state_dir, args=args)


def _strip_value(tree: Any) -> Any:
    """nnx.State checkpoints store each variable as {"value": array}."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _strip_value(v) for k, v in tree.items()}
    return tree


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _deep_update(dst.setdefault(k, {}), v)
        else:
            dst[k] = v


def load_model(
    path: str | os.PathLike, *, allow_custom_architecture: bool = False, **config_overrides: Any
) -> Sam3D:
    """Load a model from a converted checkpoint directory or directly from a `.pth` file.

    A `train.py` workdir also works: its latest checkpoint's parameters are loaded. A `.pth`
    file's architecture is read from its keys and must be a known variant unless
    `allow_custom_architecture` (see :func:`model_from_state_dict`).

    `config_overrides` change numerics only (e.g. ``dtype="bfloat16"``,
    ``window_attention="padded"``); the architecture always comes from the checkpoint.
    """
    path = Path(path)
    not_numeric = sorted(set(config_overrides) - set(NUMERIC_FIELDS))
    if not_numeric:
        raise ValueError(
            f"load_model overrides numerics only ({', '.join(NUMERIC_FIELDS)}); "
            f"{', '.join(not_numeric)} cannot be changed when loading (the architecture comes "
            "from the checkpoint)"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        try:
            state_dict, _ = read_torch_checkpoint(path)
        except PthError as e:  # not a ValueError: name the file for every caller
            raise CheckpointError(str(e)) from e
        try:
            model, _ = model_from_state_dict(
                state_dict, allow_custom_architecture=allow_custom_architecture, **config_overrides
            )
        except ConversionError as e:
            raise CheckpointError(f"{path}: {e}") from e
        return model
    require_utf8_path(path.absolute(), "checkpoint")
    if _is_training_run(path):
        return _training_run_model(path, **config_overrides)
    cfg = load_config(path)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    model = nnx.eval_shape(lambda: Sam3D(cfg, rngs=nnx.Rngs(0)))
    like = nnx.to_pure_dict(nnx.state(model))
    target = _stringify_keys(
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), like)
    )
    params = path / PARAMS_DIR
    if not params.exists():
        raise CheckpointError(
            f"{path}: no {PARAMS_DIR}/ directory; is this a converted checkpoint?"
        )
    silence_orphaned_reads()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params.absolute(), target)
    except Exception as e:  # orbax raises many types for structure/shape mismatches
        raise restore_error(params, "cannot restore parameters", e) from e
    try:
        _fill(model, _restore_int_keys(restored, like))
    except ValueError as e:  # the stored arrays do not fit config.json
        raise CheckpointError(f"{params}: {e}") from e
    return model


def export_pth(model: Sam3D, out_path: str | os.PathLike, bare: bool = False) -> Path:
    """Write a `.pth` the original code and medim load: ``{"model_state_dict": ...}``.

    With `bare`, the file holds the state dict itself (what `build_sam3D(checkpoint=...)`
    expects). Written atomically; no PyTorch needed.
    """
    state_dict = flax_state_to_torch(nnx.state(model))
    obj = state_dict if bare else {"model_state_dict": state_dict}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_pth(out_path, obj)
    return Path(out_path)
