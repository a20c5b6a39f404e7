"""Simulated-click evaluation protocols for one case (image + multi-class label).

Both protocols run every requested class of the case, keep each class's prediction after
every click, merge the classes per click into one label map in ascending class order (later
ids overwrite earlier ones, as the original's output file does) and score each class on that
merged map on the **original** voxel grid.

``sammed3d`` — the original SAM-Med3D inference (``validate_paired_img_gt`` at HEAD)
    * Pre-processing per class with the ground truth: 1.5 mm resampling, RAS+ re-orientation,
      an ``S³`` crop centred on the class's bounding box, z-normalisation of the ROI alone
      (:func:`sammed3d_jax.data.preprocess_case`).
    * ``RandomState(233)`` seeded once per case; classes in ascending order; for each class,
      ``N`` clicks from :func:`sammed3d_jax.eval.sammed3d_click` on the previous binary ROI
      prediction (empty before the first click, so the first click is a uniform foreground
      voxel), one ``randint`` per click.
    * All clicks so far are passed at every step; the mask prompt is the previous low-res
      logits (zeros at the first click); prediction = sigmoid(upsampled logits) > 0.5,
      pasted back to the original grid with nearest-neighbour resampling.
    * A class whose crop holds no label voxel (it vanished in resampling) gets an empty
      prediction and no click, as in the original.
    * Metrics per click: DSC and NSD at 1 mm in the label's voxel size as its header states it
      (``pixdim``, as the original's ``compute_metrics``; a note where the affine differs).

``cvpr25`` — the CVPR 2025 interactive 3D segmentation challenge rules, clicks only (the
challenge's initial bounding-box step is left out)
    * Clicks come from :func:`sammed3d_jax.eval.cvpr25_click` on the original grid: for each
      class, the error between the current merged prediction (``== class``) and the label;
      the click is a maximal-distance voxel of the largest 26-connected error component and
      its label is the ground truth there. A class predicted perfectly gets no click in that
      step and keeps its prediction.
    * The model sees only the clicks: no ground truth is used for cropping. The clicks (integer
      voxel indices of the file) are mapped to the 1.5 mm canonical grid, and the ROI is
      placed as :class:`sammed3d_jax.inference.Predictor` does it: centred on the first click;
      kept while every new click lies inside it; when a new click falls outside, re-centred on the
      bounding box of the positive clicks (on the new click when that box is wider than the
      ROI), re-encoded, and the mask prompt restarts from zeros. A click that then lies
      outside the ROI is recorded with ``in_roi = false`` and not given to the model (it
      still counts as an interaction); the class's prediction comes from its clicks inside
      the ROI. Negative clicks are always inside the current ROI when they are made, because
      the prediction only exists there. An ROI that cannot be z-normalised (fewer than two
      voxels > 0) gives no prediction: the class keeps its previous one (empty at first),
      with a note, as in ``sammed3d``; the other classes and the case still count.
    * Metrics per step: per-class DSC, and NSD at 2 mm in the label's spacing; the image-level
      DSC is the mean over the classes, the image-level NSD the mean of the per-class NSDs
      (0 for an empty prediction) when the image-level DSC is > 0.2 and 0 otherwise
      (:func:`sammed3d_jax.eval.cvpr25_step_metrics`); DSC_AUC / NSD_AUC integrate the click
      steps with the trapezoid rule (abscissae 0, 1, …, N−1; needs N ≥ 2), and the final
      values are those of the last step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sammed3d_jax.data.geometry import paste_back, preprocess_case, roi_to_original_voxel
from sammed3d_jax.data.nifti import Volume
from sammed3d_jax.eval.clicks import cvpr25_click, sammed3d_click
from sammed3d_jax.eval.metrics import (
    CVPR25_NSD_DSC_THRESHOLD,
    CVPR25_NSD_TOLERANCE_MM,
    SAMMED3D_NSD_TOLERANCE_MM,
    cvpr25_auc,
    dice,
    nsd,
)
from sammed3d_jax.inference.predictor import (
    NoClickInRoiError,
    Prediction,
    Predictor,
    RoiNormalizationError,
    SamEngine,
)

__all__ = [
    "PROTOCOLS",
    "SAMMED3D_SEED",
    "CaseResult",
    "ClassResult",
    "Click",
    "run_cvpr25",
    "run_protocol",
    "run_sammed3d",
]

PROTOCOLS = ("sammed3d", "cvpr25")
#: The original re-seeds NumPy's legacy generator with this value at the start of each case.
SAMMED3D_SEED = 233


@dataclasses.dataclass(frozen=True)
class Click:
    """One simulated click.

    Attributes:
      step: 1-based interaction number.
      point: nearest voxel index ``(i, j, k)`` of the original file (None when the click lies
        in the ROI's zero padding outside the volume).
      point_exact: continuous voxel index ``(i, j, k)`` of the original file.
      point_roi: continuous ROI coordinates ``(A0, A1, A2)`` (None when no ROI could take
        any of the class's clicks).
      roi_start: canonical start of the ROI the click refers to (None likewise).
      label: 1 foreground, 0 background.
      in_roi: whether the click was given to the model.
    """

    step: int
    point: tuple[int, int, int] | None
    point_exact: tuple[float, float, float]
    point_roi: tuple[float, float, float] | None
    roi_start: tuple[int, int, int] | None
    label: int
    in_roi: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "point": None if self.point is None else list(self.point),
            "point_exact": [round(float(v), 4) for v in self.point_exact],
            "point_roi": None
            if self.point_roi is None
            else [round(float(v), 4) for v in self.point_roi],
            "roi_start": None if self.roi_start is None else list(self.roi_start),
            "label": self.label,
            "in_roi": self.in_roi,
        }


@dataclasses.dataclass
class ClassResult:
    """Per-click results of one class.

    Attributes:
      class_id: label value.
      dice: per click, DSC of the merged prediction's class against the label.
      nsd: per click, NSD (1 mm for ``sammed3d``, 2 mm for ``cvpr25``).
      clicks: the clicks in order (fewer than the steps when the class became perfect or, in
        ``sammed3d``, when its crop held no label voxel).
      notes: remarks (e.g. label vanished after resampling).
    """

    class_id: int
    dice: list[float] = dataclasses.field(default_factory=list)
    nsd: list[float] = dataclasses.field(default_factory=list)
    clicks: list[Click] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CaseResult:
    """Result of one case.

    Attributes:
      protocol: ``"sammed3d"`` or ``"cvpr25"``.
      num_clicks: steps run.
      classes: per class id, ascending.
      image_level: ``cvpr25`` only: per-step image-level ``dsc`` / ``nsd`` lists and
        ``dsc_auc``, ``nsd_auc`` (None for one click), ``dsc_final``, ``nsd_final``.
      final_prediction: ``(i, j, k)`` uint8 merged label map after the last click.
      timings: seconds spent per stage.
    """

    protocol: str
    num_clicks: int
    classes: dict[int, ClassResult]
    image_level: dict[str, Any] | None
    final_prediction: np.ndarray
    timings: dict[str, float]


class _SparseMask:
    """A binary mask on a large grid stored as its bounding-box crop."""

    def __init__(self, mask: np.ndarray | None, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.window: tuple[slice, ...] | None = None
        self.crop: np.ndarray | None = None
        if mask is None:
            return
        m = np.asarray(mask) != 0
        if not m.any():
            return
        window = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            hit = np.flatnonzero(m.any(axis=other))
            window.append(slice(int(hit[0]), int(hit[-1]) + 1))
        self.window = tuple(window)
        self.crop = m[self.window].copy()

    def paint(self, out: np.ndarray, value: int) -> None:
        if self.window is not None:
            region = out[self.window]
            region[self.crop] = value


def _merge(masks: dict[int, _SparseMask], shape: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(shape), np.uint8)
    for c in sorted(masks):
        masks[c].paint(out, c)
    return out


def _original_click(
    step: int,
    point_roi: np.ndarray,
    roi_start: np.ndarray,
    roi_affine: np.ndarray,
    original_affine: np.ndarray,
    original_shape: Sequence[int],
    label: int,
    in_roi: bool,
) -> Click:
    exact = roi_to_original_voxel(np.asarray(point_roi, float), roi_affine, original_affine)
    nearest = np.floor(exact + 0.5).astype(np.int64)
    inside = bool(np.all((nearest >= 0) & (nearest < np.asarray(original_shape))))
    return Click(
        step=step,
        point=tuple(int(v) for v in nearest) if inside else None,
        point_exact=tuple(float(v) for v in exact),
        point_roi=tuple(float(v) for v in point_roi),
        roi_start=tuple(int(v) for v in roi_start),
        label=int(label),
        in_roi=in_roi,
    )


def _check_classes(class_ids: Sequence[int]) -> list[int]:
    ids = sorted({int(c) for c in class_ids})
    if not ids:
        raise ValueError("no class to evaluate")
    if ids[0] < 1 or ids[-1] > 255:
        raise ValueError(f"class ids must lie in 1..255 (uint8 output), got {ids}")
    return ids


def run_sammed3d(
    engine: SamEngine,
    image: Volume,
    label: Volume,
    class_ids: Sequence[int],
    num_clicks: int,
    *,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    seed: int = SAMMED3D_SEED,
) -> CaseResult:
    """The original SAM-Med3D protocol on one case (see the module doc).

    Args:
      engine: jitted model; its ``crop_size`` is the ROI side.
      image: ``(i, j, k)`` image.
      label: multi-class label on the same grid.
      class_ids: classes to run (each must be present in ``label``).
      num_clicks: clicks per class (≥ 1).
      spacing: resampling spacing (mm).
      seed: legacy NumPy seed, drawn once per case.

    Returns:
      A :class:`CaseResult`.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    ids = _check_classes(class_ids)
    t_start = time.perf_counter()
    enc0, dec0 = engine.encode_seconds, engine.decode_seconds
    pre = preprocess_case(
        image, label, ids, crop_size=engine.crop_size, spacing=spacing, nan_if_undefined=True
    )
    t_pre = time.perf_counter() - t_start
    shape = image.shape
    rng = np.random.RandomState(seed)
    steps: dict[int, list[_SparseMask]] = {}
    results: dict[int, ClassResult] = {}
    t_paste = 0.0
    for c in ids:
        p = pre[c]
        res = ClassResult(class_id=c)
        results[c] = res
        roi_label = p.roi_label
        if not roi_label.any():
            res.notes.append(
                "no label voxel left in the ROI after resampling: empty prediction, no click"
            )
            steps[c] = [_SparseMask(None, shape)] * num_clicks
            continue
        # An ROI with fewer than two voxels > 0 has no z-normalisation: the original feeds
        # the model NaN and gets empty predictions, its clicks still drawn from the label.
        emb = engine.encode(p.roi_image) if np.isfinite(p.roi_image).all() else None
        if emb is None:
            res.notes.append(
                "fewer than 2 ROI voxels > 0, z-normalisation undefined: empty predictions"
            )
        low = None
        prev = np.zeros(roi_label.shape, bool)
        pts: list[np.ndarray] = []
        labs: list[int] = []
        steps[c] = []
        for k in range(1, num_clicks + 1):
            point, lab = sammed3d_click(prev, roi_label, rng)
            pts.append(point)
            labs.append(lab)
            if emb is not None:
                out = engine.decode(emb, np.asarray(pts, np.float64), np.asarray(labs), low)
                low = out.low_res_logits
                prev = out.probability > 0.5
            t0 = time.perf_counter()
            pasted = paste_back(prev, p.roi_affine, shape, p.original_affine)
            steps[c].append(_SparseMask(pasted, shape))
            t_paste += time.perf_counter() - t0
            res.clicks.append(
                _original_click(
                    k, point, p.start, p.roi_affine, p.original_affine, shape, lab, True
                )
            )
    t0 = time.perf_counter()
    # The original's compute_metrics takes the spacing from the label's header zooms.
    spacing_mm = label.header_zooms
    if not np.allclose(spacing_mm, label.spacing, rtol=1e-5, atol=0):
        for res in results.values():
            res.notes.append(
                f"NSD in the header's voxel size {spacing_mm.tolist()} mm (as the original); "
                f"the affine gives {label.spacing.tolist()} mm"
            )
    gt = np.asarray(label.array)
    merged = None
    for k in range(num_clicks):
        merged = _merge({c: steps[c][k] for c in ids}, shape)
        for c in ids:
            g = gt == c
            pm = merged == c
            results[c].dice.append(dice(pm, g))
            results[c].nsd.append(nsd(pm, g, spacing_mm, SAMMED3D_NSD_TOLERANCE_MM))
    t_metrics = time.perf_counter() - t0
    return CaseResult(
        protocol="sammed3d",
        num_clicks=num_clicks,
        classes=results,
        image_level=None,
        final_prediction=merged,
        timings={
            "preprocess_s": t_pre,
            "encode_s": engine.encode_seconds - enc0,
            "decode_s": engine.decode_seconds - dec0,
            "paste_back_s": t_paste,
            "metrics_s": t_metrics,
            "protocol_s": time.perf_counter() - t_start,
        },
    )


def run_cvpr25(
    engine: SamEngine,
    image: Volume,
    label: Volume,
    class_ids: Sequence[int],
    num_clicks: int,
    *,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
) -> CaseResult:
    """The CVPR 2025 challenge click protocol on one case (see the module doc).

    Args:
      engine: jitted model; its ``crop_size`` is the ROI side.
      image: ``(i, j, k)`` image.
      label: multi-class label on the same grid.
      class_ids: classes to run (each must be present in ``label``).
      num_clicks: click steps (≥ 1; the challenge uses 5).
      spacing: resampling spacing (mm).

    Returns:
      A :class:`CaseResult` with ``image_level`` filled.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    ids = _check_classes(class_ids)
    t_start = time.perf_counter()
    enc0, dec0 = engine.encode_seconds, engine.decode_seconds
    predictor = Predictor(engine, spacing, embedding_cache_size=len(ids) + 2)
    predictor.set_image(image)
    t_pre = time.perf_counter() - t_start
    shape = image.shape
    gt = np.asarray(label.array)
    gts = {c: gt == c for c in ids}
    spacing_mm = label.spacing
    results = {c: ClassResult(class_id=c) for c in ids}
    current = {c: _SparseMask(None, shape) for c in ids}
    previous: dict[int, Prediction | None] = dict.fromkeys(ids)
    pts: dict[int, list[np.ndarray]] = {c: [] for c in ids}
    labs: dict[int, list[int]] = {c: [] for c in ids}
    merged = np.zeros(shape, np.uint8)
    image_dsc: list[float] = []
    image_nsd: list[float] = []
    t_click = t_metrics = t_predict = 0.0
    for k in range(1, num_clicks + 1):
        for c in ids:
            t0 = time.perf_counter()
            click = cvpr25_click(merged == c, gts[c])
            t_click += time.perf_counter() - t0
            if click is None:
                continue
            point, lab = click
            pts[c].append(point)
            labs[c].append(lab)
            t0 = time.perf_counter()
            try:
                pred = predictor.predict(np.asarray(pts[c]), np.asarray(labs[c]), previous[c])
            except (NoClickInRoiError, RoiNormalizationError) as exc:
                # As the sammed3d protocol does for such an ROI, the class keeps its
                # previous (at first: empty) prediction instead of failing the whole case.
                results[c].notes.append(f"step {k}: {exc}; prediction kept")
                pred = None
            t_predict += time.perf_counter() - t0
            if pred is None:
                results[c].clicks.append(
                    Click(
                        step=k,
                        point=tuple(int(v) for v in point),
                        point_exact=tuple(float(v) for v in point),
                        point_roi=None,
                        roi_start=None,
                        label=int(lab),
                        in_roi=False,
                    )
                )
                continue
            previous[c] = pred
            current[c] = _SparseMask(pred.mask, shape)
            results[c].clicks.append(
                Click(
                    step=k,
                    point=tuple(int(v) for v in point),
                    point_exact=tuple(float(v) for v in point),
                    point_roi=tuple(float(v) for v in pred.points_roi[-1]),
                    roi_start=tuple(int(v) for v in pred.roi_start),
                    label=int(lab),
                    in_roi=bool(pred.in_roi[-1]),
                )
            )
        t0 = time.perf_counter()
        merged = _merge(current, shape)
        dscs, nsds = [], []
        for c in ids:
            pm = merged == c
            d = dice(pm, gts[c])
            n = nsd(pm, gts[c], spacing_mm, CVPR25_NSD_TOLERANCE_MM) if pm.any() else 0.0
            results[c].dice.append(d)
            results[c].nsd.append(n)
            dscs.append(d)
            nsds.append(n)
        mean_dsc = float(np.mean(dscs))
        image_dsc.append(mean_dsc)
        image_nsd.append(float(np.mean(nsds)) if mean_dsc > CVPR25_NSD_DSC_THRESHOLD else 0.0)
        t_metrics += time.perf_counter() - t0
    image_level = {
        "dsc": image_dsc,
        "nsd": image_nsd,
        "dsc_auc": cvpr25_auc(image_dsc, num_clicks) if num_clicks >= 2 else None,
        "nsd_auc": cvpr25_auc(image_nsd, num_clicks) if num_clicks >= 2 else None,
        "dsc_final": image_dsc[-1],
        "nsd_final": image_nsd[-1],
    }
    return CaseResult(
        protocol="cvpr25",
        num_clicks=num_clicks,
        classes=results,
        image_level=image_level,
        final_prediction=merged,
        timings={
            "preprocess_s": t_pre,
            "encode_s": engine.encode_seconds - enc0,
            "decode_s": engine.decode_seconds - dec0,
            "click_s": t_click,
            "predict_s": t_predict,
            "metrics_s": t_metrics,
            "protocol_s": time.perf_counter() - t_start,
        },
    )


def run_protocol(
    protocol: str,
    engine: SamEngine,
    image: Volume,
    label: Volume,
    class_ids: Sequence[int],
    num_clicks: int,
    *,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
) -> CaseResult:
    """Dispatch to :func:`run_sammed3d` or :func:`run_cvpr25` by name."""
    if protocol == "sammed3d":
        return run_sammed3d(engine, image, label, class_ids, num_clicks, spacing=spacing)
    if protocol == "cvpr25":
        return run_cvpr25(engine, image, label, class_ids, num_clicks, spacing=spacing)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
