"""Tests of the CFLOW-AD model (model.py) and its post-processing (anomaly_map.py).

Run from the repository root: python -m pytest tests/test_cflow.py -q
"""

import math
import shutil

import numpy as np
import pytest
import torch

from anomaly_map import AnomalyMapGenerator, ScoringRule, auroc_standard_error, chosen_index, stage_statistics
from config import Config, make_config
from conftest import untimed_curve
from model import (CFlowDetector, CFlowModel, StageFeatures, anomaly_maps, build_cflow_decoder,
                   positional_encoding_2d)
from report import cflow_table, figure_indices
import train as train_module
from datasets import ArrayLoader, ImageList
from extractor import randomly_rotated
from train import (TrainingError, cflow_loss, official_cflow_lr, shuffled_fiber_chunks, stage_groups,
                   stage_loss_function, train_cflow)

OFFICIAL_GCONST = -0.9189385332046727  # ln(1/sqrt(2 pi)), ``_GCONST_`` in the official code


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Move every trainable parameter away from its initial value (in place), for tests that init could pass by luck."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


# --- positional encoding -------------------------------------------------------------------


def test_positional_encoding_shape_and_values():
    channels, height, width = 8, 3, 5
    half = channels // 2
    encoding = positional_encoding_2d(channels, height, width)
    assert encoding.shape == (channels, height, width)
    assert encoding[0, 0, 0] == 0.0  # sin(x=0)
    assert encoding[1, 0, 0] == 1.0  # cos(x=0)
    assert encoding[half, 0, 0] == 0.0  # sin(y=0)
    assert encoding[half + 1, 0, 0] == 1.0  # cos(y=0)
    assert encoding[0, 0, 1] == pytest.approx(math.sin(1.0))  # div_term[0] = 1
    assert encoding[half, 2, 0] == pytest.approx(math.sin(2.0))
    # channel 2 is sin(x * 1e4^(-2/half))
    assert encoding[2, 0, 3] == pytest.approx(math.sin(3 * 1e4 ** (-2 / half)), rel=1e-6)
    # first half depends on x only, second half on y only
    assert torch.equal(encoding[:half], encoding[:half, :1].expand(-1, height, -1))
    assert torch.equal(encoding[half:], encoding[half:, :, :1].expand(-1, -1, width))
    assert not torch.equal(encoding[:half, :, 0], encoding[:half, :, 1])
    assert not torch.equal(encoding[half:, 0], encoding[half:, 1])


@pytest.mark.parametrize("channels", [2, 6, 127])
def test_positional_encoding_rejects_channels_not_divisible_by_4(channels):
    with pytest.raises(ValueError):
        positional_encoding_2d(channels, 4, 4)


# --- conditional decoder -------------------------------------------------------------------


def test_decoder_is_invertible_given_the_condition():
    decoder = perturbed(build_cflow_decoder(6, condition_dims=8, n_blocks=4, seed=0).double(), seed=1)
    generator = torch.Generator().manual_seed(2)
    fibers = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    conditions = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    z, log_jac_det = decoder(fibers, [conditions])
    reconstructed, reverse_log_jac_det = decoder(z, [conditions], rev=True)
    assert not torch.allclose(z, fibers)
    torch.testing.assert_close(reconstructed, fibers)
    torch.testing.assert_close(reverse_log_jac_det, -log_jac_det)


def test_decoder_log_det_matches_autograd_jacobian():
    decoder = perturbed(build_cflow_decoder(4, condition_dims=4, n_blocks=2, seed=0).double(), seed=3)
    generator = torch.Generator().manual_seed(4)
    fibers = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    conditions = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    _, log_jac_det = decoder(fibers, [conditions])
    for i in range(fibers.shape[0]):
        condition = conditions[i : i + 1]
        jacobian = torch.autograd.functional.jacobian(
            lambda fiber: decoder(fiber.unsqueeze(0), [condition])[0].squeeze(0), fibers[i]
        )
        assert jacobian.shape == (4, 4)
        _, log_abs_det = torch.linalg.slogdet(jacobian)
        torch.testing.assert_close(log_jac_det[i], log_abs_det)
    assert log_jac_det.abs().min() > 1e-3  # the perturbed flow is not volume-preserving


def test_decoder_output_depends_on_the_condition():
    decoder = build_cflow_decoder(6, condition_dims=8, n_blocks=2, seed=0)
    generator = torch.Generator().manual_seed(5)
    fibers = torch.randn(10, 6, generator=generator)
    z_a, _ = decoder(fibers, [torch.randn(10, 8, generator=generator)])
    z_b, _ = decoder(fibers, [torch.randn(10, 8, generator=generator)])
    assert (z_a - z_b).abs().max() > 1e-3


