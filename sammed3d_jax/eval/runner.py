"""Dataset-level interactive evaluation: resumable runs, summaries, plots.

``python evaluate.py --data DIR --checkpoint CKPT --protocol {sammed3d,cvpr25} --clicks N
--out OUT [--save-predictions] [--limit K] [--classes C ...]``

Every case of the dataset (:func:`sammed3d_jax.data.scan_dataset`, nnU-Net or SAM-Med3D
layout, sorted) and every foreground class of its label (or the requested ``--classes``
present in it) is run with the chosen protocol (:mod:`sammed3d_jax.eval.protocols`).

Output folder::

  OUT/run.json             settings of the run; a re-run with other settings (or other
                           weights: a newer step of a training run, a checkpoint
                           replaced in place) is refused
  OUT/cases/<case>.json    one result per case, written atomically when the case is done
  OUT/predictions/<case>.nii.gz   merged label map after the last click (--save-predictions)
  OUT/summary.json         nnU-Net style: metric_per_case, mean (per class), foreground_mean
  OUT/summary.csv          one row per (case, class), one per failed case
  OUT/dice_vs_clicks.png   mean Dice and NSD against the click number

Resuming: a case whose ``cases/<case>.json`` exists is not recomputed (failed cases neither,
unless ``--retry-failed``) while its image and label files are unchanged (size and
modification time, recorded when the case was read); the summary is rebuilt from the case files, so re-running a
finished or interrupted run gives the same summary. ``<case>`` is the case id, made unique
with the dataset, split and (SAM-Med3D layout) class folder when ids repeat.

Bad cases (missing file, not NIfTI, not 3D, image/label grid mismatch, empty label,
non-finite voxels, label values that are not integers in 0..255, none of the requested
``--classes`` present) are recorded as failed with their error and the run continues; files
the dataset scan skipped (a label without an image, an image without a label) are listed as
failed too, and its other remarks go to ``warnings``.

With ``--classes`` the ``sammed3d`` protocol's clicks differ from a run over every class (its
seeded random stream passes through the classes of a case in order): per-class results are
comparable with the original's only without ``--classes`` (a warning says so).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sammed3d_jax.data.layout import Case, LayoutError, scan_dataset
from sammed3d_jax.data.nifti import VolumeError, check_same_grid, load_volume, save_mask
from sammed3d_jax.eval.protocols import PROTOCOLS, CaseResult, run_protocol
from sammed3d_jax.files import check_output_file, write_atomic

__all__ = [
    "CliArgumentParser",
    "RunStats",
    "RunnerError",
    "add_arguments",
    "build_summary",
    "case_keys",
    "cli_errors",
    "evaluate_dataset",
    "main",
    "resolve_spacing",
    "run_from_args",
]

DEFAULT_CLICKS = {"sammed3d": 1, "cvpr25": 5}
SUMMARY_FILE = "summary.json"
CSV_FILE = "summary.csv"
PLOT_FILE = "dice_vs_clicks.png"
RUN_FILE = "run.json"
CASES_DIR = "cases"
PREDICTIONS_DIR = "predictions"


class RunnerError(ValueError):
    """The run cannot start (bad arguments, unusable output folder, checkpoint, data root)."""


# --------------------------------------------------------------------------------------
# Command-line plumbing shared with ``python -m sammed3d_jax``
# --------------------------------------------------------------------------------------


class CliArgumentParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


def _flag_error(flag: str, path: Any, exc: BaseException) -> str:
    """ "FLAG PATH: reason", without repeating the path where the reason starts with it."""
    reason = _one_line(exc)
    return f"{flag} {reason}" if reason.startswith(f"{path}") else f"{flag} {path}: {reason}"


@dataclasses.dataclass
class _Status:
    code: int = 0


def _input_errors() -> tuple[type[BaseException], ...]:
    from sammed3d_jax.checkpoint import CheckpointError
    from sammed3d_jax.convert.pth import PthError
    from sammed3d_jax.convert.torch_to_jax import ConversionError

    return (ValueError, OSError, CheckpointError, PthError, ConversionError)


@contextlib.contextmanager
def cli_errors() -> Iterator[_Status]:
    """Turn input errors into one ``error: ...`` line on stderr and status 2."""
    status = _Status()
    try:
        yield status
    except _input_errors() as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        status.code = 2


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN / inf → None, numpy scalars → Python numbers."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n"
    write_atomic(path, text.encode())


# --------------------------------------------------------------------------------------
# Case naming
# --------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "case"


def case_keys(cases: Sequence[Case]) -> list[str]:
    """Unique file-name-safe key per case: the case id, qualified only where ids repeat."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.case_id] = counts.get(c.case_id, 0) + 1
    keys = []
    for c in cases:
        if counts[c.case_id] == 1:
            keys.append(_safe(c.case_id))
            continue
        parts = [c.dataset, c.split, c.case_id]
        if c.label_path is not None and len(c.label_path.parts) >= 4:
            parts.insert(0, c.label_path.parts[-4])  # SAM-Med3D: <class>/<dataset>/labels/
        keys.append(_safe("__".join(parts)))
    seen: dict[str, int] = {}
    unique = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        unique.append(k if n == 0 else f"{k}__{n + 1}")
    return unique


