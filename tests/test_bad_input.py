"""Odd and broken inputs: every image mode reads as the RGB picture it shows, and every broken file or
folder stops the run with one line naming it, exit code 2, no traceback and nothing a later run trusts."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import make_config
from datasets import FileLoader, ImageList
from extractor import CacheError, FeatureExtractor, image_batches
from main import run

ROOT = __import__("conftest").ROOT
SIZE = 16


def picture(seed: int, gray: bool = False) -> np.ndarray:
    """A random 16x16 RGB picture (three equal channels with ``gray``)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 1 if gray else 3), dtype=np.uint8)
    return np.repeat(pixels, 3, axis=2) if gray else pixels


def save_rgb(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def make_folder(root: Path, masks: bool = False) -> Path:
    """MVTec-style folder: 4 normal training images, 2 good and 2 defective test images (with masks)."""
    for index in range(4):
        save_rgb(root / "train" / "good" / f"{index}.png", picture(index))
    for index in range(2):
        save_rgb(root / "test" / "good" / f"{index}.png", picture(10 + index))
        save_rgb(root / "test" / "bad" / f"{index}.png", 255 - picture(20 + index))
        if masks:
            mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
            mask[4:10, 4:10] = 255
            (root / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, "L").save(root / "ground_truth" / "bad" / f"{index}_mask.png")
    return root


def config_for(data: Path, tmp_path: Path, dataset: str = "folder", **overrides):
    return make_config("demo", method="knn", dataset=dataset, data_root=str(data), img_size=32,
                       cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), **overrides)


def cli(data: Path, tmp_path: Path, dataset: str = "folder") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--method", "knn", "--dataset", dataset,
                           "--data_root", str(data), "--img_size", "32", "--cache_dir", str(tmp_path / "cache"),
                           "--results_dir", str(tmp_path / "results")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def trusted_units(tmp_path: Path) -> list[str]:
    """Cache units a later run would trust: their JSON (progress records are not units)."""
    return sorted(p.name for p in (tmp_path / "cache").rglob("*.json") if not p.name.endswith(".progress.json"))


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error:"), line
    for text in named:
        assert text in line, line
    return line


def assert_no_results(tmp_path: Path) -> None:
    assert not list((tmp_path / "results").rglob("results.json"))


# ----------------------------------------------------------------------------- 1. image modes


def _odd_mode_files(folder: Path, stem: str, seed: int) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    """The same pictures in every odd mode, and the RGB pixels each must read as."""
    folder.mkdir(parents=True, exist_ok=True)
    color, gray = picture(seed), picture(seed + 1, gray=True)
    alpha = np.random.default_rng(seed + 2).integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)
    palette = Image.fromarray(color, "RGB").quantize(64)  # a P image; what it shows is its palette colours
    files = {mode: folder / f"{stem}_{mode.replace(';', '')}.png" for mode in ("RGBA", "L", "P", "I;16")}
    Image.fromarray(np.concatenate([color, alpha], axis=2), "RGBA").save(files["RGBA"])  # alpha is dropped
    Image.fromarray(gray[..., 0], "L").save(files["L"])
    palette.save(files["P"])
    Image.fromarray(gray[..., 0].astype(np.uint16) * 257).save(files["I;16"])  # a 16-bit grayscale PNG
    expected = {"RGBA": color, "L": gray, "P": np.asarray(palette.convert("RGB")), "I;16": gray}
    for mode, path in files.items():
        with Image.open(path) as image:
            assert image.mode == mode, (path, image.mode)
    files["CMYK"] = folder / f"{stem}_CMYK.jpg"
    Image.new("CMYK", (SIZE, SIZE), (10, 200, 30, 5)).save(files["CMYK"], quality=100)
    expected["CMYK"] = np.full((SIZE, SIZE, 3), (240, 50, 220), dtype=np.uint8)  # 255 - C - K etc., JPEG-rounded
    return files, expected


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(make_config("demo", method="knn", img_size=32))


def test_every_image_mode_reads_as_the_rgb_picture_it_shows(tmp_path, extractor):
    files, expected = _odd_mode_files(tmp_path / "odd", "x", seed=0)
    plain = {}
    for mode, pixels in expected.items():
        plain[mode] = tmp_path / "plain" / f"{mode.replace(';', '')}.png"
        save_rgb(plain[mode], pixels)
    modes = list(files)
    loaded = [np.asarray(FileLoader([str(files[m])])(0)) for m in modes]
    for mode, pixels in zip(modes, loaded):
        assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE, 3), mode
        tolerance = 6 if mode == "CMYK" else 0  # a JPEG is lossy; every PNG conversion is exact
        assert np.abs(pixels.astype(int) - expected[mode]).max() <= tolerance, mode

    exact = [m for m in modes if m != "CMYK"]
    config = make_config("demo", method="knn", img_size=32)

    def features(paths: list[Path]) -> dict[str, torch.Tensor]:
        images = ImageList.create([str(p) for p in paths], [0] * len(paths), FileLoader([str(p) for p in paths]))
        return extractor(next(image_batches(images, config, batch_size=len(paths))))

    odd, rgb = features([files[m] for m in exact]), features([plain[m] for m in exact])
    for name in odd:
        assert torch.isfinite(odd[name]).all()
        assert torch.equal(odd[name], rgb[name]), name