def test_decoder_seed_fixes_permutations_and_weights_without_touching_global_rngs():
    np.random.seed(7)
    torch.manual_seed(7)
    expected_numpy, expected_torch = np.random.rand(), torch.rand(1)
    np.random.seed(7)
    torch.manual_seed(7)
    first = build_cflow_decoder(16, condition_dims=8, n_blocks=3, seed=11).state_dict()
    assert np.random.rand() == expected_numpy and torch.equal(torch.rand(1), expected_torch)

    again = build_cflow_decoder(16, condition_dims=8, n_blocks=3, seed=11).state_dict()
    other = build_cflow_decoder(16, condition_dims=8, n_blocks=3, seed=12).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    permutation_keys = [key for key in first if key.endswith("w_perm")]
    assert len(permutation_keys) == 3
    assert any(not torch.equal(first[key], other[key]) for key in permutation_keys)


# --- CFlowModel ----------------------------------------------------------------------------


def test_model_keeps_stage_names_and_maps_module_keys():
    model = CFlowModel({"blocks.2": 6, "blocks.4": 10}, condition_dims=8, n_blocks=2)
    assert model.stage_names == ("blocks.2", "blocks.4")
    assert set(model.decoders.keys()) == {"blocks_2", "blocks_4"}
    assert model.decoder("blocks.4") is model.decoders["blocks_4"]
    with pytest.raises(ValueError):
        CFlowModel({"a.b": 4, "a_b": 4}, condition_dims=8, n_blocks=1)


def test_fiber_log_likelihood_per_dim_is_the_official_formula_over_channels():
    channels = 6
    model = perturbed(CFlowModel({"blocks.2": channels}, condition_dims=8, n_blocks=2), seed=6)
    generator = torch.Generator().manual_seed(8)
    fibers = torch.randn(12, channels, generator=generator)
    conditions = torch.randn(12, 8, generator=generator)
    z, log_jac_det = model.decoder("blocks.2")(fibers, [conditions])
    official_log_p = channels * OFFICIAL_GCONST - 0.5 * torch.sum(z**2, 1) + log_jac_det
    result = model.fiber_log_likelihood_per_dim("blocks.2", fibers, conditions)
    assert result.shape == (12,)
    torch.testing.assert_close(result, official_log_p / channels)


def test_fibers_of_orders_fibers_b_h_w_with_matching_conditions():
    model = CFlowModel({"s": 3}, condition_dims=8, n_blocks=1)
    batch, channels, height, width = 2, 3, 4, 5
    feature_map = torch.randn(batch, channels, height, width)
    fibers, conditions = model.fibers_of(feature_map)
    assert fibers.shape == (batch * height * width, channels)
    assert conditions.shape == (batch * height * width, 8)
    encoding = positional_encoding_2d(8, height, width)
    b, h, w = 1, 2, 3
    row = b * height * width + h * width + w
    assert torch.equal(fibers[row], feature_map[b, :, h, w])
    assert torch.equal(conditions[row], encoding[:, h, w])
    assert torch.equal(conditions[h * width + w], encoding[:, h, w])
    second_fibers, second_conditions = model.fibers_of(feature_map)  # cached encoding
    assert torch.equal(second_conditions, conditions) and torch.equal(second_fibers, fibers)


def test_stage_log_likelihood_maps_match_fiber_scores_for_any_chunk():
    model = perturbed(CFlowModel({"blocks.2": 4, "blocks.4": 6}, condition_dims=8, n_blocks=2), seed=9)
    generator = torch.Generator().manual_seed(10)
    features = {
        "blocks.2": torch.randn(2, 4, 6, 6, generator=generator),
        "blocks.4": torch.randn(2, 6, 3, 3, generator=generator),
    }
    maps = model.stage_log_likelihood_maps(features, chunk=7)
    whole = model.stage_log_likelihood_maps(features)
    assert maps["blocks.2"].shape == (2, 6, 6) and maps["blocks.4"].shape == (2, 3, 3)
    assert not maps["blocks.2"].requires_grad
    for stage in features:
        torch.testing.assert_close(maps[stage], whole[stage])
    fiber = features["blocks.4"][1, :, 2, 0].unsqueeze(0)
    condition = positional_encoding_2d(8, 3, 3)[:, 2, 0].unsqueeze(0)
    expected = model.fiber_log_likelihood_per_dim("blocks.4", fiber, condition)
    torch.testing.assert_close(maps["blocks.4"][1, 2, 0], expected[0])


