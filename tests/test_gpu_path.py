"""The device path, checked on a CPU: tensors become arrays in one place, the maps and scores leave the
accelerator before numpy sees them, the training loops read the device once per image batch (not once per
step), CUDA runs ask for deterministic kernels, and a detector whose scores depend on the batch refuses to
score new images.

``OnAccelerator`` stands in for a CUDA tensor: its ``.numpy()`` raises as torch does for one, an op that mixes
it with a plain CPU tensor raises as a device mix-up does, and ``.cpu()`` gives a plain tensor.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import predict
import utils
from anomaly_map import candidate_rules, select_scoring, stage_statistics
from config import ConfigError, make_config
from conftest import untimed_curve
from datasets import ArrayLoader, ImageList
from model import CFlowDetector, CFlowModel, DetectorError, SANFModel, StageFeatures, anomaly_maps
from train import train_cflow, train_sanf

ROOT = Path(__file__).resolve().parents[1]


class OnAccelerator(torch.Tensor):
    """A CPU tensor that behaves as one on an accelerator where it matters here (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        values = tree_flatten((args, kwargs))[0]
        if any(isinstance(value, cls) for value in values) and any(
                type(value) is torch.Tensor and value.dim() > 0 for value in values):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               "cuda:0 and cpu!")
        return super().__torch_function__(func, types, args, kwargs)


def on_accelerator(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {stage: values.as_subclass(OnAccelerator) for stage, values in maps.items()}


def test_the_stand_in_refuses_what_a_cuda_tensor_refuses():
    tensor = torch.ones(3).as_subclass(OnAccelerator)
    with pytest.raises(TypeError, match="Use Tensor.cpu"):
        tensor.numpy()
    with pytest.raises(RuntimeError, match="same device"):
        tensor + torch.ones(3)
    assert type(tensor.cpu()) is torch.Tensor and type(tensor.detach().cpu().numpy()) is np.ndarray
    assert float((tensor * 2).sum()) == 6.0 and type(tensor + torch.tensor(1.0)) is OnAccelerator


# --- one conversion to numpy -----------------------------------------------------------------


def numpy_calls_outside_the_helper(source: str) -> list[int]:
    """Lines of ``source`` that call a ``.numpy()`` method outside ``def to_numpy``."""
    tree = ast.parse(source)
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "to_numpy":
            allowed |= {id(inner) for inner in ast.walk(node)}
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "numpy" and id(node) not in allowed)


def test_every_tensor_becomes_an_array_through_utils_to_numpy():
    sources = sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    assert ROOT / "utils.py" in sources and len(sources) > 10
    found = {str(path.relative_to(ROOT)): lines for path in sources
             if (lines := numpy_calls_outside_the_helper(path.read_text()))}
    assert not found, f".numpy() outside utils.to_numpy (use to_numpy: it moves the tensor to the CPU first): {found}"
    # the check sees a call in any position, and only the helper's own is allowed
    assert numpy_calls_outside_the_helper("def f(t):\n    return g(t.cpu().numpy())\n") == [2]
    assert numpy_calls_outside_the_helper("def to_numpy(t):\n    return t.detach().cpu().numpy()\n") == []


def test_to_numpy_moves_detaches_and_copies_nothing_on_the_cpu():
    leaf = torch.arange(4.0, requires_grad=True)
    assert np.array_equal(utils.to_numpy(leaf * 2), [0.0, 2.0, 4.0, 6.0])
    plain = torch.arange(3)
    assert np.shares_memory(utils.to_numpy(plain), plain.numpy())
    assert np.array_equal(utils.to_numpy(plain.as_subclass(OnAccelerator)), [0, 1, 2])


# --- maps and scoring off the accelerator ----------------------------------------------------


def stage_maps(count: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(count, 4, 4, generator=generator), "b": torch.randn(count, 2, 2, generator=generator)}


