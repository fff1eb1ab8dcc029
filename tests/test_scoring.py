"""CFLOW scoring rules (anomaly_map.py), synthetic defects (synthetic.py) and ``scoring auto``.

The rule chosen by ``scoring auto`` must come from training data alone: the last test runs the
selection on real MVTec AD bottle images with the test folder deleted and every opened file logged.
"""

import dataclasses
import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import datasets
from anomaly_map import (AnomalyMapGenerator, ScoringRule, auroc_standard_error, candidate_rules, image_scores,
                         select_scoring, stage_statistics)
from config import ConfigError, make_config, parse_args
from datasets import held_out_split, load_tasks
from extractor import FeatureExtractor
from model import CFlowDetector, DetectorError, StageFeatures, load_detector
from synthetic import VISIBLE, synthetic_defects


def smooth_images(count: int, size: int = 64) -> torch.Tensor:
    """uint8 (count, 3, size, size) smooth gradients: any defect is a visible change."""
    ramp = torch.linspace(60, 180, size)
    images = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).expand(count, 3, size, size).clone()
    images += torch.arange(count)[:, None, None, None] * 3.0
    return images.round().to(torch.uint8)


# --- synthetic defects ----------------------------------------------------------------------


def test_synthetic_defects_change_pixels_only_inside_their_masks_and_are_seeded():
    images = smooth_images(10)
    defects, masks = synthetic_defects(images, seed=3)
    again, masks_again = synthetic_defects(images, seed=3)
    assert torch.equal(defects, again) and torch.equal(masks, masks_again)
    assert not torch.equal(synthetic_defects(images, seed=4)[1], masks)
    assert defects.shape == images.shape and defects.dtype == torch.uint8 and masks.shape == (10, 64, 64)
    difference = (defects.short() - images.short()).abs().amax(dim=1)
    assert torch.equal(masks, (difference >= VISIBLE) & masks)  # a mask holds only visibly changed pixels
    assert (difference[~masks] < VISIBLE).all()  # nothing visible outside it
    area = masks.float().mean(dim=(1, 2))
    assert (area > 0).all() and (area < 0.5).all()
    assert area[4] > area[[0, 1, 2, 3]].max()  # a stain is the largest
    # a blur of a flat gradient shows nothing: made again as noise, which shows
    assert masks[3].sum() > 0