# --------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------


def _class_ids(label_array: np.ndarray, path: Path, wanted: Sequence[int] | None) -> list[int]:
    values = np.unique(label_array)
    values = values[values != 0]
    if values.size == 0:
        raise VolumeError(f"{path}: the label has no foreground voxel")
    bad = [v for v in values.tolist() if not float(v).is_integer() or v < 0 or v > 255]
    if bad:
        raise VolumeError(
            f"{path}: label values must be integers in 0..255, found {bad[:5]}"
            + (" ..." if len(bad) > 5 else "")
        )
    present = [int(v) for v in values.tolist()]
    if wanted is None:
        return present
    chosen = sorted(set(present) & {int(c) for c in wanted})
    if not chosen:
        raise VolumeError(
            f"{path}: none of the requested classes {sorted(wanted)} is present "
            f"(label values {present})"
        )
    return chosen


def _file_stamp(path: Path | None) -> list[int] | None:
    """Size and modification time (ns) of an input file; None if it cannot be read."""
    try:
        st = Path(path).stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else [st.st_size, st.st_mtime_ns]


def _input_stamps(case: Case) -> dict[str, list[int] | None]:
    return {"image": _file_stamp(case.image_path), "label": _file_stamp(case.label_path)}


def _case_record(key: str, case: Case, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "case": key,
        "case_id": case.case_id,
        "dataset": case.dataset,
        "split": case.split,
        "image": str(case.image_path),
        "label": None if case.label_path is None else str(case.label_path),
        "inputs": _input_stamps(case),  # taken before reading: a later change is seen
        "fingerprint": fingerprint,
    }


def _result_to_json(result: CaseResult, names: dict[int, str]) -> dict[str, Any]:
    classes = {}
    for c, res in result.classes.items():
        classes[str(c)] = {
            "name": names.get(c),
            "dice": res.dice,
            "nsd": res.nsd,
            "dice_final": res.dice[-1],
            "nsd_final": res.nsd[-1],
            "clicks": [k.to_json() for k in res.clicks],
            "notes": res.notes,
        }
    out: dict[str, Any] = {"classes": classes}
    if result.image_level is not None:
        out["image_level"] = result.image_level
    return out


