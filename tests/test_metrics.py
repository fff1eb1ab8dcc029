import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import (  # noqa: E402
    aupro,
    detection_and_localization,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
)


# --------------------------------------------------------------------------- helpers
def _aupro_reference(masks, maps, fpr_limit, structure=np.ones((3, 3))):
    """Slow, literal AUPRO: loop over every distinct threshold t, PRO/FPR of map > t."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=structure)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = masks == 0
    thresholds = np.concatenate([np.unique(maps)[::-1], [-np.inf]])  # max first -> (0, 0)
    pts = []
    for t in thresholds:
        pred = maps > t
        pro = np.mean([pred[i][r].sum() / r.sum() for i, r in regions])
        fpr = pred[normal].sum() / normal.sum()
        pts.append((fpr, pro))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(pts[:-1], pts[1:]):
        if f0 >= fpr_limit:
            break
        if f1 <= fpr_limit:
            area += (f1 - f0) * (p0 + p1) / 2
        else:
            p_lim = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            area += (fpr_limit - f0) * (p0 + p_lim) / 2
    return area / fpr_limit


def _random_case(seed, n=3, h=12, w=12, decimals=1):
    """Blobby masks with several regions (last image normal) and tied-score maps."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 1.2, 1.2))
    masks = noise > 0.2
    masks[-1] = False  # a fully normal image
    maps = np.round(0.6 * masks + rng.random((n, h, w)), decimals)  # rounding -> ties
    return masks, maps


# --------------------------------------------------------------------------- image AUROC
def test_image_auroc_hand_computed():
    # normals 0.1, 0.6; anomalies 0.4, 0.9 -> pairs (a>n): (0.4>0.1),(0.9>0.1),(0.9>0.6),
    # but 0.4<0.6 -> 3/4
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])) == pytest.approx(0.75)


def test_image_auroc_matches_sklearn_and_is_float():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.3 * y
    out = image_auroc(y, s)
    assert isinstance(out, float)
    assert out == pytest.approx(roc_auc_score(y, s))
    # anomalous is positive: inverting scores gives 1 - auc
    assert image_auroc(y, -s) == pytest.approx(1 - out)


def test_image_auroc_single_class_raises():
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.ones(5), np.arange(5.0))


# --------------------------------------------------------------------------- F1
def test_f1_max_hand_computed():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    # sorted desc: 0.9(1) 0.8(1) 0.7(0) 0.4(0) 0.35(1) 0.1(0); 3 positives
    # t=0.9 : TP1 FP0 P=1   R=1/3 F1=0.5
    # t=0.8 : TP2 FP0 P=1   R=2/3 F1=0.8   <- max
    # t=0.7 : TP2 FP1 P=2/3 R=2/3 F1=2/3
    # t=0.4 : TP2 FP2 P=1/2 R=2/3 F1=4/7
    # t=0.35: TP3 FP2 P=3/5 R=1   F1=0.75
    # t=0.1 : TP3 FP3 P=1/2 R=1   F1=2/3
    f1, thr = f1_max(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.8)
    assert isinstance(f1, float) and isinstance(thr, float)


def test_f1_max_threshold_semantics_random():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.4 * y, 2)  # ties
    f1, thr = f1_max(y, s)
    assert f1_score(y, s >= thr) == pytest.approx(f1)
    # no threshold does better (brute force over all distinct scores)
    best = max(f1_score(y, s >= t) for t in np.unique(s))
    assert f1 == pytest.approx(best)


def test_f1_max_no_positives_raises():
    with pytest.raises(ValueError):
        f1_max(np.zeros(4), np.arange(4.0))


# --------------------------------------------------------------------------- pixel AUROC / F1
def test_pixel_auroc_matches_sklearn_flattened():
    masks, maps = _random_case(2, n=4, h=16, w=16, decimals=3)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    # float32 maps accepted
    assert pixel_auroc(masks, maps.astype(np.float32)) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.astype(np.float32).ravel())
    )