@pytest.mark.parametrize("permute_soft", [False, True])
def test_folded_maps_equal_freia_on_every_fiber_with_odd_channels(permute_soft):
    """The evaluation path (condition folded per position, permutation gathered) against FrEIA's forward."""
    model = perturbed(CFlowModel({"odd": 5}, condition_dims=8, n_blocks=3, permute_soft=permute_soft), seed=3)
    feature_map = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(4))
    maps = model.stage_log_likelihood_maps({"odd": feature_map}, chunk=30)  # 30 fibers: whole images of 24
    fibers, conditions = model.fibers_of(feature_map)
    with torch.no_grad():
        expected = model.fiber_log_likelihood_per_dim("odd", fibers, conditions).reshape(3, 4, 6)
    torch.testing.assert_close(maps["odd"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler (g++)")
def test_compiled_training_loss_and_gradients_equal_eager():
    model = perturbed(CFlowModel({"s": 6}, condition_dims=8, n_blocks=2), seed=5)
    generator = torch.Generator().manual_seed(6)
    fibers, conditions = torch.randn(16, 6, generator=generator), torch.randn(16, 8, generator=generator)
    results = []
    for compile_it in (False, True):
        model.zero_grad(set_to_none=True)
        loss = stage_loss_function(model, compile_it)("s", fibers, conditions)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_a_failing_compile_stops_with_the_fix(monkeypatch):
    def broken(function):
        def raise_error(*args):
            raise RuntimeError("no compiler found")
        return raise_error

    monkeypatch.setattr(torch, "compile", broken)
    loss = stage_loss_function(CFlowModel({"s": 4}, condition_dims=8, n_blocks=1), True)
    with pytest.raises(TrainingError, match="--compile failed .*no compiler found.*C\\+\\+ compiler.*drop --compile"):
        loss("s", torch.randn(3, 4), torch.randn(3, 8))


def test_cflow_loss_is_mean_negative_logsigmoid():
    assert cflow_loss(torch.zeros(5)).item() == pytest.approx(math.log(2.0))
    assert cflow_loss(torch.tensor([-3.0, 3.0])).item() == pytest.approx(
        0.5 * (math.log1p(math.exp(3.0)) + math.log1p(math.exp(-3.0)))
    )


def test_shuffled_fiber_chunks_cover_each_fiber_once_and_keep_pairs():
    fibers = torch.arange(10.0).unsqueeze(1).repeat(1, 3)  # fiber i is (i, i, i)
    conditions = -fibers[:, :2]  # condition i is (-i, -i)
    chunks = list(shuffled_fiber_chunks(fibers, conditions, 4, torch.Generator().manual_seed(0)))
    assert [len(chunk_fibers) for chunk_fibers, _ in chunks] == [4, 4, 2]
    order = torch.cat([chunk_fibers[:, 0] for chunk_fibers, _ in chunks])
    assert torch.equal(order.sort().values, torch.arange(10.0))
    assert not torch.equal(order, torch.arange(10.0))
    for chunk_fibers, chunk_conditions in chunks:
        assert torch.equal(chunk_conditions, -chunk_fibers[:, :2])

    def order_for(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([f[:, 0] for f, _ in shuffled_fiber_chunks(fibers, conditions, 4, generator)])

    assert torch.equal(order_for(0), order)
    assert not torch.equal(order_for(1), order)


# --- anomaly maps --------------------------------------------------------------------------

IMAGE_SIZE = (29, 29)  # with align_corners=True, 8x8 -> 29x29 scales by 4 and 15x15 -> 29x29 by 2
STAGE_SHAPES = {"blocks.2": (15, 15), "blocks.4": (8, 8)}
PATCH = {"blocks.2": (slice(4, 7), slice(8, 11)), "blocks.4": (slice(2, 4), slice(4, 6))}
PATCH_ROWS, PATCH_COLS = range(8, 13), range(16, 21)  # the patch in image pixels, in both stages


def synthetic_stage_maps(
    patched: list[bool], generator: torch.Generator, level: float = -1.0
) -> dict[str, torch.Tensor]:
    """log p / C maps: ``level`` plus noise, and -20 on the patch for the images marked in ``patched``."""
    maps = {}
    for stage, (height, width) in STAGE_SHAPES.items():
        log_likelihood = level + 0.1 * torch.randn(len(patched), height, width, generator=generator)
        rows, cols = PATCH[stage]
        for image, has_patch in enumerate(patched):
            if has_patch:
                log_likelihood[image, rows, cols] = -20.0
        maps[stage] = log_likelihood
    return maps


def synthetic_reference(generator: torch.Generator) -> dict[str, dict[str, float]]:
    return stage_statistics(synthetic_stage_maps([False] * 4, generator) for _ in range(3))


def test_stage_statistics_over_batches_equal_numpy_over_all_values():
    batches = [{"s": torch.tensor([[[0.0, -2.0]]])}, {"s": torch.tensor([[[1.5, -3.0], [0.5, 0.25]]])}]
    values = np.array([0.0, -2.0, 1.5, -3.0, 0.5, 0.25])
    statistics = stage_statistics(batches)["s"]
    assert statistics["max"] == 1.5
    assert statistics["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert statistics["std"] == pytest.approx(values.std(), rel=1e-12)
    with pytest.raises(ValueError):
        stage_statistics([])


def test_anomaly_map_locates_a_known_patch_and_ranks_the_patched_image_higher():
    generator = torch.Generator().manual_seed(0)
    map_generator = AnomalyMapGenerator(IMAGE_SIZE, "train", synthetic_reference(generator))
    stage_maps = synthetic_stage_maps([True, False], generator)
    anomaly_maps = map_generator(stage_maps)
    assert anomaly_maps.shape == (2, *IMAGE_SIZE)
    # on pixels that are grid points of both stages (align_corners=True) the map is exact
    for r, c in [(0, 0), (3, 5), (7, 7)]:
        probabilities = [
            math.exp(stage_maps["blocks.4"][1, r, c].item() - map_generator.statistics["blocks.4"]["max"]),
            math.exp(stage_maps["blocks.2"][1, 2 * r, 2 * c].item() - map_generator.statistics["blocks.2"]["max"]),
        ]
        assert anomaly_maps[1, 4 * r, 4 * c].item() == pytest.approx(2 - sum(probabilities), rel=1e-12)
    row, col = divmod(int(anomaly_maps[0].argmax()), IMAGE_SIZE[1])
    assert row in PATCH_ROWS and col in PATCH_COLS
    scores = map_generator.image_scores(anomaly_maps)
    assert scores.shape == (2,)
    assert scores[0] > scores[1] + 1.0


def test_train_normalisation_is_batch_independent_and_batch_normalisation_is_not():
    generator = torch.Generator().manual_seed(1)
    reference = synthetic_reference(generator)
    maps = synthetic_stage_maps([True, False], generator)
    likelier = synthetic_stage_maps([False], generator, level=0.0)  # a normal image with higher log p / C
    batch = {stage: torch.cat([maps[stage], likelier[stage]]) for stage in maps}
    single = [{stage: batch[stage][i : i + 1] for stage in batch} for i in range(3)]

    by_train = AnomalyMapGenerator(IMAGE_SIZE, "train", reference)
    batched_maps = by_train(batch)
    single_maps = torch.cat([by_train(image) for image in single])
    assert torch.equal(batched_maps, single_maps)

    by_batch = AnomalyMapGenerator(IMAGE_SIZE, "batch")
    batched_maps = by_batch(batch)
    assert batched_maps.min() == 0.0  # max(summed) - summed over the batch
    assert torch.equal(AnomalyMapGenerator(IMAGE_SIZE, "test")(batch), batched_maps)
    batched_scores = by_batch.image_scores(batched_maps)
    single_scores = torch.cat([by_batch.image_scores(by_batch(image)) for image in single])
    # the normal image (index 1) looks more anomalous next to an image of higher likelihood
    assert batched_scores[1] > single_scores[1] + 0.5


def test_anomaly_map_generator_validates_its_arguments():
    with pytest.raises(ValueError):
        AnomalyMapGenerator(IMAGE_SIZE, "global")
    with pytest.raises(ValueError):
        AnomalyMapGenerator(IMAGE_SIZE, "train")
    with pytest.raises(ValueError):
        AnomalyMapGenerator(IMAGE_SIZE, "batch", rule=ScoringRule("z", "max"))
    generator = AnomalyMapGenerator(IMAGE_SIZE, "train", {"blocks.2": {"max": 0.0, "mean": 0.0, "std": 1.0}})
    with pytest.raises(ValueError):
        generator(synthetic_stage_maps([False], torch.Generator().manual_seed(2)))


# --- main.py: training and scoring ---------------------------------------------------------

STAGE_CHANNELS = {"blocks.2": 6, "blocks.4": 10}
STAGE_SIZES = {"blocks.2": 8, "blocks.4": 4}


def small_config(**overrides) -> Config:
    values = dict(img_size=16, condition_dims=8, n_flow_layers=2, fiber_batch=50, batch_size=3, epochs=2,
                  lr=1e-3, test_batch_size=4)
    return make_config("cflow_lite0", **{**values, **overrides})


def random_stage_features(count: int, seed: int, config: Config, shift: float = 0.0) -> StageFeatures:
    """float16 arrays as the cache holds them, (count, C, H, W) per stage."""
    rng = np.random.default_rng(seed)
    arrays = {stage: (rng.normal(size=(count, channels, STAGE_SIZES[stage], STAGE_SIZES[stage])) + shift)
              .astype(np.float16) for stage, channels in STAGE_CHANNELS.items()}
    return StageFeatures.from_arrays(arrays, config.device)


def trained_detector(config: Config, fit: StageFeatures) -> CFlowDetector:
    """A detector whose decoders are moved away from their initial values, with its training statistics."""
    detector = CFlowDetector(config)
    detector.model = perturbed(CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2), seed=3)
    detector.statistics = detector.training_statistics(fit)
    return detector


def test_train_normalised_scores_do_not_depend_on_the_test_batch_size():
    detector = trained_detector(small_config(), random_stage_features(5, 0, small_config()))
    test = random_stage_features(7, 1, small_config(), shift=0.5)
    detector.config = small_config(test_batch_size=7)
    scores, maps = detector.score(test)
    assert scores.shape == (7,) and maps.shape == (7, 16, 16)
    np.testing.assert_allclose(scores, maps.reshape(7, -1).max(axis=1), rtol=1e-6)  # image score = max of map
    for batch_size in (1, 3):
        detector.config = small_config(test_batch_size=batch_size)
        other_scores, other_maps = detector.score(test)
        np.testing.assert_allclose(other_scores, scores, rtol=1e-6)
        np.testing.assert_allclose(other_maps, maps, rtol=1e-6)
    # the same comparison does see the dependence of anomalib's per-batch normalisation
    by_batch = []
    for size in (1, 7):
        detector.config = small_config(map_norm="batch", test_batch_size=size)
        by_batch.append(detector.score(test)[0])
    assert np.abs(by_batch[0] - by_batch[1]).max() > 1e-3


def test_training_statistics_are_those_of_the_fit_fibers_log_likelihoods():
    fit = random_stage_features(5, 0, small_config())
    detector = trained_detector(small_config(test_batch_size=2), fit)
    with torch.no_grad():
        for stage, channels in STAGE_CHANNELS.items():
            fibers, conditions = detector.model.fibers_of(fit.maps[stage])
            brute = detector.model.fiber_log_likelihood_per_dim(stage, fibers, conditions).double().numpy()
            statistics = detector.statistics[stage]
            assert statistics["max"] == pytest.approx(brute.max(), rel=1e-5)
            assert statistics["mean"] == pytest.approx(brute.mean(), rel=1e-5)
            assert statistics["std"] == pytest.approx(brute.std(), rel=1e-4)


def test_training_is_seeded_counts_every_fiber_once_per_epoch_and_lowers_the_loss():
    config = small_config(epochs=3)
    train = random_stage_features(5, 2, config, shift=2.0)
    models = [CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2, seed=config.seed) for _ in range(2)]
    infos = [train_cflow(model, train, None, config, "synthetic") for model in models]
    first, second = (model.state_dict() for model in models)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert untimed_curve(infos[0]["curve"]) == untimed_curve(infos[1]["curve"])
    assert all(record["seconds"] > 0 for record in infos[0]["curve"])
    assert infos[0]["train_fibers_per_epoch"] == 5 * (8 * 8 + 4 * 4)
    assert infos[0]["train_fibers_per_second"] > 0 and infos[0]["seconds_per_epoch"] > 0
    losses = [record["train_loss"] for record in infos[0]["curve"]]
    assert losses[-1] < losses[0]


def test_held_out_nll_picks_the_kept_epoch_and_never_ends_above_the_start():
    config = small_config(epochs=3, lr=5e-2, patience=0)  # a learning rate this high: an erratic held-out NLL
    fit = random_stage_features(4, 2, config, shift=2.0)
    held_out = random_stage_features(3, 5, config, shift=-2.0)  # far from the fit images
    model = CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2, seed=config.seed)
    info = train_cflow(model, fit, held_out, config, "synthetic")
    curve = [record["held_out_nll"] for record in info["curve"]]
    assert len(curve) == 4 and info["kept_epoch"] == int(np.argmin(curve))
    assert info["held_out_nll"] == min(curve)
    # the kept weights are those of that epoch: measure the held-out NLL again by brute force
    with torch.no_grad():
        values = []
        for stage in STAGE_CHANNELS:
            fibers, conditions = model.fibers_of(held_out.maps[stage])
            values.append(-model.fiber_log_likelihood_per_dim(stage, fibers, conditions).double().mean().item())
    assert np.mean(values) == pytest.approx(info["held_out_nll"], rel=1e-5)


def official_code_rates(lr: float, meta_epochs: int, sub_epochs: int, batches: int) -> list[float]:
    """The learning rate of every image batch of an official CFLOW-AD run, set as its code sets it: its
    config (``lr_warm``, ``lr_cosine``, ``lr_decay_rate`` 0.1, ``lr_warm_epochs`` 2), then per meta-epoch
    ``adjust_learning_rate`` and per image batch ``warmup_learning_rate``, read back from the param group."""
    warm_epochs, decay_rate = 2, 0.1
    warmup_from = lr / 10.0
    eta_min = lr * decay_rate ** 3
    warmup_to = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * warm_epochs / meta_epochs)) / 2
    param_group, rates = {}, []
    for epoch in range(meta_epochs):
        param_group["lr"] = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / meta_epochs)) / 2
        for sub_epoch in range(sub_epochs):
            for i in range(batches):
                batch_id, total_batches = i + sub_epoch * batches, batches * sub_epochs
                if epoch < warm_epochs:
                    progress = (batch_id + epoch * total_batches) / (warm_epochs * total_batches)
                    param_group["lr"] = warmup_from + progress * (warmup_to - warmup_from)
                rates.append(param_group["lr"])
    return rates