def test_scoring_auto_chooses_the_same_rule_from_maps_on_an_accelerator():
    statistics = stage_statistics([stage_maps(6, 0)])
    normal, defect = stage_maps(8, 1), {stage: maps - 1.5 for stage, maps in stage_maps(8, 2).items()}
    candidates = candidate_rules(["a", "b"])
    expected = select_scoring(normal, defect, statistics, (8, 8), candidates)
    assert select_scoring(on_accelerator(normal), on_accelerator(defect), statistics, (8, 8), candidates) == expected
    assert stage_statistics([on_accelerator(stage_maps(6, 0))]) == statistics


@pytest.mark.parametrize("map_norm", ["train", "test", "batch"])
def test_scores_and_maps_from_accelerator_stage_maps_equal_the_cpu_ones(map_norm):
    config = make_config("cflow_lite0", img_size=16, map_norm=map_norm, test_batch_size=3)
    statistics = stage_statistics([stage_maps(6, 0)])
    for rule in candidate_rules(["a", "b"])[:4]:
        scores, maps = anomaly_maps(stage_maps(7, 3), config, statistics, rule)
        device_scores, device_maps = anomaly_maps(on_accelerator(stage_maps(7, 3)), config, statistics, rule)
        assert np.array_equal(device_scores, scores) and np.array_equal(device_maps, maps)
        assert scores.dtype == np.float64 and maps.dtype == np.float32


class PooledPixels:
    """A stand-in backbone with two stages: per-pixel values and squares, average-pooled to strides 4 and 8."""

    weights_source = "none"

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = images.float() / 255
        values = torch.cat([pixels, pixels.square()], dim=1)
        return {"blocks.2": torch.nn.functional.avg_pool2d(values, 4),
                "blocks.4": torch.nn.functional.avg_pool2d(values, 8)}


def cflow_task(count: int = 10, size: int = 32) -> ImageList:
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, size)
    smooth = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5)
    pixels = np.clip(smooth[None] + rng.normal(0, 6, size=(count, size, size, 3)), 0, 255).astype(np.uint8)
    return ImageList.create([f"good/{i}.png" for i in range(count)], [0] * count, ArrayLoader(pixels))


def fitted_cflow(config, monkeypatch, accelerator: bool) -> CFlowDetector:
    """CFLOW with ``scoring auto`` fitted on 7 images (3 held out); with ``accelerator`` every map its flows make
    for evaluation (held-out NLL, statistics, rule selection, threshold) is an accelerator tensor."""
    if accelerator:
        original = CFlowModel.stage_log_likelihood_maps
        monkeypatch.setattr(CFlowModel, "stage_log_likelihood_maps",
                            lambda model, features, chunk=65536: on_accelerator(original(model, features, chunk)))
    images, backbone = cflow_task(), PooledPixels()
    fit, held = images.subset(np.arange(7)), images.subset(np.arange(7, 10))
    detector = CFlowDetector(config, backbone)
    detector.fit(StageFeatures(images=fit, extractor=backbone, config=config),
                 StageFeatures(images=held, extractor=backbone, config=config), "toy", held)
    monkeypatch.undo()
    return detector


def test_cflow_with_scoring_auto_fits_and_scores_from_accelerator_maps_as_from_cpu_ones(monkeypatch):
    config = make_config("cflow_lite0", img_size=32, condition_dims=8, n_flow_layers=2, fiber_batch=40, batch_size=4,
                         epochs=2, patience=0, lr=1e-3, test_batch_size=4, scoring="auto")
    cpu = fitted_cflow(config, monkeypatch, accelerator=False)
    device = fitted_cflow(config, monkeypatch, accelerator=True)
    assert device.rule == cpu.rule and device.info["scoring_selection"] == cpu.info["scoring_selection"]
    assert device.threshold == cpu.threshold and device.statistics == cpu.statistics
    assert untimed_curve(device.info["curve"]) == untimed_curve(cpu.info["curve"])


# --- host synchronisations of the training loops ---------------------------------------------

SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
           torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}
"""Tensor methods that make the host wait for an accelerator's queue."""


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in SYNCING
        return func(*args, **(kwargs or {}))