def test_odd_image_modes_in_train_and_test_run_end_to_end(tmp_path):
    data = make_folder(tmp_path / "data")
    _odd_mode_files(data / "train" / "good", "odd", seed=40)
    _odd_mode_files(data / "test" / "good", "odd", seed=50)
    _odd_mode_files(data / "test" / "bad", "odd", seed=60)
    payload = run(config_for(data, tmp_path))
    metrics = payload["per_class"]["data"]
    assert metrics["n_fit"] + metrics["n_held_out"] == 4 + 5 and metrics["n_test"] == 4 + 10
    assert np.isfinite(metrics["image_auroc"])


# ----------------------------------------------------------------------------- 2. unreadable images


@pytest.mark.parametrize("split", ["train/good", "test/bad"])
@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_unreadable_image_ends_with_one_line_naming_it(damage, split, tmp_path):
    data = make_folder(tmp_path / "data")
    broken = data / split / "1.png"  # not the first image: the failure comes in the middle of a unit
    content = broken.read_bytes()
    broken.write_bytes(b"" if damage == "zero-byte" else content[:len(content) // 2])
    line = assert_one_line_error(cli(data, tmp_path), str(broken), "remove or replace")
    assert_no_results(tmp_path)
    # the training unit is complete (and trusted) only when the broken file is a test image
    assert trusted_units(tmp_path) == (["train.json"] if split == "test/bad" else []), line


# ----------------------------------------------------------------------------- 3. masks


def test_mask_of_another_size_is_refused_naming_it_and_both_sizes(tmp_path):
    data = make_folder(tmp_path / "data" / "widget", masks=True)
    mask = data / "ground_truth" / "bad" / "1_mask.png"
    Image.new("L", (20, 12), 255).save(mask)
    assert_one_line_error(cli(tmp_path / "data", tmp_path, "mvtec"), str(mask), "20x12", f"{SIZE}x{SIZE}",
                          str(data / "test" / "bad" / "1.png"))
    assert_no_results(tmp_path)
    assert trusted_units(tmp_path) == []


def test_masks_of_the_image_size_pass_the_check(tmp_path):
    """The size check reads headers only and lets matching masks through (kNN makes no maps: image metrics)."""
    make_folder(tmp_path / "data" / "widget", masks=True)
    payload = run(config_for(tmp_path / "data", tmp_path, dataset="mvtec"))
    assert np.isfinite(payload["per_class"]["widget"]["image_auroc"])


def test_defect_image_without_mask_under_mvtec_is_named(tmp_path):
    data = make_folder(tmp_path / "data" / "widget", masks=True)
    (data / "ground_truth" / "bad" / "1_mask.png").unlink()
    assert_one_line_error(cli(tmp_path / "data", tmp_path, "mvtec"), "bad/1.png", "no mask")
    assert_no_results(tmp_path)
    assert trusted_units(tmp_path) == []


# ----------------------------------------------------------------------------- 4. folders


@pytest.mark.parametrize("leftover", [None, "notes.txt"])
def test_empty_training_folder_is_named(leftover, tmp_path):
    data = make_folder(tmp_path / "data")
    for path in (data / "train" / "good").iterdir():
        path.unlink()
    if leftover:
        (data / "train" / "good" / leftover).write_text("not an image")
    assert_one_line_error(cli(data, tmp_path), str(data / "train" / "good"), "no images")
    assert_no_results(tmp_path)
    assert trusted_units(tmp_path) == []


def test_empty_test_folders_are_named(tmp_path):
    data = make_folder(tmp_path / "data")
    for path in [*(data / "test").rglob("*.png")]:
        path.unlink()
    assert_one_line_error(cli(data, tmp_path), str(data / "test"), "no images")
    assert_no_results(tmp_path)


def test_non_image_files_and_subfolders_are_ignored(tmp_path):
    data = make_folder(tmp_path / "data")
    for folder in ("train/good", "test/good", "test/bad"):
        (data / folder / "notes.txt").write_text("labelled by hand")
        (data / folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (data / folder / "thumbs").mkdir()
        save_rgb(data / folder / "thumbs" / "0.png", picture(99))  # not one level down: not an image of the split
    payload = run(config_for(data, tmp_path))
    metrics = payload["per_class"]["data"]
    assert metrics["n_fit"] + metrics["n_held_out"] == 4 and metrics["n_test"] == 4
    assert np.isfinite(metrics["image_auroc"])


# ----------------------------------------------------------------------------- 5. non-finite features


def test_nan_features_end_with_cache_error_and_no_trusted_unit(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data")
    original = FeatureExtractor.forward
    calls = []

    def forward(self, images):
        calls.append(len(images))
        features = original(self, images)
        if len(calls) == 3:  # the probe, the first batch of two, then NaN in the second batch
            features = {name: torch.full_like(value, float("nan")) for name, value in features.items()}
        return features

    monkeypatch.setattr(FeatureExtractor, "forward", forward)
    config = config_for(data, tmp_path, extract_batch_size=2)
    with pytest.raises(CacheError) as caught:
        run(config)
    message = str(caught.value)
    assert "\n" not in message and "non-finite features" in message and "train" in message
    assert_no_results(tmp_path)
    assert trusted_units(tmp_path) == []

    monkeypatch.setattr(FeatureExtractor, "forward", original)  # a later run resumes and rebuilds the bad batch
    payload = run(config)
    assert np.isfinite(payload["per_class"]["data"]["image_auroc"])
