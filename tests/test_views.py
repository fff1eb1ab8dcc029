"""Transformed views and multi-scale tokens: exact inverses, the cache, scoring as the mean over views."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import extractor
from config import ConfigError, make_config
from datasets import load_tasks
from extractor import FeatureExtractor, StaleCacheError, cache_folder, cached_features, unit_key, unit_metadata
from main import run
from model import averaged_views, load_detector
from views import map_from_view, rotation_angles, view_of, views_of

SMALL = dict(max_train_per_class=12, max_test=20, classes="0", extract_batch_size=4, img_size=64)


@pytest.fixture(scope="module")
def demo_extractor() -> FeatureExtractor:
    return FeatureExtractor(make_config("demo", **SMALL))


def _images(count: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


@pytest.mark.parametrize("view_set,count", [("rot90", 8), ("flip", 4)])
def test_right_angle_and_flip_views_turn_back_pixel_exactly(view_set, count):
    images = _images()
    maps = images[:, 0].float()
    viewed = views_of(images, view_set, count)
    distinct = {tuple(view.flatten().tolist()) for view in viewed}
    assert len(distinct) == count  # every view is another image
    for view in range(count):
        assert torch.equal(map_from_view(view_of(maps, view_set, view), view_set, view), maps)
        assert torch.equal(viewed[view][:, 0].float(), view_of(maps, view_set, view))  # images and maps alike


def test_rot90_views_are_numpys_right_angle_turns_and_mirrorings():
    images = _images(1)
    array = images[0].permute(1, 2, 0).numpy()  # (H, W, 3), a reference outside torch
    expected = [np.rot90(array, k) for k in range(4)] + [np.rot90(array[:, ::-1], k) for k in range(4)]
    for view, reference in enumerate(expected):
        assert np.array_equal(view_of(images, "rot90", view)[0].permute(1, 2, 0).numpy(), reference)


def test_rotate_views_use_fixed_angles_and_turn_maps_back_near_the_centre():
    angles = rotation_angles(6)
    assert angles[0] == 0 and torch.equal(rotation_angles(3), angles[:3])  # a prefix does not depend on the count
    assert ((angles[1:] >= -180) & (angles[1:] < 180)).all() and len(set(angles.tolist())) == 6
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    smooth = torch.exp(-((yy - 40) ** 2 + (xx - 28) ** 2) / 200).unsqueeze(0)  # a blob off the centre
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 20 ** 2
    for view in range(1, 6):
        turned = view_of(smooth.unsqueeze(1), "rotate", view).squeeze(1)
        assert not torch.allclose(turned, smooth, atol=0.05)
        back = map_from_view(turned, "rotate", view)
        assert (back - smooth)[:, disc].abs().max() < 0.1  # bilinear after nearest: close, not exact


def test_averaged_views_turn_each_map_back_before_the_mean():
    base = torch.zeros(2, 8, 8)
    base[0, 1, 6] = 1.0  # one hot pixel per image, off every symmetry axis
    base[1, 5, 2] = 2.0
    views = 8
    maps = torch.stack([view_of(base, "rot90", view) for view in range(views)], dim=1).flatten(0, 1).numpy()
    scores = np.arange(16, dtype=np.float64)
    mean_scores, mean_maps = averaged_views(scores, maps, "rot90", views)
    assert np.allclose(mean_scores, [3.5, 11.5])
    assert np.array_equal(mean_maps, base.numpy())  # every view's map lands on the same pixel


def test_view_counts_and_scales_are_checked():
    with pytest.raises(ConfigError, match="at most 8"):
        make_config("demo", train_views=9)
    with pytest.raises(ConfigError, match="at most 4"):
        make_config("demo", view_set="flip", test_views=5)
    assert make_config("demo", view_set="rotate", train_views=64).train_views == 64
    with pytest.raises(ConfigError, match="first scale must be 1"):
        make_config("demo", scales="0.5,1")
    with pytest.raises(ConfigError, match="numbers"):
        make_config("demo", scales="1,half")
    with pytest.raises(ConfigError, match="--no-cache"):
        make_config("cflow_lite0", test_views=4, cache=False)
    assert make_config("demo", train_views=3, test_views=5).cached_views("train") == 5
    with pytest.raises(ConfigError, match="cannot exceed --train_views"):
        make_config("demo", view_statistics="per_view", train_views=2, test_views=4)
    with pytest.raises(ConfigError, match="--train_views 2 or more"):
        make_config("demo", view_statistics="per_view", method="knn", train_views=4, test_views=4)
    with pytest.raises(ConfigError, match="--token_dim 0"):
        make_config("demo", view_statistics="per_view", train_views=4, test_views=4, flow_channels=8)


def test_cached_views_round_trip_and_equal_the_views_features(tmp_path, demo_extractor):
    config = make_config("demo", cache_dir=str(tmp_path), train_views=3, **SMALL)
    task = load_tasks(config)[0]
    images = task.test.subset(np.arange(5))
    arrays = cached_features(demo_extractor, images, "unit", config, views=3)
    assert arrays["sem"].shape == (5, 3, 1280) and arrays["patches"].shape == (5, 3, 4, 112)
    assert arrays["sem"].dtype == np.float16
    pixels = torch.stack([torch.from_numpy(np.array(images.load(i).resize((64, 64), 3))).permute(2, 0, 1)
                          for i in range(5)])
    for view in range(3):  # each view's features: the backbone on numpy's turned image
        turned = torch.from_numpy(np.ascontiguousarray(np.rot90(pixels.numpy(), view, axes=(2, 3))))
        assert np.allclose(arrays["sem"][:, view].astype(np.float32), demo_extractor(turned)["sem"].numpy(),
                           atol=1e-3, rtol=2e-3)
    again = cached_features(demo_extractor, images, "unit", config, views=3)
    assert np.array_equal(np.asarray(again["sem"]), np.asarray(arrays["sem"]))
    one = cached_features(demo_extractor, images, "unit", config)  # one view: a unit of its own, (N, D)
    assert one["sem"].shape == (5, 1280)
    assert np.array_equal(np.asarray(one["sem"]), np.asarray(arrays["sem"][:, 0]))


def test_another_view_set_makes_the_unit_stale(tmp_path, demo_extractor):
    config = make_config("demo", cache_dir=str(tmp_path), train_views=3, **SMALL)
    flips = make_config("demo", cache_dir=str(tmp_path), train_views=3, view_set="flip", **SMALL)
    images = load_tasks(config)[0].test.subset(np.arange(4))
    cached_features(demo_extractor, images, "unit", config, views=3)
    assert unit_key("unit", config, 3) != unit_key("unit", flips, 3)
    stem = cache_folder(config) / unit_key("unit", config, 3)
    with pytest.raises(StaleCacheError, match="views"):
        extractor.read_unit(stem, unit_metadata(demo_extractor, flips, images, 3))


def test_scales_concatenate_each_scales_pooled_token(demo_extractor):
    images = _images(2)
    multi = FeatureExtractor(make_config("demo", scales="1,0.5", **SMALL))
    features = multi(images)
    assert features["sem"].shape == (2, 2 * 1280)
    plain = demo_extractor(images)
    assert torch.allclose(features["sem"][:, :1280], plain["sem"], atol=1e-3, rtol=2e-3)
    assert torch.equal(features["patches"], plain["patches"])  # texture tokens at scale 1
    half = torch.nn.functional.interpolate(demo_extractor.normalise(images), size=(32, 32), mode="bilinear",
                                           antialias=True, align_corners=False)
    with torch.no_grad():  # the eager backbone (not the traced graph) as the reference
        reference = demo_extractor.head.backbone.forward_features(half).mean(dim=(2, 3))
    assert torch.allclose(features["sem"][:, 1280:], reference, atol=2e-3, rtol=5e-3)
    assert cache_folder(make_config("demo", scales="1,0.5", **SMALL)) != cache_folder(make_config("demo", **SMALL))
    cflow = dict(SMALL, method="cflow", layers="blocks.2")
    assert cache_folder(make_config("demo", scales="1,0.5", **cflow)) == cache_folder(make_config("demo", **cflow))


@pytest.mark.parametrize("method,statistics", [("sanf", "pooled"), ("cflow", "pooled"), ("sanf", "per_view"),
                                               ("gaussian", "per_view")])
def test_predict_with_test_views_reproduces_the_evaluation(tmp_path, method, statistics):
    """Detector.predict on the test images (decoded again) gives the scores of scores.csv, made from the cache;
    with per-view statistics each view is scored with its own view's (the checkpoint holds them all)."""
    views = dict(train_views=4, test_views=4, view_statistics=statistics) if statistics == "per_view" else dict(
        train_views=2, test_views=4)
    config = make_config("demo", method=method, cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "r"),
                         epochs=1, hidden=64, **views, **{**SMALL, "max_test": 12})
    run(config)
    folder = next((tmp_path / "r").iterdir())
    with open(folder / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    detector = load_detector(folder / "checkpoints" / "0.pt")
    task = load_tasks(config)[0]
    prediction = detector.predict([task.test.load(i) for i in range(len(task.test))])
    assert np.abs(prediction.scores - np.array([float(row["score"]) for row in rows])).max() <= 1e-5
    if method == "cflow":  # the maps: each view's turned back, as the evaluation's
        assert prediction.maps.shape == (12, 64, 64)