def synced_cflow_training(fiber_batch: int) -> tuple[int, int]:
    """Host reads and Adam steps of 2 CFLOW epochs over 6 images of 2 stages (2 image batches per epoch)."""
    config = make_config("cflow_lite0", img_size=16, condition_dims=8, n_flow_layers=2, fiber_batch=fiber_batch,
                         batch_size=3, epochs=2, patience=0, lr=1e-3)
    rng = np.random.default_rng(0)
    fit = StageFeatures.from_arrays({"s8": rng.normal(size=(6, 4, 4, 4)).astype(np.float16),
                                     "s16": rng.normal(size=(6, 6, 2, 2)).astype(np.float16)}, "cpu")
    model = CFlowModel({"s8": 4, "s16": 6}, condition_dims=8, n_blocks=2)
    steps = 0
    step = torch.optim.Adam.step

    def counted_step(optimizer, *args, **kwargs):
        nonlocal steps
        steps += 1
        return step(optimizer, *args, **kwargs)

    torch.optim.Adam.step = counted_step
    try:
        with CountSyncs() as syncs:
            train_cflow(model, fit, None, config, "toy")
    finally:
        torch.optim.Adam.step = step
    return syncs.count, steps


def test_cflow_training_reads_the_device_once_per_image_batch_whatever_the_steps():
    few_syncs, few_steps = synced_cflow_training(fiber_batch=48)
    many_syncs, many_steps = synced_cflow_training(fiber_batch=5)
    assert many_steps > 4 * few_steps
    assert many_syncs == few_syncs <= 2 * (1 + 2)  # per epoch: the image order, then one read per image batch


def synced_sanf_training(batch_size: int) -> int:
    config = make_config("demo", epochs=2, batch_size=batch_size, hidden=8, heads=2, n_flow_layers=2, patience=0)
    generator = torch.Generator().manual_seed(0)
    semantic = torch.randn(40, 16, generator=generator)
    tokens = {"sem": semantic, "patches": semantic.unsqueeze(1) + 0.1 * torch.randn(40, 3, 16, generator=generator)}
    model = SANFModel(16, 3, n_layers=2, hidden=8, heads=2)
    model.fit_preprocessing(tokens["sem"], tokens["patches"])
    with CountSyncs() as syncs:
        train_sanf(model, tokens, {name: value[:8] for name, value in tokens.items()}, config, "toy")
    return syncs.count


def test_sanf_training_reads_the_device_once_per_held_out_check_whatever_the_batches():
    assert synced_sanf_training(batch_size=4) == synced_sanf_training(batch_size=20)  # 10 against 2 steps an epoch


# --- determinism -----------------------------------------------------------------------------