def evaluate_case(
    engine: Any,
    key: str,
    case: Case,
    *,
    protocol: str,
    num_clicks: int,
    classes: Sequence[int] | None,
    spacing: Sequence[float],
    fingerprint: dict[str, Any],
    predictions_dir: Path | None,
) -> dict[str, Any]:
    """Run one case and return its JSON record (``status`` ``"ok"`` or ``"failed"``)."""
    record = _case_record(key, case, fingerprint)
    t0 = time.perf_counter()
    try:
        if case.label_path is None:
            raise VolumeError(f"{case.image_path}: no label file")
        image = load_volume(case.image_path, kind="image")
        label = load_volume(case.label_path, kind="label")
        check_same_grid(image, label)
        ids = _class_ids(np.asarray(label.array), case.label_path, classes)
        t_load = time.perf_counter() - t0
        result = run_protocol(protocol, engine, image, label, ids, num_clicks, spacing=spacing)
        record.update(_result_to_json(result, case.class_names))
        if predictions_dir is not None:
            dst = predictions_dir / f"{key}.nii.gz"
            save_mask(dst, result.final_prediction, label)
            record["prediction"] = f"{PREDICTIONS_DIR}/{dst.name}"
        record["timings"] = {
            "load_s": t_load,
            **result.timings,
            "total_s": time.perf_counter() - t0,
        }
        record["status"] = "ok"
    except Exception as exc:  # one bad case must not stop the run
        record["status"] = "failed"
        message = _one_line(exc)
        if not isinstance(exc, VolumeError | ValueError):
            message = f"{type(exc).__name__}: {message}"
        record["error"] = message
        record["timings"] = {"total_s": time.perf_counter() - t0}
    return record


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float | None]) -> float | None:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return None
    return float(np.nanmean(v))


def _nanstd(values: Sequence[float | None]) -> float | None:
    """Population std over the non-NaN values (``np.nanstd``, as the original reports)."""
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return None
    return float(np.nanstd(v))


def _mean_curves(rows: list[dict[str, Any]], num_clicks: int) -> dict[str, Any]:
    """Per-click and final means and population stds of the ``dice`` / ``nsd`` lists of
    ``rows`` (NaN values, such as a class both empty in label and prediction, left out)."""
    out: dict[str, Any] = {"n": len(rows)}
    for metric in ("dice", "nsd"):
        per_click = [
            [r[metric][k] if k < len(r[metric]) else None for r in rows] for k in range(num_clicks)
        ]
        final = [r[f"{metric}_final"] for r in rows]
        out[metric] = [_nanmean(v) for v in per_click]
        out[f"{metric}_std"] = [_nanstd(v) for v in per_click]
        out[f"{metric}_final"] = _nanmean(final)
        out[f"{metric}_final_std"] = _nanstd(final)
    return out


def _class_key(class_id: str, name: str | None) -> str:
    return name if name else class_id


