"""Backbones and the feature cache: weights, traced graph, round trip, resume, staleness."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import extractor
from config import ConfigError, make_config
from datasets import load_tasks
from extractor import (CacheError, FeatureExtractor, StaleCacheError, WeightsError, build_backbone,
                       cache_folder, cached_features, packaged_weights_file, task_features)
from model import DetectorError

SMALL = dict(max_train_per_class=12, max_test=20, classes="0", extract_batch_size=4, img_size=64)


@pytest.fixture(scope="module")
def demo_extractor():
    return FeatureExtractor(make_config("demo", **SMALL))


def test_default_lite0_weights_are_the_packaged_files_and_none_is_random():
    model, source = build_backbone("tf_efficientnet_lite0", "default")
    assert source.startswith("file:") and "sha256" in source
    stem = torch.load(packaged_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    stem_weight = next(iter(stem.values()))  # the stem convolution, first in the lukemelas layout
    assert torch.equal(model.state_dict()["conv_stem.weight"], stem_weight)
    random_model, random_source = build_backbone("tf_efficientnet_lite0", "none")
    assert random_source == "none" and not torch.equal(random_model.state_dict()["conv_stem.weight"], stem_weight)


def test_weights_file_that_does_not_match_the_backbone_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(WeightsError, match="does not match backbone"):
        build_backbone("tf_efficientnet_lite0", str(path))
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("tf_efficientnet_lite0", str(tmp_path / "missing.pth"))


def test_unknown_backbone_and_layer_are_config_errors():
    with pytest.raises(ConfigError):
        build_backbone("no_such_net", "none")
    with pytest.raises(ConfigError, match="no module 'blocks.99'"):
        FeatureExtractor(make_config("demo", method="cflow", layers="blocks.99", weights="none"))


@pytest.mark.parametrize("backbone, expected", [("tf_efficientnet_lite0", ["blocks.2", "blocks.4", "blocks.6"]),
                                                ("resnet18", ["layer2", "layer3", "layer4"])])
def test_cflow_layers_auto_are_a_cnns_stages_at_strides_8_16_32(backbone, expected):
    cflow = FeatureExtractor(make_config("demo", method="cflow", backbone=backbone, weights="none", img_size=64))
    assert cflow.layers == expected  # the paper's layer2-4 of a ResNet
    features = cflow(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert [features[name].shape[-1] for name in expected] == [64 // 8, 64 // 16, 64 // 32]


def test_a_scoring_rule_on_a_stage_that_layers_auto_does_not_extract_is_refused_before_training():
    with pytest.raises(ConfigError, match=r"names stages \['blocks.1'\] that --layers auto \(here blocks.2,blocks.4,"
                                          r"blocks.6\)"):
        FeatureExtractor(make_config("demo", method="cflow", weights="none", scoring="z/max@blocks.1+blocks.4"))


def test_cflow_layers_auto_refuses_a_vit_of_fewer_than_three_blocks_and_a_cnn_without_the_three_strides():
    from types import SimpleNamespace

    from extractor import cflow_layer_names

    config = make_config("demo", method="cflow")
    assert cflow_layer_names(config, SimpleNamespace(blocks=[0] * 24), is_vit=True) == [
        "blocks.7", "blocks.15", "blocks.23"]
    with pytest.raises(ConfigError, match="2 block\\(s\\), fewer than the three stages"):
        cflow_layer_names(config, SimpleNamespace(blocks=[0] * 2), is_vit=True)
    no_stride_32 = SimpleNamespace(feature_info=[{"reduction": 8, "module": "a"}, {"reduction": 16, "module": "b"}])
    with pytest.raises(ConfigError, match="no stage at stride 32 in timm's feature_info; pass --layers"):
        cflow_layer_names(config, no_stride_32, is_vit=False)
    named = make_config("demo", method="cflow", layers="a,b")
    assert cflow_layer_names(named, no_stride_32, is_vit=False) == ["a", "b"]


def test_traced_graph_matches_the_eager_backbone_for_any_batch(demo_extractor):
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    traced = demo_extractor(images)
    with torch.no_grad():
        eager = demo_extractor.head(demo_extractor.normalise(images))
    for name, reference in zip(demo_extractor.names, eager):
        assert traced[name].shape == reference.shape
        assert torch.allclose(traced[name], reference, atol=1e-3, rtol=1e-3)
    single = demo_extractor(images[:1])  # features are float16 values: equal up to one float16 step (2^-10)
    assert torch.allclose(single["sem"], traced["sem"][:1], atol=1e-4, rtol=2e-3)
    assert traced["sem"].shape == (5, 1280) and traced["patches"].shape == (5, 4, 112)  # stride-16 stage
    assert torch.equal(traced["sem"], traced["sem"].half().float())


def test_texture_tokens_are_the_stride_16_stage_pooled_not_the_last_stage(demo_extractor):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    features = demo_extractor(images)
    backbone = demo_extractor.head.backbone
    with torch.no_grad():  # timm's own intermediate-feature path as the reference
        stage = backbone.forward_intermediates(demo_extractor.normalise(images), indices=[3],
                                               intermediates_only=True)[0]
    expected = torch.nn.functional.adaptive_avg_pool2d(stage, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(features["patches"], expected, atol=1e-3, rtol=2e-3)
    last = FeatureExtractor(make_config("demo", texture_layers="last", **SMALL))(images)
    assert last["patches"].shape == (3, 4, 1280)
    assert torch.allclose(last["patches"].mean(dim=1), last["sem"], atol=1e-4, rtol=2e-3)  # the same map pooled
    both = FeatureExtractor(make_config("demo", texture_layers="blocks.2,blocks.4", **SMALL))(images)
    assert both["patches"].shape == (3, 4, 40 + 112)
    assert torch.allclose(both["patches"][..., 40:], features["patches"], atol=1e-3, rtol=2e-3)


def test_cache_round_trip_is_float16_and_shared(tmp_path, demo_extractor, monkeypatch):
    config = make_config("demo", cache_dir=str(tmp_path), **SMALL)
    task = load_tasks(config)[0]
    train, test = task_features(demo_extractor, task, config)
    assert train["sem"].dtype == np.float16 and train["sem"].shape == (12, 1280)
    assert test["patches"].shape == (20, 4, 112) and test["patches"].dtype == np.float16  # texture tokens
    fresh = demo_extractor(torch.stack([torch.from_numpy(np.array(task.test.load(i).resize((64, 64), 3)))
                                        .permute(2, 0, 1) for i in range(3)]))
    for name in ("sem", "patches"):
        assert np.allclose(test[name][:3].astype(np.float32), fresh[name].numpy(), atol=1e-3, rtol=2e-3)
    files = sorted(p.name for p in cache_folder(config).iterdir())
    assert not [f for f in files if "partial" in f or "progress" in f]
    calls = []
    original = type(demo_extractor).forward
    monkeypatch.setattr(type(demo_extractor), "forward", lambda self, images: calls.append(1) or original(self, images))
    again, _ = task_features(demo_extractor, task, config)  # read back, not re-extracted
    assert np.array_equal(np.asarray(again["sem"]), np.asarray(train["sem"])) and calls == []


def test_pixels_are_normalised_with_lite0s_mean_and_std_of_one_half(demo_extractor):
    """tf_efficientnet_lite0 was trained on (x / 255 - 0.5) / 0.5: black is -1, white +1, mid-gray 0.0039."""
    images = torch.stack([torch.full((3, 4, 4), value, dtype=torch.uint8) for value in (0, 255, 128)])
    pixels = demo_extractor.normalise(images)
    expected = torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_interrupted_extraction_resumes_and_is_never_read_as_complete(tmp_path, demo_extractor, monkeypatch):
    config = make_config("demo", cache_dir=str(tmp_path), **SMALL)
    task = load_tasks(config)[0]
    reference = cached_features(demo_extractor, task.test, "reference", config)

    calls = {"n": 0}
    original = extractor.image_batches

    def interrupted(images, config, start=0, batch_size=None):
        for batch in original(images, config, start, batch_size):
            calls["n"] += 1
            if calls["n"] == 4:  # the probe batch, then two batches written, then stop
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(extractor, "image_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_features(demo_extractor, task.test, "unit", config)
    stem = cache_folder(config) / "unit"
    assert not stem.with_suffix(".json").exists()
    assert extractor.read_unit(stem, extractor.unit_metadata(demo_extractor, config, task.test)) is None
    assert json.loads(stem.with_name("unit.progress.json").read_text())["done"] == 8

    starts = []

    def counting(images, config, start=0, batch_size=None):
        starts.append(start)
        yield from original(images, config, start, batch_size)

    monkeypatch.setattr(extractor, "image_batches", counting)
    resumed = cached_features(demo_extractor, task.test, "unit", config)
    assert starts[-1] == 8
    assert np.array_equal(np.asarray(resumed["patches"]), np.asarray(reference["patches"]))


def test_stale_cache_is_refused_then_rebuilt_on_request(tmp_path, demo_extractor):
    config = make_config("demo", cache_dir=str(tmp_path), **SMALL)
    task = load_tasks(config)[0]
    cached_features(demo_extractor, task.train, "unit", config)
    other_images = load_tasks(make_config("demo", **{**SMALL, "classes": "1"}))[0].train
    with pytest.raises(StaleCacheError, match="stale .*images.*refresh_cache"):
        cached_features(demo_extractor, other_images, "unit", config)
    meta_path = cache_folder(config) / "unit.json"
    stored = json.loads(meta_path.read_text())
    stored["meta"]["weights"] = "file:other.pth"
    meta_path.write_text(json.dumps(stored))
    with pytest.raises(StaleCacheError, match="weights"):
        cached_features(demo_extractor, task.train, "unit", config)
    refreshed = make_config("demo", cache_dir=str(tmp_path), refresh_cache=True, **SMALL)
    other_unit = cached_features(demo_extractor, other_images, "other", config)["sem"]
    assert cached_features(demo_extractor, task.train, "unit", refreshed)["sem"].shape == (12, 1280)
    # the refresh rebuilt that unit only: the other one is still there, unchanged
    assert np.array_equal(np.asarray(cached_features(demo_extractor, other_images, "other", config)["sem"]),
                          np.asarray(other_unit))
    assert (cache_folder(config) / "other.json").stat().st_mtime <= (cache_folder(config) / "unit.json").stat().st_mtime


def test_other_texture_layers_make_the_cache_stale_and_get_their_own_folder(tmp_path, demo_extractor):
    config = make_config("demo", cache_dir=str(tmp_path), **SMALL)
    task = load_tasks(config)[0]
    cached_features(demo_extractor, task.train, "unit", config)
    shallow = make_config("demo", cache_dir=str(tmp_path), texture_layers="blocks.2", **SMALL)
    assert cache_folder(shallow) != cache_folder(config)
    shallow_extractor = FeatureExtractor(shallow)
    with pytest.raises(StaleCacheError, match="texture_layers"):  # the same unit read by another texture setting
        cached_features(shallow_extractor, task.train, "unit", config)
    assert cached_features(shallow_extractor, task.train, "unit", shallow)["patches"].shape == (12, 4, 40)


def test_cache_that_does_not_fit_is_refused_up_front(tmp_path, demo_extractor, monkeypatch):
    config = make_config("demo", cache_dir=str(tmp_path), **SMALL)
    task = load_tasks(config)[0]
    monkeypatch.setattr(extractor.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(CacheError, match="needs .* GB"):
        cached_features(demo_extractor, task.train, "unit", config)
    assert not list(cache_folder(config).glob("unit*"))


def test_batches_decoded_on_threads_equal_one_image_at_a_time_in_order(tmp_path):
    from PIL import Image

    from datasets import image_list_from_files

    generator = np.random.default_rng(0)
    paths = []
    for index, size in enumerate([(40, 30), (64, 64), (17, 90), (64, 64), (120, 80)]):
        path = tmp_path / f"{index}.png"
        Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    images = image_list_from_files(paths)
    config = make_config("demo", img_size=48)
    expected = [torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((48, 48), Image.BICUBIC)))
                .permute(2, 0, 1) for path in paths]
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            batches = list(extractor.image_batches(images, config, start=1, batch_size=3))
            assert [len(batch) for batch in batches] == [3, 1]
            assert torch.equal(torch.cat(batches), torch.stack(expected[1:]))
    finally:
        torch.set_num_threads(threads)


def test_cflow_layers_auto_shares_the_cache_folder_of_the_stages_it_resolves_to(tmp_path):
    named = make_config("demo", method="cflow", layers="blocks.2,blocks.4,blocks.6", cache_dir=str(tmp_path))
    auto = make_config("demo", method="cflow", cache_dir=str(tmp_path))
    assert auto.layers == "auto" and cache_folder(auto, FeatureExtractor(auto).layers) == cache_folder(named)


def test_a_cflow_detector_refuses_a_backbone_giving_other_stages_and_auto_is_not_a_difference_by_name():
    from model import CFlowDetector, settings_differences

    trained = make_config("demo", method="cflow", weights="none", img_size=64)
    detector = CFlowDetector(trained)
    detector.build({"blocks.2": 40, "blocks.4": 112, "blocks.6": 320})
    detector.check_stages(FeatureExtractor(trained))  # auto resolves to the stages it was trained on
    shallow = dataclasses.replace(trained, layers="blocks.1,blocks.2,blocks.4")
    with pytest.raises(DetectorError, match="pass --layers blocks.2,blocks.4,blocks.6"):
        detector.check_stages(FeatureExtractor(shallow))
    named = dataclasses.replace(trained, layers="blocks.2,blocks.4,blocks.6")
    assert settings_differences(named, trained) == [] and settings_differences(shallow, named) != []
    assert settings_differences(named, dataclasses.replace(trained, layers=" auto ")) == []


def test_a_saved_cflow_detector_loaded_for_a_backbone_giving_other_stages_is_refused(tmp_path):
    """load_detector checks the stages of an extractor it is given, and the detector those of one it builds."""
    from model import CFlowDetector, load_detector

    trained = make_config("demo", method="cflow", weights="none", img_size=64)
    detector = CFlowDetector(trained, FeatureExtractor(trained))
    detector.build({"blocks.2": 40, "blocks.4": 112, "blocks.6": 320})
    detector.save(tmp_path / "detector.pt")
    shallow = dataclasses.replace(trained, layers="blocks.1,blocks.2,blocks.4")
    with pytest.raises(DetectorError, match="pass --layers blocks.2,blocks.4,blocks.6"):
        load_detector(tmp_path / "detector.pt", shallow, extractor=FeatureExtractor(shallow))
    lazy = load_detector(tmp_path / "detector.pt", shallow)
    with pytest.raises(DetectorError, match="pass --layers blocks.2,blocks.4,blocks.6"):
        lazy.extractor
    assert load_detector(tmp_path / "detector.pt", trained).extractor.layers == ["blocks.2", "blocks.4", "blocks.6"]