def test_pixel_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_pixel_f1_max_is_the_best_f1_over_every_threshold():
    masks, maps = _random_case(3)
    f1, thr = pixel_f1_max(masks, maps)
    scores = {t: f1_score(masks.ravel(), maps.ravel() >= t) for t in np.unique(maps)}
    assert f1 == pytest.approx(max(scores.values())) and scores[thr] == pytest.approx(f1)


# --------------------------------------------------------------------------- AUPRO
def test_aupro_perfect_map_is_one():
    masks, _ = _random_case(4)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)


def test_aupro_hand_computed_with_tie_and_interpolation():
    # 1x8 image: regions A={0,1} (size 2), B={4} (size 1); normal pixels {2,3,5,6,7}.
    mask = np.array([[[1, 1, 0, 0, 1, 0, 0, 0]]])
    scores = np.array([[[0.9, 0.5, 0.8, 0.6, 0.6, 0.1, 0.2, 0.3]]])
    # weights: A pixel 1/(2*2)=0.25, B pixel 1/(2*1)=0.5, normal 1/5=0.2
    # desc groups: 0.9{A} 0.8{N} 0.6{N,B}(tie) 0.5{A} 0.3{N} 0.2{N} 0.1{N}
    # curve (FPR, PRO): (0,0) (0,.25) (.2,.25) (.4,.75) (.4,1) (.6,1) (.8,1) (1,1)
    # to 0.3: [0,.2] at .25 -> .05 ; [.2,.3] .25 -> .5 (interp) -> .1*.375=.0375
    # total .0875 / .3 = 7/24
    assert aupro(mask, scores, fpr_limit=0.3) == pytest.approx(7 / 24)
    # to 1.0: .05 + .2*(.25+.75)/2 + .6*1 = .75
    assert aupro(mask, scores, fpr_limit=1.0) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [5, 6, 7])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed, fpr_limit):
    masks, maps = _random_case(seed)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert n_regions >= 3  # the case really has several regions
    assert np.unique(maps).size < maps.size  # and ties
    assert aupro(masks, maps, fpr_limit) == pytest.approx(_aupro_reference(masks, maps, fpr_limit), abs=1e-12)


def test_aupro_fpr_limit_matters_and_inverted_map_is_zero():
    masks, maps = _random_case(8)
    assert aupro(masks, maps, 0.05) != pytest.approx(aupro(masks, maps, 0.3))
    inverted = 1.0 - masks.astype(float)  # all normal pixels rank above defects
    assert aupro(masks, inverted) == pytest.approx(0.0, abs=1e-12)


def test_aupro_eight_connectivity():
    # diagonal-touching pixels (0,0)-(1,1) plus (1,2): ONE region of size 3 with 8-connectivity
    # (two regions of sizes 1 and 2 with 4-connectivity).
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    scores = np.full((1, 4, 4), 0.5)
    scores[0, 0, 0], scores[0, 1, 1], scores[0, 1, 2] = 0.9, 0.1, 0.1
    # 8-conn: curve (0,0) (0,1/3) (1,1/3) (1,1) -> 1/3 ; 4-conn would give (1+0)/2 = 0.5
    assert aupro(mask, scores) == pytest.approx(1 / 3)
    assert _aupro_reference(mask, scores, 0.3, structure=ndimage.generate_binary_structure(2, 1)) == pytest.approx(0.5)


def test_aupro_does_not_fill_holes():
    # ring of 8 pixels around a normal centre pixel in a 5x5 image: region size 8, 17 normals.
    mask = np.zeros((1, 5, 5), dtype=bool)
    mask[0, 1:4, 1:4] = True
    mask[0, 2, 2] = False
    scores = np.where(mask, 0.5, 0.0)
    scores[0, 2, 2] = 1.0  # the hole is a normal pixel -> a false positive ranked first
    # curve (0,0) (1/17,0) (1/17,1) (1,1); area to .3 = .3 - 1/17  -> 1 - 10/51
    # (filling the hole would give 1.0)
    assert aupro(mask, scores) == pytest.approx(1 - 10 / 51)


