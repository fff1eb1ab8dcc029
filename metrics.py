"""Evaluation metrics for image anomaly detection and localization.

All functions take numpy arrays and return plain Python floats.

Conventions
-----------
* Image labels: 1 / True = anomalous (the positive class), 0 / False = normal.
* Higher score = more anomalous.
* Pixel-level inputs are ``masks`` (N, H, W) with 1 / True on defective pixels
  and ``maps`` (N, H, W) float anomaly maps at mask resolution. Normal images
  contribute all-zero masks; every pixel of every image is used.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "pixel_f1_max",
    "detection_and_localization",
    "per_defect_type",
]


# --------------------------------------------------------------------------- helpers
def _binary_1d(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a flat bool array; reject values other than 0/1."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.ravel()
    flat = arr.ravel()
    if flat.size and not np.all((flat == 0) | (flat == 1)):
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return flat.astype(bool)


def _scores_1d(scores: np.ndarray, n: int, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a flat float array of length ``n``, all finite (sklearn's metrics refuse infinities;
    AUPRO would accept them, so every metric refuses them alike)."""
    arr = np.asarray(scores)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    flat = arr.ravel()
    if flat.size != n:
        raise ValueError(f"{name} has {flat.size} elements, expected {n}")
    if np.isnan(flat).any():
        raise ValueError(f"{name} contains NaN")
    if np.isinf(flat).any():
        raise ValueError(f"{name} contains infinite values: the detector overflowed (lower --lr, or retrain)")
    return flat


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) masks/maps of identical shape; return them as arrays."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks {masks.shape} "
            f"and maps {maps.shape}"
        )
    if masks.ndim != 3:
        raise ValueError(f"masks/maps must be 3-D (N, H, W), got shape {masks.shape}")
    return masks, maps


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{what} is undefined when only one class is present "
            f"(all {y.size} samples are {only})"
        )


# --------------------------------------------------------------------------- AUROC
def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC: area under the ROC curve with anomalous (label 1) as
    the positive class (``sklearn.metrics.roc_auc_score``)."""
    y = _binary_1d(labels)
    s = _scores_1d(scores, y.size)
    _require_both_classes(y, "AUROC")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC: ROC AUC over every pixel of every image, with
    defective pixels (mask == 1) as positives. Arrays are flattened without
    copying where possible (no dtype up-cast of float maps)."""
    masks, maps = _pixel_inputs(masks, maps)
    y = _binary_1d(masks, "masks")
    s = _scores_1d(maps, y.size, "maps")
    _require_both_classes(y, "pixel AUROC")
    return float(roc_auc_score(y, s))


# --------------------------------------------------------------------------- AUPRO
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Definition (Bergmann et al., IJCV 2021, "The MVTec Anomaly Detection
    Dataset"): ground-truth regions are the connected components of each
    image's mask with 8-connectivity (``scipy.ndimage.label`` with a 3x3 ones
    structure). For a threshold t,

        PRO(t) = mean over ALL regions r (of all images) of |{p in r: map(p) > t}| / |r|
        FPR(t) = |{normal p: map(p) > t}| / |{normal p}|

    where the normal pixels are all pixels with mask == 0 over all images
    (including the background of defective images). PRO is integrated over FPR
    from 0 to ``fpr_limit`` with the trapezoidal rule (the curve is linearly
    interpolated at exactly ``fpr_limit``), and divided by ``fpr_limit`` so the
    result lies in [0, 1].

    The curve is computed exactly over every distinct score: each anomalous
    pixel gets weight 1 / (n_regions * |its region|), each normal pixel weight
    1 / n_normal; pixels are sorted by score descending, both weights are
    cumulatively summed, only the last index of each group of tied scores is
    kept (ties are one threshold) and (0, 0) is prepended.

    Differences from the cflow-ad (DFR-derived) implementation, so values can
    differ slightly: that code fills holes in regions (``prop.filled_image``),
    evaluates 1000 evenly spaced thresholds and min-max rescales FPR to
    [0, 1] before integrating. Here holes are NOT filled and the curve is exact.

    Raises ValueError if there are no anomalous or no normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _pixel_inputs(masks, maps)
    gt = masks.astype(bool, copy=False)
    scores = _scores_1d(maps, gt.size, "maps")

    # Label all images at once; the 3-D structure has no links along axis 0,
    # so each image is labelled independently with 8-connectivity.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = _STRUCTURE_8
    labels, n_regions = ndimage.label(gt, structure=structure)
    labels = labels.ravel()
    n_anomalous = int(np.count_nonzero(gt))
    n_normal = gt.size - n_anomalous
    if n_regions == 0:
        raise ValueError("AUPRO is undefined: masks contain no anomalous pixels")
    if n_normal == 0:
        raise ValueError("AUPRO is undefined: masks contain no normal pixels")

    region_size = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    pixel_weight = np.zeros(n_regions + 1, dtype=np.float64)
    pixel_weight[1:] = 1.0 / (n_regions * region_size[1:])  # label 0 (normal) -> 0

    order = np.argsort(scores, kind="stable")[::-1]  # descending score
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    del order

    pro = np.cumsum(pixel_weight[sorted_labels])
    fpr = np.cumsum(sorted_labels == 0, dtype=np.float64) / n_normal
    del sorted_labels

    # Last index of each group of tied scores = one threshold.
    last = np.empty(sorted_scores.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=last[:-1])
    last[-1] = True
    fpr = np.concatenate(([0.0], fpr[last]))
    pro = np.concatenate(([0.0], pro[last]))

    # Keep points with fpr <= limit, interpolate one point at exactly the limit.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    return min(max(area / fpr_limit, 0.0), 1.0)