def build_summary(
    records: list[dict[str, Any]],
    discovery_warnings: Sequence[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """nnU-Net style summary of case records (the order of ``records`` is kept).

    Returns:
      ``{"settings", "metric_per_case", "mean", "foreground_mean", "pooled_mean",
      ["image_level_mean",] "failed", "warnings", "num_cases", "num_ok", "num_failed",
      "timings"}``;
      ``mean`` is keyed by class name (or id when the dataset names no classes) and holds
      per-click lists plus final values, each with its population std (``*_std``);
      ``foreground_mean`` is the mean of the class means, ``pooled_mean`` the mean and std
      over all (case, class) pairs (the original's ``compute_dataset_metrics`` "overall").
    """
    num_clicks = int(settings["num_clicks"])
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [
        {"case": r["case"], "image": r["image"], "label": r["label"], "error": r["error"]}
        for r in records
        if r.get("status") != "ok"
    ]
    notes = []
    for w in discovery_warnings:
        if not w.endswith("; skipped"):
            notes.append(w)  # informational (e.g. extra channels, ignored dataset.json entries)
            continue
        path = w.split(": ", 1)[0]
        name = Path(path).name
        for suffix in (".nii.gz", ".nii"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if "image has no label" in w:  # drop nnU-Net's channel suffix from image names
            name = re.sub(r"_\d{4}$", "", name)
        failed.append({"case": name, "image": None, "label": None, "error": w})
    per_class: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        for cid, res in r["classes"].items():
            per_class.setdefault(_class_key(cid, res.get("name")), []).append(res)
    order = sorted(per_class, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    mean = {k: _mean_curves(per_class[k], num_clicks) for k in order}
    foreground: dict[str, Any] = {"n_classes": len(mean)}
    for metric in ("dice", "nsd"):
        foreground[metric] = [
            _nanmean([m[metric][k] for m in mean.values()]) for k in range(num_clicks)
        ]
        foreground[f"{metric}_final"] = _nanmean([m[f"{metric}_final"] for m in mean.values()])
    pooled = _mean_curves([res for v in per_class.values() for res in v], num_clicks)
    summary: dict[str, Any] = {
        "settings": settings,
        "metric_per_case": [
            {k: v for k, v in r.items() if k not in ("fingerprint", "status")} for r in ok
        ],
        "mean": mean,
        "foreground_mean": foreground,
        "pooled_mean": pooled,
    }
    if settings.get("protocol") == "cvpr25":
        levels = [r["image_level"] for r in ok if "image_level" in r]
        summary["image_level_mean"] = {
            "n": len(levels),
            "dsc": [_nanmean([lv["dsc"][k] for lv in levels]) for k in range(num_clicks)],
            "nsd": [_nanmean([lv["nsd"][k] for lv in levels]) for k in range(num_clicks)],
            **{
                key: _nanmean([lv[key] for lv in levels])
                for key in ("dsc_auc", "nsd_auc", "dsc_final", "nsd_final")
            },
        }
    summary["failed"] = failed
    summary["warnings"] = notes
    summary["num_cases"] = len(ok) + len(failed)  # files skipped by the scan count as failed
    summary["num_ok"] = len(ok)
    summary["num_failed"] = len(failed)
    summary["timings"] = {
        "total_s": float(sum(r.get("timings", {}).get("total_s", 0.0) for r in records)),
        "mean_case_s": _nanmean([r["timings"]["total_s"] for r in ok]) if ok else None,
    }
    return summary


def _summary_csv(summary: dict[str, Any]) -> bytes:
    n = int(summary["settings"]["num_clicks"])
    header = ["case", "dataset", "class_id", "class_name", "status", "dice_final", "nsd_final"]
    header += [f"dice_{k}" for k in range(1, n + 1)] + [f"nsd_{k}" for k in range(1, n + 1)]
    header += ["error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)

    def fmt(v: Any) -> str:
        return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))

    for r in summary["metric_per_case"]:
        for cid, res in r["classes"].items():
            row = [r["case"], r["dataset"], cid, res.get("name") or "", "ok"]
            row += [fmt(res["dice_final"]), fmt(res["nsd_final"])]
            row += [fmt(v) for v in res["dice"]] + [fmt(v) for v in res["nsd"]]
            writer.writerow([*row, ""])
    for f in summary["failed"]:
        writer.writerow([f["case"], "", "", "", "failed", *[""] * (2 + 2 * n), f["error"]])
    return buf.getvalue().encode(errors="surrogateescape")  # paths' bytes as they are


def _plot(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sammed3d_jax.inference.overlay import plain_text

    n = int(summary["settings"]["num_clicks"])
    x = np.arange(1, n + 1)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    mean = summary["mean"]
    for ax, metric, title in zip(axes, ("dice", "nsd"), ("Dice", "NSD")):
        if len(mean) <= 12:
            for name, m in mean.items():
                y = np.array([np.nan if v is None else v for v in m[metric]], dtype=float)
                ax.plot(
                    x, y, marker="o", linewidth=1, markersize=3, alpha=0.7, label=plain_text(name)
                )
        fg = summary["foreground_mean"][metric]
        y = np.array([np.nan if v is None else v for v in fg], dtype=float)
        ax.plot(x, y, marker="o", color="black", linewidth=2.5, label="foreground mean")
        ax.set_xlabel("click")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if not summary["metric_per_case"]:
            ax.text(0.5, 0.5, "no successful case", ha="center", transform=ax.transAxes)
    axes[0].legend(fontsize=7, loc="best")
    settings = summary["settings"]
    fig.suptitle(
        f"{settings['protocol']} protocol, {summary['num_ok']} case(s), "
        f"{summary['foreground_mean']['n_classes']} class(es)",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunStats:
    """What a run did.

    Attributes:
      computed: case keys evaluated in this run.
      skipped: case keys found finished and not recomputed.
      summary: the summary written to ``OUT/summary.json``.
    """

    computed: list[str]
    skipped: list[str]
    summary: dict[str, Any]


_CLASS_KEYS = ("dice", "nsd", "dice_final", "nsd_final")
_IMAGE_LEVEL_KEYS = ("dsc", "nsd", "dsc_auc", "nsd_auc", "dsc_final", "nsd_final")


def _record_problem(record: Any) -> str | None:
    """What a case file lacks that the summary reads (None when complete)."""
    if not isinstance(record, dict) or "status" not in record:
        return "no status"
    missing = [k for k in ("case", "image", "label") if k not in record]
    if record["status"] != "ok":
        missing += [] if "error" in record else ["error"]
        return f"missing {missing}" if missing else None
    missing += [k for k in ("dataset", "timings") if k not in record]
    timings = record.get("timings")
    if isinstance(timings, dict) and not isinstance(timings.get("total_s"), (int, float)):
        return "timings lack total_s"
    classes = record.get("classes")
    if not isinstance(classes, dict):
        return "no classes"
    for cid, res in classes.items():
        if not isinstance(res, dict) or any(k not in res for k in _CLASS_KEYS):
            return f"class {cid} lacks one of {list(_CLASS_KEYS)}"
        if not isinstance(res["dice"], list) or not isinstance(res["nsd"], list):
            return f"class {cid}: dice/nsd are not lists"
    protocol = (record.get("fingerprint") or {}).get("protocol")
    if protocol == "cvpr25":
        level = record.get("image_level")
        if not isinstance(level, dict) or any(k not in level for k in _IMAGE_LEVEL_KEYS):
            return f"image_level lacks one of {list(_IMAGE_LEVEL_KEYS)}"
    return f"missing {missing}" if missing else None


def _load_record(path: Path) -> dict[str, Any] | None:
    """A finished case's record, or None (not there, unreadable or incomplete: the case is
    computed again; an incomplete file is reported)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    problem = _record_problem(record)
    if problem is not None:
        print(
            f"warning: {path}: incomplete case file ({problem}); computing it again",
            file=sys.stderr,
        )
        return None
    return record


def evaluate_dataset(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protocol: str = "sammed3d",
    num_clicks: int | None = None,
    classes: Sequence[int] | None = None,
    limit: int | None = None,
    save_predictions: bool = False,
    layout: str = "auto",
    spacing: float | Sequence[float] | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    model: Any = None,
) -> RunStats:
    """Evaluate a checkpoint over a dataset folder (resumable).

    Args:
      data: dataset root (nnU-Net or SAM-Med3D layout).
      checkpoint: converted checkpoint directory or ``.pth`` file.
      out: output folder.
      protocol: ``"sammed3d"`` or ``"cvpr25"``.
      num_clicks: clicks per class (default 1 for ``sammed3d``, 5 for ``cvpr25``).
      classes: only these label values (where present).
      limit: only the first ``limit`` cases (sorted order).
      save_predictions: write ``OUT/predictions/<case>.nii.gz``.
      layout: ``"auto"``, ``"nnunet"`` or ``"sammed3d"``.
      spacing: model-grid spacing in mm (one value or three); None: the spacing a
        `train.py` run recorded, else 1.5 mm (:func:`resolve_spacing`).
      retry_failed: recompute cases recorded as failed.
      progress: show a progress bar on stderr.
      model: an already loaded ``Sam3D`` to use instead of loading ``checkpoint``.

    Returns:
      :class:`RunStats`.

    Raises:
      RunnerError: bad arguments, a data root without cases, an output folder made with
        other settings, or an unloadable checkpoint.
    """
    if protocol not in PROTOCOLS:
        raise RunnerError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    n_clicks = DEFAULT_CLICKS[protocol] if num_clicks is None else int(num_clicks)
    if n_clicks < 1:
        raise RunnerError(f"--clicks must be >= 1, got {n_clicks}")
    if limit is not None and limit < 1:
        raise RunnerError(f"--limit must be >= 1, got {limit}")
    if classes is not None:
        bad = [c for c in classes if not 1 <= int(c) <= 255]
        if bad:
            raise RunnerError(f"--classes must lie in 1..255, got {bad}")
        if protocol == "sammed3d":
            print(
                "warning: --classes with the sammed3d protocol: its seeded click stream runs "
                "over the classes of a case in order, so a class's clicks (and results) differ "
                "from those of a run over every class, as the original evaluates",
                file=sys.stderr,
            )
    ckpt = Path(checkpoint)
    if model is None and not ckpt.exists():
        raise RunnerError(f"--checkpoint {ckpt}: no such file or directory")
    out_abs = Path(out).resolve()
    for flag, inside in (("--data", Path(data)), ("--checkpoint", ckpt)):
        if inside.is_dir() and (out_abs == inside.resolve() or inside.resolve() in out_abs.parents):
            raise RunnerError(
                f"--out {out}: inside the {flag} folder {inside}; results go to a folder of "
                "their own"
            )
    grid = resolve_spacing(spacing, ckpt)
    try:
        # Resolved: a resumed run finds its cases however --data is written.
        discovery = scan_dataset(Path(data).resolve(), layout)  # type: ignore[arg-type]
    except LayoutError as exc:
        raise RunnerError(f"--data: {exc}") from exc
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunnerError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.is_dir() and not (out_dir / RUN_FILE).exists() and any(out_dir.iterdir()):
        raise RunnerError(
            f"--out {out_dir}: a folder with other files and no {RUN_FILE} (not an evaluation "
            "run); results go to a new or empty folder"
        )
    # Outputs in the way are reported now, not after the cases have been computed.
    try:
        check_output_file(out_dir / RUN_FILE, "--out")
    except ValueError as e:
        raise RunnerError(str(e)) from None
    if not out_dir.exists():
        # Permission bits do not tell a read-only file system (or /sys) apart: try it now,
        # before the model loads, rather than fail at the first write.
        try:
            out_dir.mkdir(parents=True)
            out_dir.rmdir()
        except OSError as e:
            raise RunnerError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    for name in (SUMMARY_FILE, CSV_FILE, PLOT_FILE, RUN_FILE):
        if (out_dir / name).is_dir():
            raise RunnerError(f"--out {out_dir}: {name} is a folder where the run writes a file")
    for name in (CASES_DIR, PREDICTIONS_DIR):
        if (out_dir / name).exists() and not (out_dir / name).is_dir():
            raise RunnerError(f"--out {out_dir}: {name} is a file where the run keeps a folder")
    keys = case_keys(discovery.cases)
    selected = list(zip(keys, discovery.cases))
    if limit is not None:
        selected = selected[:limit]
    settings = {
        "protocol": protocol,
        "num_clicks": n_clicks,
        "classes": None if classes is None else sorted({int(c) for c in classes}),
        "spacing_mm": grid[0] if len(set(grid)) == 1 else list(grid),
        "checkpoint": str(ckpt.resolve()),
        "weights": _weights_stamp(ckpt),
        "data": str(Path(data).resolve()),
        "layout": discovery.layout,
    }
    fingerprint = {k: v for k, v in settings.items()}
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        previous = _load_record_any(run_file)
        if previous is None or previous.get("settings") != settings:
            diff = _settings_diff(previous, settings)
            raise RunnerError(
                f"--out {out_dir}: it holds a run with other settings ({diff}); use another "
                "--out folder or delete it"
            )
    new_run = not run_file.exists()
    cases_dir = out_dir / CASES_DIR
    predictions_dir = out_dir / PREDICTIONS_DIR if save_predictions else None

    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, Case]] = []
    changed: list[str] = []
    for key, case in selected:
        record = _load_record(cases_dir / f"{key}.json")
        lost = (  # a saved prediction deleted since: compute the case again
            save_predictions
            and record is not None
            and "prediction" in record
            and not (out_dir / record["prediction"]).exists()
        )
        # the same files, unchanged since (size and modification time)
        same_files = record is not None and (
            record["image"],
            record["label"],
            record.get("inputs"),
        ) == (
            str(case.image_path),
            None if case.label_path is None else str(case.label_path),
            _input_stamps(case),
        )
        if record is not None and not same_files and record["image"] == str(case.image_path):
            changed.append(key)
        if (
            record is not None
            and not lost
            and same_files
            and record.get("fingerprint") == fingerprint
            and (record["status"] == "ok" or not retry_failed)
        ):
            records[key] = record
            if save_predictions and record["status"] == "ok" and "prediction" not in record:
                print(
                    f"warning: {key} was finished without --save-predictions; its prediction "
                    "is not written (delete its case file to recompute it)",
                    file=sys.stderr,
                )
        else:
            todo.append((key, case))
    skipped = [k for k, _ in selected if k in records]
    if changed:
        print(
            f"note: {len(changed)} case(s) whose image or label changed since they were "
            f"evaluated are computed again: {', '.join(changed[:5])}"
            + (", ..." if len(changed) > 5 else ""),
            file=sys.stderr,
        )

    if todo:
        engine = _engine(model, ckpt)
    if new_run:  # once the model has loaded: a run that cannot start leaves no folder behind
        _write_json(run_file, {"settings": settings})
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(selected),
            initial=len(skipped),
            desc=f"evaluate ({protocol})",
            unit="case",
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for key, case in todo:
                bar.set_postfix_str(key, refresh=True)
                record = evaluate_case(
                    engine,
                    key,
                    case,
                    protocol=protocol,
                    num_clicks=n_clicks,
                    classes=classes,
                    spacing=grid,
                    fingerprint=fingerprint,
                    predictions_dir=predictions_dir,
                )
                _write_json(cases_dir / f"{key}.json", record)
                records[key] = record
                if record["status"] != "ok":
                    bar.write(f"failed: {key}: {record['error']}", file=sys.stderr)
                bar.update(1)
        finally:
            bar.close()

    ordered = [records[k] for k, _ in selected]
    summary = build_summary(ordered, discovery.warnings, settings)
    _write_json(out_dir / SUMMARY_FILE, summary)
    write_atomic(out_dir / CSV_FILE, _summary_csv(summary))
    _plot(summary, out_dir / PLOT_FILE)
    return RunStats(computed=[k for k, _ in todo], skipped=skipped, summary=summary)


def _load_record_any(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _settings_diff(previous: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    if previous is None or not isinstance(previous.get("settings"), dict):
        return f"unreadable {RUN_FILE}"
    old = previous["settings"]
    parts = [f"{k} {old.get(k)!r} != {v!r}" for k, v in settings.items() if old.get(k) != v]
    return "; ".join(parts) or "different settings"


def resolve_spacing(
    spacing: float | Sequence[float] | None, checkpoint: str | os.PathLike | None
) -> tuple[float, float, float]:
    """The model-grid spacing to use: ``spacing`` if given, else the checkpoint's own.

    A `train.py` workdir records the spacing its model was trained on; for converted
    checkpoints and `.pth` files (and ``checkpoint=None``) the default is the released
    models' 1.5 mm.

    Raises:
      RunnerError: a spacing that is not one or three positive numbers, or a workdir whose
        recorded spacing is unreadable.
    """
    from sammed3d_jax.checkpoint import CheckpointError, recorded_spacing
    from sammed3d_jax.inference.predictor import DEFAULT_SPACING

    if spacing is None:
        try:
            recorded = None if checkpoint is None else recorded_spacing(checkpoint)
        except CheckpointError as exc:
            raise RunnerError(_flag_error("--checkpoint", checkpoint, exc)) from exc
        return recorded if recorded is not None else DEFAULT_SPACING
    values = np.asarray(spacing, dtype=float).reshape(-1)
    if values.size not in (1, 3):  # three only from Python; the flag takes one number
        raise RunnerError(f"--spacing must be one number of mm (or three), got {spacing}")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise RunnerError(f"--spacing must be a positive, finite number of mm, got {spacing}")
    return tuple(float(v) for v in np.broadcast_to(values, (3,)))  # type: ignore[return-value]


def _weights_stamp(ckpt: Path) -> dict[str, Any] | None:
    from sammed3d_jax.checkpoint import CheckpointError, weights_stamp

    try:
        return weights_stamp(ckpt)
    except CheckpointError as exc:
        raise RunnerError(f"--checkpoint {exc}") from exc


def _engine(model: Any, ckpt: Path) -> Any:
    from sammed3d_jax.inference.predictor import SamEngine

    if model is None:
        from sammed3d_jax.checkpoint import load_model

        try:
            model = load_model(ckpt)
        except Exception as exc:
            raise RunnerError(_flag_error("--checkpoint", ckpt, exc)) from exc
    return SamEngine(model)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the evaluation options to ``parser``."""
    parser.add_argument("--data", required=True, type=Path, help="dataset root")
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="converted checkpoint dir or .pth"
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="sammed3d")
    parser.add_argument(
        "--clicks",
        type=int,
        default=None,
        help="clicks per class (default: 1 for sammed3d, 5 for cvpr25)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--save-predictions", action="store_true", help="write OUT/predictions/<case>.nii.gz"
    )
    parser.add_argument("--limit", type=int, default=None, help="first K cases only")
    parser.add_argument(
        "--classes", type=int, nargs="+", default=None, help="only these label values"
    )
    parser.add_argument("--layout", choices=("auto", "nnunet", "sammed3d"), default="auto")
    parser.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="isotropic model-grid spacing in mm (default: the spacing a train.py run was "
        "trained on, else 1.5 as the released models)",
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="recompute cases recorded as failed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run an evaluation from parsed arguments and print a short report; returns 0, or 1
    when no case could be evaluated."""
    stats = evaluate_dataset(
        args.data,
        args.checkpoint,
        args.out,
        protocol=args.protocol,
        num_clicks=args.clicks,
        classes=args.classes,
        limit=args.limit,
        save_predictions=args.save_predictions,
        layout=args.layout,
        spacing=args.spacing,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )
    s = stats.summary
    final = s["foreground_mean"]["dice_final"]
    pooled, pooled_std = s["pooled_mean"]["dice_final"], s["pooled_mean"]["dice_final_std"]
    print(
        f"{s['num_ok']} case(s) ok, {s['num_failed']} failed "
        f"({len(stats.computed)} computed, {len(stats.skipped)} already done); "
        f"Dice after {s['settings']['num_clicks']} click(s): foreground mean (of class means) "
        + ("n/a" if final is None else f"{final:.4f}")
        + ", over all (case, class) pairs "
        + ("n/a" if pooled is None else f"{pooled:.4f} ± {pooled_std:.4f}")
        + f"; summary in {Path(args.out) / SUMMARY_FILE}"
    )
    if s["num_ok"] == 0:  # nothing was measured: a script must not take this for success
        print(
            f"error: no case was evaluated ({s['num_failed']} failed; reasons in "
            f"{Path(args.out) / CASES_DIR})",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``evaluate.py`` entry point; returns the exit status."""
    parser = CliArgumentParser(
        prog="evaluate.py",
        description="Simulated-click evaluation of a SAM-Med3D checkpoint over a dataset.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    with cli_errors() as status:
        status.code = run_from_args(args)
    return status.code
