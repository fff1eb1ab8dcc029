"""Paths checked against references that do not share their code: the kNN baseline against a brute-force
distance matrix, the ViT feature path against timm's own forward, the traced CFLOW encoder against the eager
backbone on real images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import make_config
from datasets import load_tasks
from extractor import FeatureExtractor, image_batches
from model import KNNDetector


def test_knn_scores_are_the_mean_of_the_k_smallest_cosine_distances_by_brute_force():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 6)), rng.normal(size=(7, 6))
    detector = KNNDetector(make_config("demo", method="knn", knn_k=3, token_norm="none"))
    detector.fit({"sem": torch.from_numpy(bank).float()}, None, "toy")
    scores = detector.score({"sem": torch.from_numpy(queries).float()})[0]
    for query, score in zip(queries, scores):
        distances = sorted(1 - bank @ query / (np.linalg.norm(bank, axis=1) * np.linalg.norm(query)))
        assert score == pytest.approx(np.mean(distances[:3]), abs=1e-5)


def test_vit_features_are_timms_class_token_and_final_patch_tokens():
    config = make_config("demo", backbone="vit_tiny_patch16_224", weights="none", img_size=64, patch_grid=2)
    extractor = FeatureExtractor(config)  # a small random-weight ViT: 4x4 patches of 16 px
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    features = extractor(images)
    backbone = extractor.head.backbone
    with torch.no_grad():
        pixels = extractor.normalise(images)
        class_token = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        final_map = backbone.forward_intermediates(pixels, indices=1, norm=True, output_fmt="NCHW",
                                                   intermediates_only=True)[-1]
    assert features["sem"].shape == (3, 192) and features["patches"].shape == (3, 4, 192)
    assert torch.allclose(features["sem"], class_token, atol=1e-3, rtol=2e-3)
    pooled = F.adaptive_avg_pool2d(final_map, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(features["patches"], pooled, atol=1e-3, rtol=2e-3)


def test_traced_cflow_encoder_matches_the_eager_backbone_on_real_images(mvtec_root):
    config = make_config("cflow_lite0", data_root=str(mvtec_root), classes="bottle", img_size=128)
    extractor = FeatureExtractor(config)
    test = load_tasks(config)[0].test
    images = next(image_batches(test.subset(np.arange(0, len(test), 20)), config, batch_size=5))
    traced = extractor(images)
    with torch.no_grad():
        eager = dict(zip(extractor.names, extractor.head(extractor.normalise(images))))
    assert list(traced) == ["blocks.2", "blocks.4", "blocks.6"]
    for stage, reference in eager.items():
        assert traced[stage].shape == reference.shape
        relative = (traced[stage] - reference).abs().max() / reference.abs().max()
        assert relative < 2e-3, (stage, relative.item())  # float16 values and folded batch norms