# --------------------------------------------------------------------------- F1
def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Maximum F1 = 2PR / (P + R) over the thresholds of
    ``sklearn.metrics.precision_recall_curve`` (0/0 counted as 0).

    Returns ``(f1, threshold)``; predicting anomalous when ``score >= threshold``
    attains that F1. The final PR point sklearn appends without a threshold
    (P=1, R=0) is excluded. Requires at least one anomalous sample.
    """
    y = _binary_1d(labels)
    s = _scores_1d(scores, y.size)
    if not y.any():
        raise ValueError("F1 is undefined: no anomalous (label 1) samples")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float]:
    """``f1_max`` over every pixel of every image (mask == 1 is positive)."""
    masks, maps = _pixel_inputs(masks, maps)
    return f1_max(masks, maps)


# --------------------------------------------------------------------------- summary
def detection_and_localization(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All metrics in one dict: image_auroc, image_f1, image_f1_threshold and,
    when both ``masks`` and ``maps`` are given, pixel_auroc, aupro, pixel_f1."""
    if (masks is None) != (maps is None):
        raise ValueError("give both masks and maps, or neither")
    f1, thr = f1_max(labels, scores)
    out = {"image_auroc": image_auroc(labels, scores), "image_f1": f1, "image_f1_threshold": thr}
    if masks is not None:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps, fpr_limit=fpr_limit)
        out["pixel_f1"] = pixel_f1_max(masks, maps)[0]
    return out


def per_defect_type(labels: np.ndarray, defect_types: np.ndarray, scores: np.ndarray, masks: np.ndarray | None = None,
                    maps: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Image AUROC (and pixel AUROC when masks and maps are given) of each defect type against all
    the normal images: which kinds of defect a detector finds and which it misses.

    Args:
        labels: (N,) 1 = anomalous.
        defect_types: (N,) the type name of each anomalous image (e.g. its test sub-folder);
            ignored for normal images.
        scores: (N,) image scores; masks, maps: (N, H, W) or None.
    """
    y = _binary_1d(labels)
    types = np.asarray(defect_types)
    result: dict[str, dict[str, float]] = {}
    if y.all() or not y.any():
        return result
    for name in sorted(set(types[y].tolist())):
        of_type = y & (types == name)
        chosen = ~y | of_type
        entry = {"images": int(of_type.sum()), "image_auroc": image_auroc(y[chosen], scores[chosen])}
        if masks is not None and maps is not None and np.asarray(masks)[chosen].any():
            entry["pixel_auroc"] = pixel_auroc(np.asarray(masks)[chosen], np.asarray(maps)[chosen])
        result[name] = entry
    return result