def test_aupro_errors():
    with pytest.raises(ValueError, match="no anomalous"):
        aupro(np.zeros((2, 3, 3)), np.random.default_rng(0).random((2, 3, 3)))
    with pytest.raises(ValueError, match="no normal"):
        aupro(np.ones((2, 3, 3)), np.random.default_rng(0).random((2, 3, 3)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(3)[None], np.eye(3)[None], fpr_limit=0.0)


# --------------------------------------------------------------------------- summary
def test_detection_and_localization_keys_and_values():
    masks, maps = _random_case(9, n=4)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    img_only = detection_and_localization(labels, scores)
    assert set(img_only) == {"image_auroc", "image_f1", "image_f1_threshold"}
    out = detection_and_localization(labels, scores, masks, maps, fpr_limit=0.2)
    assert set(out) == {"image_auroc", "image_f1", "image_f1_threshold", "pixel_auroc", "aupro", "pixel_f1"}
    # against independent references: sklearn, the slow AUPRO, F1 by brute force over every threshold
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert out["aupro"] == pytest.approx(_aupro_reference(masks, maps, 0.2), abs=1e-12)
    brute_f1 = max(f1_score(masks.ravel(), maps.ravel() >= t) for t in np.unique(maps))
    assert out["pixel_f1"] == pytest.approx(brute_f1)
    assert all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError):
        detection_and_localization(labels, scores, masks=masks)


def test_per_defect_type_scores_each_type_against_all_normal_images():
    from metrics import per_defect_type

    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    types = np.array(["good", "good", "good", "crack", "crack", "stain", "stain"])
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6])
    masks = np.zeros((7, 2, 2), bool)
    masks[3:, 0, 0] = True
    maps = np.zeros((7, 2, 2))
    maps[3:, 0, 0] = [1.0, 1.0, -1.0, 1.0]
    result = per_defect_type(labels, types, scores, masks, maps)
    assert set(result) == {"crack", "stain"}
    # crack (0.9, 0.2) against good (0.1, 0.5, 0.3): pairs won 3 + 1 = 4 of 6
    assert result["crack"]["image_auroc"] == pytest.approx(4 / 6)
    # stain (0.4, 0.6) against good: 2 + 3 = 5 of 6
    assert result["stain"]["image_auroc"] == pytest.approx(5 / 6)
    assert result["crack"]["images"] == 2
    # crack pixels: 2 defective at 1.0 above 12 + 2 normal pixels at 0.0 -> 1.0; stain: one at -1.0 -> lower
    assert result["crack"]["pixel_auroc"] == pytest.approx(1.0)
    assert result["stain"]["pixel_auroc"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
    assert per_defect_type(np.zeros(3), np.array(["good"] * 3), np.zeros(3)) == {}


def test_evaluate_notes_defective_images_with_empty_masks_and_masks_without_defects():
    from main import evaluate

    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.3])
    maps = np.random.default_rng(0).random((4, 8, 8))
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2, 2:4, 2:4] = True  # image 3 is defective but its mask is empty
    noted = evaluate(labels, scores, masks, maps)
    assert noted["note"].startswith("1 defective test image(s) have an empty mask")
    assert noted["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    blank = evaluate(labels, scores, np.zeros_like(masks), maps)
    assert "pixel_auroc" not in blank and "mark no defective pixel" in blank["note"]
    assert blank["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    masks[3, 0, 0] = True
    assert "note" not in evaluate(labels, scores, masks, maps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_metric_refuses_non_finite_scores_alike(bad):
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.9, bad, 0.7])
    masks = np.zeros((1, 2, 2), bool)
    masks[0, 0, 0] = True
    maps = scores.reshape(1, 2, 2)
    for metric, args in ((image_auroc, (labels, scores)), (f1_max, (labels, scores)), (pixel_auroc, (masks, maps)),
                         (aupro, (masks, maps))):
        with pytest.raises(ValueError, match="contains (NaN|infinite values)"):
            metric(*args)