def test_synthetic_defects_refuse_bad_input():
    with pytest.raises(ValueError, match="kinds"):
        synthetic_defects(smooth_images(2), seed=0, kinds=("crater",))
    with pytest.raises(ValueError, match="uint8"):
        synthetic_defects(smooth_images(2).float(), seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        synthetic_defects(smooth_images(1), seed=0)


# --- rules ----------------------------------------------------------------------------------


def test_scoring_rules_parse_and_print_back():
    for text in ("exp/max", "z/top1", "z/top10@blocks.1+blocks.2"):
        assert str(ScoringRule.parse(text)) == text
    assert ScoringRule.parse("z/max@a+b").stages == ("a", "b")
    for bad in ("exp", "sum/max", "z/top3"):
        with pytest.raises(ValueError):
            ScoringRule.parse(bad)
    with pytest.raises(ConfigError, match="does not extract"):  # named stages: refused at parse time
        parse_args(["--preset", "cflow_lite0", "--layers", "blocks.2,blocks.4,blocks.6", "--scoring", "z/max@blocks.1"])
    assert parse_args(["--preset", "cflow_lite0", "--scoring", "auto"]).scoring == "auto"


def test_top_k_image_score_is_the_mean_of_the_largest_pixels():
    maps = torch.rand(3, 20, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for how, count in (("top1", 2), ("top10", 20)):
        brute = [np.sort(m.numpy().ravel())[-count:].mean() for m in maps]
        np.testing.assert_allclose(image_scores(maps, how).numpy(), brute, rtol=1e-12)
    np.testing.assert_array_equal(image_scores(maps, "max").numpy(), maps.flatten(1).max(1).values.numpy())


def test_auroc_standard_error_matches_hanley_mcneil_and_the_spread_of_simulated_aurocs():
    # by hand, A = 0.9, 50 and 50: Q1 = 0.9 / 1.1, Q2 = 1.62 / 1.9,
    # SE^2 = (0.09 + 49 (Q1 - 0.81) + 49 (Q2 - 0.81)) / 2500 = 0.0010319
    assert auroc_standard_error(0.9, 50, 50) == pytest.approx(0.0010319 ** 0.5, rel=1e-3)
    rng = np.random.default_rng(0)
    shift = 1.8  # binormal, equal variances: AUROC = Phi(shift / sqrt(2)) = 0.898
    simulated = [roc_auc_score(np.r_[np.zeros(50), np.ones(50)], np.r_[rng.normal(size=50), rng.normal(shift, 1, 50)])
                 for _ in range(2000)]
    assert np.std(simulated) == pytest.approx(auroc_standard_error(float(np.mean(simulated)), 50, 50), rel=0.15)


def test_z_merge_averages_stages_standardised_on_training_statistics():
    statistics = {"a": {"max": 0.0, "mean": -1.0, "std": 2.0}, "b": {"max": 0.0, "mean": -3.0, "std": 0.5}}
    stage_maps = {"a": torch.tensor([[[-1.0, -5.0], [1.0, -1.0]]]), "b": torch.tensor([[[-3.0]]]).expand(1, 3, 3)}
    generator = AnomalyMapGenerator((3, 3), "train", statistics, ScoringRule("z", "max"))
    merged = generator(stage_maps)
    # grid point (0, 2) of the 3x3 map is stage a's (0, 1): z_a = (-1 - -5) / 2 = 2, z_b = 0
    assert merged[0, 0, 2].item() == pytest.approx((2.0 + 0.0) / 2)
    assert merged[0, 2, 0].item() == pytest.approx(((-1.0 - 1.0) / 2.0 + 0.0) / 2)
    only_b = AnomalyMapGenerator((3, 3), "train", statistics, ScoringRule("z", "max", ("b",)))(stage_maps)
    assert torch.equal(only_b, torch.zeros(1, 3, 3, dtype=torch.float64))


def test_selection_prefers_the_stage_that_sees_the_defects():
    """Stage ``seeing`` has low log p at the defects, stage ``blind`` is noise: the rule must use ``seeing``."""
    generator = torch.Generator().manual_seed(0)
    normal = {stage: torch.randn(20, 8, 8, generator=generator) for stage in ("seeing", "blind")}
    defect = {stage: torch.randn(20, 8, 8, generator=generator) for stage in ("seeing", "blind")}
    for index in range(20):
        row, col = divmod(index % 16, 4)
        defect["seeing"][index, 2 * row:2 * row + 2, 2 * col:2 * col + 2] -= 3.0
    fit = [{stage: torch.randn(10, 8, 8, generator=generator) for stage in ("seeing", "blind")}]
    statistics = stage_statistics(fit)
    candidates = candidate_rules(["seeing", "blind"])
    assert len(candidates) == 3 * 2 * 3 and candidates[0] == ScoringRule()  # the paper's rule first
    rule, rows = select_scoring(normal, defect, statistics, (32, 32), candidates)
    assert rule.stages == ("seeing",)
    assert len(rows) == len(candidates)
    chosen = next(row for row in rows if row["rule"] == str(rule))
    blind = [row for row in rows if row["rule"].endswith("@blind")]
    assert chosen["image_auroc"] > 0.95 and max(row["image_auroc"] for row in blind) < 0.8
    # defects every rule separates perfectly: the paper's rule (first) stays
    obvious = {stage: maps - 20.0 for stage, maps in defect.items()}
    rule, rows = select_scoring(normal, obvious, statistics, (32, 32), candidates)
    assert rule == ScoringRule() and rows[0]["image_auroc"] == 1.0


# --- scoring auto on real images, without a test split ---------------------------------------


def test_scoring_auto_reads_no_test_image(mvtec_root, tmp_path, monkeypatch):
    source, category = mvtec_root / "bottle", tmp_path / "bottle"
    linked = {"train/good": 24, "test/good": 2, "test/broken_large": 2, "ground_truth/broken_large": 2}
    for folder, count in linked.items():
        (category / folder).mkdir(parents=True)
        for path in itertools.islice(sorted((source / folder).iterdir()), count):
            os.symlink(path, category / folder / path.name)
    config = make_config("cflow_lite0", dataset="folder", data_root=str(category), img_size=64, epochs=1,
                         layers="blocks.2,blocks.4", condition_dims=16, n_flow_layers=2, val_fraction=0.25,
                         scoring="auto", cache=False, cache_dir=str(tmp_path / "cache"))
    task = load_tasks(config)[0]
    shutil.rmtree(category / "test")
    shutil.rmtree(category / "ground_truth")
    opened: list[str] = []
    original = datasets.FileLoader.__call__

    def logged(loader, position):
        opened.append(loader.paths[position])
        return original(loader, position)

    monkeypatch.setattr(datasets.FileLoader, "__call__", logged)
    extractor = FeatureExtractor(config)
    fit_index, held_index = held_out_split(len(task.train), config.val_fraction, config.seed)
    fit = StageFeatures(images=task.train.subset(fit_index), extractor=extractor, config=config)
    held = StageFeatures(images=task.train.subset(held_index), extractor=extractor, config=config)
    detector = CFlowDetector(config, extractor)
    info = detector.fit(fit, held, task.name, task.train.subset(held_index))
    assert opened and all(Path(path).parent == category / "train" / "good" for path in opened)
    assert len(info["scoring_selection"]) == len(candidate_rules(["blocks.2", "blocks.4"]))
    assert info["scoring_rule"] == str(detector.rule)
    assert detector.rule in candidate_rules(["blocks.2", "blocks.4"])
    assert all(0.0 <= row["image_auroc"] <= 1.0 for row in info["scoring_selection"])

    detector.save(tmp_path / "bottle.pt")  # the chosen rule travels with the checkpoint
    assert load_detector(tmp_path / "bottle.pt", config, extractor).rule == detector.rule
    with pytest.raises(DetectorError, match="scoring"):  # a checkpoint refuses another rule than its own
        load_detector(tmp_path / "bottle.pt", dataclasses.replace(config, scoring="exp/max"), extractor)
    with pytest.raises(DetectorError, match="val_fraction"):
        CFlowDetector(config, extractor).fit(fit, None, task.name, None)