def test_the_official_schedule_is_the_official_code_s_at_every_image_batch():
    config = make_config("cflow_lite0", lr_schedule="official", epochs=200)
    batches = 6
    ours = [official_cflow_lr(config, epoch, batch, batches) for epoch in range(1, 201) for batch in range(batches)]
    assert ours == pytest.approx(official_code_rates(2e-4, 25, 8, batches), rel=1e-12, abs=0)
    # by hand: the warm-up starts at lr / 10 and ends at the cosine value of meta-epoch 2, which meta-epoch 3
    # (epochs 17-24) keeps; the last meta-epoch is 24 of 25 steps down the cosine towards lr * 1e-3
    eta_min = 2e-7
    assert ours[0] == pytest.approx(2e-5, rel=1e-12)
    meta_epoch_2 = eta_min + (2e-4 - eta_min) * (1 + math.cos(2 * math.pi / 25)) / 2
    assert ours[16 * batches] == ours[24 * batches - 1] == pytest.approx(meta_epoch_2, rel=1e-12)
    assert ours[16 * batches - 1] == pytest.approx(2e-5 + (meta_epoch_2 - 2e-5) * (16 * batches - 1) / (16 * batches))
    assert ours[-1] == pytest.approx(eta_min + (2e-4 - eta_min) * (1 + math.cos(24 * math.pi / 25)) / 2, rel=1e-12)


