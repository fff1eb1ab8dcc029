"""Vision transformers: the features both methods read from a ViT, checked against timm's own paths, and the
real ViT-S/14 checkpoint of ../shared/weights end to end.

The checkpoint tests need ANOMALY_VIT_WEIGHTS (the float16 state dict ``vit_small_patch14_dinov2.fp16.pth``;
``.ci/run`` sets it) and, for the CFLOW run, ANOMALY_MVTEC_ROOT; they are skipped where those are absent.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, make_config
from extractor import FeatureExtractor
from main import results_folder, run
from model import load_detector
from report import read_scores_csv

VIT = "vit_small_patch14_dinov2"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_an_image_size_the_patches_do_not_tile_is_refused_with_the_sizes_that_do():
    with pytest.raises(ConfigError, match="--img_size 252 or 266"):
        FeatureExtractor(make_config("demo", method="cflow", backbone=VIT, weights="none", img_size=256,
                                     layers="blocks.11"))


def test_cflow_stages_of_a_vit_are_its_blocks_patch_tokens_as_maps():
    extractor = FeatureExtractor(make_config("demo", method="cflow", backbone=VIT, weights="none", img_size=56,
                                             layers="blocks.3,blocks.11"))
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    features = extractor(images)
    with torch.no_grad():  # timm's own intermediate path: block outputs without the class token, NCHW
        reference = extractor.head.backbone.forward_intermediates(
            extractor.normalise(images), indices=[3, 11], norm=False, output_fmt="NCHW", intermediates_only=True)
    for name, expected in zip(("blocks.3", "blocks.11"), reference):
        assert features[name].shape == (2, 384, 4, 4)
        assert torch.allclose(features[name], expected, atol=2e-3, rtol=2e-3)  # float16 values


def test_cflow_layers_auto_of_a_vit_are_its_blocks_at_thirds_of_its_depth():
    extractor = FeatureExtractor(make_config("demo", method="cflow", backbone=VIT, weights="none", img_size=56))
    assert len(extractor.head.backbone.blocks) == 12 and extractor.layers == ["blocks.3", "blocks.7", "blocks.11"]


def _reference_dinov2(weights_path) -> torch.nn.Module:
    """The checkpoint loaded the way its provenance note says (METHOD.md section 5), without the project's code."""
    import timm

    model = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=518, dynamic_img_size=True)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return model.eval()


def test_the_real_checkpoint_gives_timms_class_token_and_final_patch_tokens(vit_weights):
    config = make_config("demo", backbone=VIT, weights=str(vit_weights), img_size=224, patch_grid=2)
    extractor = FeatureExtractor(config)
    assert extractor.weights_source.startswith(f"file:{vit_weights.name}:sha256:")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    features = extractor(images)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = _reference_dinov2(vit_weights).forward_features((images.float() / 255 - mean) / std)
    patch_map = tokens[:, 1:].transpose(1, 2).reshape(2, 384, 16, 16)  # 224 / 14 = 16 patches a side
    pooled = F.adaptive_avg_pool2d(patch_map, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(features["sem"], tokens[:, 0], atol=2e-3, rtol=2e-3)
    assert torch.allclose(features["patches"], pooled, atol=2e-3, rtol=2e-3)


def test_cflow_on_the_real_vit_localises_bottle_defects_that_random_weights_miss(tmp_path, vit_weights, mvtec_root):
    base = make_config("demo", method="cflow", dataset="mvtec", data_root=str(mvtec_root), classes="bottle",
                       backbone=VIT, img_size=224, layers="blocks.5,blocks.11", epochs=1,
                       max_train_per_class=60, n_figure_images=0, cache_dir=str(tmp_path / "cache"))
    runs = {}
    for weights in (str(vit_weights), "none"):
        config = dataclasses.replace(base, weights=weights, results_dir=str(tmp_path / f"results-{weights != 'none'}"))
        runs[weights] = (config, run(config)["per_class"]["bottle"])
    (config, pretrained), (_, random_init) = runs[str(vit_weights)], runs["none"]
    # what the checkpoint adds is localisation: a random ViT's maps are near chance (0.5); maps taken from the
    # wrong tokens or laid out transposed would not point at the defects either
    assert pretrained["pixel_auroc"] >= random_init["pixel_auroc"] + 0.2, (pretrained, random_init)
    assert pretrained["image_auroc"] > random_init["image_auroc"]
    detector = load_detector(results_folder(config) / "checkpoints" / "bottle.pt")
    evaluated = read_scores_csv(results_folder(config) / "scores.csv")
    paths = sorted(evaluated)[:8]
    result = detector.predict(paths)
    assert result.maps.shape == (8, 224, 224)
    assert max(abs(float(score) - evaluated[path]) for score, path in zip(result.scores, paths)) <= 1e-5