@pytest.fixture
def deterministic_state():
    """torch's determinism switches and CUBLAS_WORKSPACE_CONFIG, restored after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[4], saved[5]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


def test_a_cuda_device_turns_on_deterministic_kernels_and_the_cublas_workspace(monkeypatch, deterministic_state):
    checked = []
    monkeypatch.setattr(utils, "check_device", lambda device: checked.append(
        (device, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch.backends.cudnn.allow_tf32 = True
    utils.configure_device("cpu")
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    utils.configure_device("cuda:0")
    assert checked == [("cpu", None), ("cuda:0", ":4096:8")]  # the workspace is set before CUDA is touched
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    utils.configure_device("cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG=:0:0 .*unset it or set it to :4096:8"):
        utils.configure_device("cuda")


def trained_weights() -> list[dict[str, torch.Tensor]]:
    """A CFLOW and a SANF model after a short seeded training on the CPU."""
    cflow_config = make_config("cflow_lite0", img_size=16, condition_dims=8, n_flow_layers=2, fiber_batch=20,
                               batch_size=3, epochs=2, patience=0, lr=1e-3, seed=3)
    rng = np.random.default_rng(1)
    fit = StageFeatures.from_arrays({"s": rng.normal(size=(6, 4, 4, 4)).astype(np.float16)}, "cpu")
    held = StageFeatures.from_arrays({"s": rng.normal(size=(3, 4, 4, 4)).astype(np.float16)}, "cpu")
    cflow = CFlowModel({"s": 4}, condition_dims=8, n_blocks=2, seed=3)
    train_cflow(cflow, fit, held, cflow_config, "toy")
    sanf_config = make_config("demo", epochs=2, batch_size=8, hidden=8, heads=2, n_flow_layers=2, seed=3)
    semantic = torch.from_numpy(rng.normal(size=(24, 16)).astype(np.float32))
    tokens = {"sem": semantic, "patches": semantic.unsqueeze(1).repeat(1, 3, 1)}
    sanf = SANFModel(16, 3, n_layers=2, hidden=8, heads=2, seed=3)
    sanf.fit_preprocessing(tokens["sem"], tokens["patches"])
    train_sanf(sanf, tokens, {name: value[:6] for name, value in tokens.items()}, sanf_config, "toy")
    return [cflow.state_dict(), sanf.state_dict()]


def test_deterministic_algorithms_change_no_bit_of_cpu_training(deterministic_state):
    """What a CUDA run leaves switched on (a CPU rescoring in the same process) has every CPU op it needs and
    changes none of their numbers."""
    torch.use_deterministic_algorithms(False)
    free = trained_weights()
    torch.use_deterministic_algorithms(True)
    strict = trained_weights()
    for free_state, strict_state in zip(free, strict):
        assert free_state.keys() == strict_state.keys()
        assert all(torch.equal(free_state[key], strict_state[key]) for key in free_state)


def test_stage_workers_refuse_a_cuda_device_with_the_fix_named():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="--stage_workers > 1 .*--device cpu"):
            make_config("cflow_lite0", stage_workers=2, device=device)
    assert make_config("cflow_lite0", stage_workers=2, device="cpu").stage_workers == 2


# --- batch-dependent scores ------------------------------------------------------------------


def saved_cflow(tmp_path: Path, map_norm: str) -> tuple[Path, CFlowDetector]:
    config = make_config("cflow_lite0", img_size=32, condition_dims=8, n_flow_layers=2, map_norm=map_norm,
                         test_batch_size=4)
    detector = CFlowDetector(config, PooledPixels())
    detector.build({"blocks.2": 6, "blocks.4": 6})
    features = StageFeatures(images=cflow_task(), extractor=PooledPixels(), config=config)
    detector.statistics = detector.training_statistics(features)
    detector.threshold = detector.map_threshold = 1.0
    path = tmp_path / f"{map_norm}.pt"
    detector.save(path)
    return path, detector


@pytest.mark.parametrize("map_norm", ["test", "batch"])
def test_a_detector_whose_scores_depend_on_the_batch_refuses_new_images(tmp_path, map_norm):
    path, detector = saved_cflow(tmp_path, map_norm)
    features = StageFeatures(images=cflow_task(), extractor=PooledPixels(), config=detector.config)
    scores, maps = detector.score(features)  # the evaluation of a whole test split keeps working
    assert scores.shape == (10,) and maps.shape == (10, 32, 32)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(DetectorError, match=f"--map_norm {map_norm}.*retrain with --map_norm train"):
        detector.predict(list(images))
    with pytest.raises(DetectorError, match="retrain with --map_norm train"):
        detector.score_images(images)
    with pytest.raises(DetectorError, match="retrain with --map_norm train"):
        predict.main(["--checkpoint", str(path), "--images", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_train_normalised_detector_scores_each_image_as_in_any_batch(tmp_path):
    _, detector = saved_cflow(tmp_path, "train")
    detector.check_per_image_scores()
    images = torch.from_numpy(np.stack([np.asarray(cflow_task().load(i)) for i in range(6)])).permute(0, 3, 1, 2)
    alone = np.concatenate([detector.score(StageFeatures(PooledPixels()(images[i:i + 1])))[0] for i in range(6)])
    together = detector.score(StageFeatures(PooledPixels()(images)))[0]
    np.testing.assert_allclose(alone, together, rtol=1e-6)
    detector.config = dataclasses.replace(detector.config, map_norm="batch")  # the same comparison sees batch's
    alone = np.concatenate([detector.score(StageFeatures(PooledPixels()(images[i:i + 1])))[0] for i in range(6)])
    together = detector.score(StageFeatures(PooledPixels()(images)))[0]
    assert np.abs(alone - together).max() > 1e-4