def test_training_with_the_official_schedule_steps_at_its_rate_in_every_image_batch(monkeypatch):
    """Every Adam step of an image batch runs at that batch's rate (5 fit images, batches of 3: 2 per epoch)."""
    config = small_config(epochs=3, sub_epochs=1, lr_schedule="official", patience=0)
    rates = []
    step = train_module._step

    def recording_step(loss, optimizer, parameters, config):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(loss, optimizer, parameters, config)

    monkeypatch.setattr(train_module, "_step", recording_step)
    fit = random_stage_features(5, 2, config, shift=2.0)
    train_cflow(CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2, seed=0), fit, None, config, "synthetic")
    chunks_per_batch = [math.ceil(3 * 64 / 50) + 1, math.ceil(2 * 64 / 50) + 1]  # two stages, 50 fibers per step
    expected = [rate for index, rate in enumerate(official_code_rates(1e-3, 3, 1, 2))
                for _ in range(chunks_per_batch[index % 2])]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == pytest.approx(1e-4) and len(set(rates)) == 5  # 4 warm-up rates, then meta-epoch 2's


def test_random_rotation_turns_each_image_by_its_own_angle_within_the_bound():
    """A spot 100 px right of the centre comes out at the angle drawn for its image, |angle| <= degrees."""
    size, count, degrees, centre = 257, 12, 5.0, 128
    images = torch.zeros(count, 3, size, size, dtype=torch.uint8)
    images[:, :, centre - 2:centre + 3, centre + 98:centre + 103] = 255
    rotated = randomly_rotated(images, degrees, torch.Generator().manual_seed(4))
    drawn = (torch.rand(count, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1) * degrees
    measured = []
    for image in rotated:
        rows, columns = np.nonzero(image[0].numpy() > 127)
        measured.append(math.degrees(math.atan2(centre - rows.mean(), columns.mean() - centre)))  # y up
    np.testing.assert_allclose(measured, drawn.numpy(), atol=0.3)
    assert np.abs(measured).max() <= degrees + 0.3 and np.std(measured) > 1.0
    assert rotated.dtype == torch.uint8
    assert torch.equal(randomly_rotated(images, 0.0, torch.Generator().manual_seed(4)), images)


def rotation_case(rotate_degrees: float) -> StageFeatures:
    """On-the-fly features of 4 images through a stand-in backbone that keeps the pixels' layout."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    images = ImageList.create([f"r/{i}" for i in range(4)], [0] * 4, ArrayLoader(pixels))
    config = small_config(cache=False, rotate_degrees=rotate_degrees)

    def backbone(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        grey = batch.float().mean(dim=1, keepdim=True) / 255
        return {"blocks.2": grey.expand(-1, 4, -1, -1)[:, :, ::2, ::2],
                "blocks.4": grey.expand(-1, 6, -1, -1)[:, :, ::4, ::4]}

    return StageFeatures(images=images, extractor=backbone, config=config, rotate_degrees=rotate_degrees)


def test_rotated_training_features_change_every_pass_and_the_statistics_read_them_unrotated():
    plain, rotated = rotation_case(0.0), rotation_case(5.0)
    first, second = (next(rotated.batches(4))["blocks.2"] for _ in range(2))
    unrotated = next(plain.batches(4))["blocks.2"]
    assert not torch.equal(first, second) and not torch.equal(first, unrotated)
    assert torch.equal(next(rotated.unrotated().batches(4))["blocks.2"], unrotated)
    assert rotated.stage_channels() == {"blocks.2": 4, "blocks.4": 6}
    detector = CFlowDetector(small_config(cache=False, rotate_degrees=5.0, epochs=1))
    detector._fit(rotated, None, "rotation")
    statistics = detector.training_statistics(plain)
    assert detector.statistics == statistics


def test_stage_groups_balance_the_costs_and_keep_the_stage_order():
    lite0 = {"blocks.2": 461, "blocks.4": 223, "blocks.6": 179}  # fibers per image x parameters, in millions
    assert stage_groups(lite0, 2) == [["blocks.2"], ["blocks.4", "blocks.6"]]
    assert stage_groups({"a": 1, "b": 5, "c": 2, "d": 4}, 2) == [["a", "b"], ["c", "d"]]  # 6 and 6
    assert stage_groups({"a": 1, "b": 5}, 4) == [["b"], ["a"]]
    assert stage_groups({"a": 1, "b": 5, "c": 2}, 1) == [["a", "b", "c"]]


def test_stage_workers_train_the_same_decoders_as_one_process():
    """Two worker processes (one stage each) against the stages trained one after the other in this process:
    the same weights, curve and kept epoch, since each stage has its own generator (one thread everywhere)."""
    fit = random_stage_features(4, 2, small_config(), shift=2.0)
    held_out = random_stage_features(3, 5, small_config(), shift=1.0)
    outcomes = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers get max(1, 1 // 2) = 1 thread each
    try:
        for workers in (1, 2):
            config = small_config(epochs=3, patience=0, stage_workers=workers)
            model = CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2, seed=config.seed)
            outcomes.append((model, train_cflow(model, fit, held_out, config, "synthetic")))
    finally:
        torch.set_num_threads(threads)
    (alone, alone_info), (side_by_side, side_info) = outcomes
    assert side_info["stage_groups"] == [["blocks.2"], ["blocks.4"]]
    assert alone_info["stage_groups"] == [["blocks.2", "blocks.4"]]
    assert len(side_info["worker_peak_memory_gb"]) == 2 and alone_info["worker_peak_memory_gb"] == []
    first, second = alone.state_dict(), side_by_side.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert untimed_curve(alone_info["curve"]) == untimed_curve(side_info["curve"])
    assert alone_info["kept_epoch"] == side_info["kept_epoch"]
    # the weights came back from the workers: they are trained, not the seeded start
    start = CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2, seed=small_config().seed).state_dict()
    assert any(not torch.equal(start[key], second[key]) for key in start)


def test_a_stage_worker_s_non_finite_loss_stops_training_with_the_training_error():
    config = small_config(epochs=1, stage_workers=2)
    train = random_stage_features(3, 4, config)
    train.maps["blocks.4"][1, 0, 0, 0] = float("inf")
    model = CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2)
    with pytest.raises(TrainingError, match="stage blocks.4 of 'synthetic'; lower --lr"):
        train_cflow(model, train, None, config, "synthetic")


def test_stage_workers_that_cannot_share_memory_stop_with_the_fix_named(monkeypatch):
    spawn = torch.multiprocessing.get_context("spawn")

    class FullSharedMemory:
        Pipe = staticmethod(spawn.Pipe)

        class Process(spawn.Process):
            def start(self):
                raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.multiprocessing, "get_context", lambda method: FullSharedMemory)
    config = small_config(epochs=1, stage_workers=2)
    model = CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2)
    with pytest.raises(TrainingError, match=r"shared memory \(/dev/shm.*--stage_workers 1"):
        train_cflow(model, random_stage_features(3, 4, config), None, config, "synthetic")


def test_non_finite_features_stop_training_with_a_training_error():
    config = small_config(epochs=1)
    train = random_stage_features(3, 4, config)
    train.maps["blocks.4"][1, 0, 0, 0] = float("inf")
    model = CFlowModel(STAGE_CHANNELS, condition_dims=8, n_blocks=2)
    with pytest.raises(TrainingError, match="lower --lr"):
        train_cflow(model, train, None, config, "synthetic")


def test_figure_draws_defective_and_good_images_evenly_spaced():
    labels = np.array([0] * 5 + [1] * 10)
    chosen = figure_indices(labels, 6)
    assert len(set(chosen)) == 6
    assert (labels[chosen] == 1).sum() == 3 and (labels[chosen] == 0).sum() == 3
    assert set(figure_indices(np.array([1, 1, 0]), 6)) == {0, 1, 2}
    few_good = np.array([0, 1, 1, 1, 1])
    assert (few_good[figure_indices(few_good, 4)] == 1).sum() == 3
    assert len(figure_indices(labels, 0)) == 0


def test_table_has_metrics_as_rows_and_the_average_first():
    per_class = {"bottle": {"image_auroc": 1.0, "pixel_auroc": 0.98}, "cable": {"image_auroc": 0.9, "pixel_auroc": 0.96}}
    mean = {"image_auroc": 0.95, "pixel_auroc": 0.97}
    lines = cflow_table(small_config(), per_class, mean).splitlines()
    assert "maps normalised on train" in lines[0]
    assert lines[2] == "| Metric | Average | bottle | cable |"
    assert lines[4] == "| Image AUROC | **0.950** | 1.000 | 0.900 |"
    assert lines[5].startswith("| Pixel AUROC | **0.970** |")


def test_auroc_standard_error_at_chance_is_the_mann_whitney_null_variance():
    """At AUROC 0.5 Hanley and McNeil's variance reduces to (m + n + 1) / (12 m n), the variance of the
    Mann-Whitney statistic under the null."""
    for positives, negatives in ((225, 75), (63, 21), (5, 9)):
        expected = ((positives + negatives + 1) / (12 * positives * negatives)) ** 0.5
        assert auroc_standard_error(0.5, positives, negatives) == pytest.approx(expected, rel=1e-12)


def test_the_default_rule_is_left_only_for_one_better_by_more_than_its_standard_error():
    margin = auroc_standard_error(0.80, 225, 75)  # about 0.03
    assert chosen_index([0.80, 0.80 + 0.9 * margin, 0.75], 225, 75) == 0
    assert chosen_index([0.80, 0.80 + 1.1 * margin, 0.80 + 1.5 * margin, 0.80 + 1.5 * margin], 225, 75) == 2
    assert chosen_index([0.80, 0.70], 225, 75) == 0


def test_anomaly_maps_normalise_the_whole_set_per_batch_or_by_training_statistics_as_by_hand():
    """Stage maps already at the image size (the upsampling is the identity): the paper's maps by hand for
    map_norm test (one maximum over the whole set, whatever test_batch_size), batch (a maximum per group)
    and train (the training maximum); a z/max rule scores the z merge by hand and leaves the maps alone."""
    generator = torch.Generator().manual_seed(3)
    stage_maps = {"a": torch.randn(7, 4, 4, generator=generator, dtype=torch.float64),
                  "b": torch.randn(7, 4, 4, generator=generator, dtype=torch.float64) - 1}
    statistics = {"a": {"max": 2.5, "mean": 0.1, "std": 0.9}, "b": {"max": 1.5, "mean": -1.0, "std": 1.2}}

    def by_hand(maps: dict, reference: dict) -> np.ndarray:  # the sum over stages of exp(log p - reference)
        return sum(np.exp(maps[stage].numpy() - reference[stage]) for stage in maps)

    whole = by_hand(stage_maps, {stage: maps.max().item() for stage, maps in stage_maps.items()})
    expected_test = whole.max() - whole
    for batch_size in (2, 3, 100):
        scores, maps = anomaly_maps(stage_maps, small_config(img_size=4, map_norm="test", test_batch_size=batch_size),
                                    statistics, ScoringRule())
        np.testing.assert_allclose(maps, expected_test, rtol=1e-6)
        np.testing.assert_allclose(scores, expected_test.reshape(7, -1).max(axis=1), rtol=1e-12)
    scores, maps = anomaly_maps(stage_maps, small_config(img_size=4, map_norm="batch", test_batch_size=3), statistics,
                                ScoringRule())
    for start in (0, 3, 6):
        group = {stage: values[start:start + 3] for stage, values in stage_maps.items()}
        summed = by_hand(group, {stage: values.max().item() for stage, values in group.items()})
        np.testing.assert_allclose(maps[start:start + 3], summed.max() - summed, rtol=1e-6)
    train = 2 - by_hand(stage_maps, {stage: values["max"] for stage, values in statistics.items()})
    z_map = sum((statistics[stage]["mean"] - stage_maps[stage].numpy()) / statistics[stage]["std"]
                for stage in stage_maps) / 2
    scores, maps = anomaly_maps(stage_maps, small_config(img_size=4, map_norm="train"), statistics,
                                ScoringRule.parse("z/max"))
    np.testing.assert_allclose(maps, train, rtol=1e-6)
    np.testing.assert_allclose(scores, z_map.reshape(7, -1).max(axis=1), rtol=1e-12)


def test_results_mention_localisation_and_categories_only_where_they_exist(tmp_path):
    from report import write_results

    write_results(small_config(dataset="digits"), tmp_path, {"0": {"image_auroc": 0.9}}, {}, complete=True)
    text = (tmp_path / "results.md").read_text()
    assert "digits, tf_efficientnet_lite0 (16 px), 1 class; image AUROC; no epoch" in text
    write_results(small_config(dataset="folder"), tmp_path, {"a": {"image_auroc": 0.9, "pixel_auroc": 0.8}}, {},
                  complete=True)
    assert "1 category; image AUROC and localisation metrics;" in (tmp_path / "results.md").read_text()
