"""Reliability: crash-safe cache units (damaged metadata, a full disk, two writers, kills at any moment),
weights matched by name, CIFAR pickles of either key style, and bit-repeatable runs."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import extractor
import main
from config import make_config
from conftest import untimed_curve
from datasets import DataError, load_tasks
from extractor import (CacheError, FeatureExtractor, WeightsError, build_backbone, cache_folder, cached_features,
                       packaged_weights_file, read_unit, unit_lock, unit_metadata)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(max_train_per_class=12, max_test=20, classes="0", extract_batch_size=4, img_size=64)


@pytest.fixture(scope="module")
def demo_extractor() -> FeatureExtractor:
    return FeatureExtractor(make_config("demo", **SMALL))


@pytest.fixture
def unit(tmp_path, demo_extractor):
    """(config, images, stem, arrays) of a 20-image unit extracted once, uninterrupted."""
    config = make_config("demo", cache_dir=str(tmp_path), **SMALL)
    images = load_tasks(config)[0].test
    arrays = cached_features(demo_extractor, images, "unit", config)
    return config, images, cache_folder(config) / "unit", {name: np.array(a) for name, a in arrays.items()}


def _same(arrays: dict, reference: dict) -> bool:
    return arrays.keys() == reference.keys() and all(
        np.array_equal(np.asarray(arrays[n]).view(np.uint16), reference[n].view(np.uint16)) for n in reference)


def _stop_after(monkeypatch, batches: int) -> list[int]:
    """Make extraction stop with KeyboardInterrupt after ``batches`` stored batches; returns the start rows seen."""
    original, starts = extractor._store_rows, []

    def store(arrays, start, *args):
        starts.append(start)
        if len(starts) > batches:
            raise KeyboardInterrupt
        original(arrays, start, *args)

    monkeypatch.setattr(extractor, "_store_rows", store)
    return starts


# ----------------------------------------------------------------------------- cache units


def _truncate_json(stem: Path) -> None:
    path = stem.with_suffix(".json")
    path.write_bytes(path.read_bytes()[:40])


def _empty_json(stem: Path) -> None:
    stem.with_suffix(".json").write_text("")


def _truncate_array(stem: Path) -> None:
    path = next(stem.parent.glob("unit.sem.*.npy"))
    path.write_bytes(path.read_bytes()[:-64])


def _delete_array(stem: Path) -> None:
    next(stem.parent.glob("unit.patches.*.npy")).unlink()


@pytest.mark.parametrize("damage", [_truncate_json, _empty_json, _truncate_array, _delete_array])
def test_unit_with_damaged_metadata_or_arrays_is_rebuilt_with_a_note(unit, demo_extractor, capsys, damage):
    config, images, stem, reference = unit
    damage(stem)
    capsys.readouterr()
    assert read_unit(stem, unit_metadata(demo_extractor, config, images)) is None
    note = capsys.readouterr().out
    assert note.startswith("note: feature cache unit") and note.count("\n") == 1 and "rebuilding" in note
    assert _same(cached_features(demo_extractor, images, "unit", config), reference)
    assert sorted(p.name.split(".")[1] for p in stem.parent.glob("unit.*")) == ["json", "patches", "sem"]


def test_progress_whose_arrays_are_gone_starts_over(unit, demo_extractor, monkeypatch):
    config, images, _, reference = unit
    _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        cached_features(demo_extractor, images, "other", config)
    stem = cache_folder(config) / "other"
    assert json.loads(stem.with_name("other.progress.json").read_text())["done"] == 8
    next(stem.parent.glob("other.sem.*.npy")).unlink()
    monkeypatch.undo()
    starts = _stop_after(monkeypatch, 99)
    assert _same(cached_features(demo_extractor, images, "other", config), reference)
    assert starts[0] == 0


@pytest.mark.parametrize("where", ["allocation", "batch write"])
def test_full_disk_is_one_cache_error_and_leaves_no_trusted_unit(unit, demo_extractor, monkeypatch, where):
    config, images, _, reference = unit
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "allocation":
        monkeypatch.setattr(os, "posix_fallocate", lambda *_: (_ for _ in ()).throw(full))
    else:
        original, calls = extractor._store_rows, []

        def store(*args):
            calls.append(1)
            if len(calls) == 3:
                raise full
            original(*args)

        monkeypatch.setattr(extractor, "_store_rows", store)
    with pytest.raises(CacheError) as caught:
        cached_features(demo_extractor, images, "full", config)
    stem = cache_folder(config) / "full"
    message = str(caught.value)
    assert "\n" not in message and str(stem.parent) in message and "--cache_dir" in message
    assert read_unit(stem, unit_metadata(demo_extractor, config, images)) is None
    monkeypatch.undo()
    if where == "batch write":  # the two batches written before the disk filled are kept
        assert json.loads(stem.with_name("full.progress.json").read_text())["done"] == 8
    assert _same(cached_features(demo_extractor, images, "full", config), reference)


def test_second_writer_of_a_unit_is_refused_naming_the_first(unit, demo_extractor):
    config, images, _, reference = unit
    stem = cache_folder(config) / "busy"
    with unit_lock(stem):
        with pytest.raises(CacheError, match=rf"cache unit .*busy is being written by another process "
                                             rf"\(pid {os.getpid()}\); wait for it or use another --cache_dir"):
            cached_features(demo_extractor, images, "busy", config)
    assert not stem.with_name("busy.lock").exists()
    assert _same(cached_features(demo_extractor, images, "busy", config), reference)


def test_extraction_killed_at_random_moments_resumes_bit_identical(tmp_path):
    """bench/kill_resume.py, small: SIGKILLed subprocesses at lines of the extraction loop and of the commit."""
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "bench" / "kill_resume.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table: list[str] = []
    rows, identical = bench.kill_and_resume(
        [*bench.DIGITS, "--max_train_per_class", "24", "--max_test", "40", "--extract_batch_size", "8",
         "--threads", "1"],
        kills=3, seed=1, workdir=tmp_path, progress_seconds=0, time_share=0, report=table.append)
    assert identical and all(row["equal"] for row in rows), "\n".join(table)
    assert sum(row["killed"] for row in rows) >= 2 and any(" commit, line" in row["moment"] for row in rows)


# ----------------------------------------------------------------------------- weights by name


def test_packaged_lite0_weights_load_by_name_as_the_position_mapping_did():
    model, _ = build_backbone("tf_efficientnet_lite0", "default")
    file_state = torch.load(packaged_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    by_position = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    by_position.load_state_dict(dict(zip(by_position.state_dict(), file_state.values())), strict=True)
    by_position.reset_classifier(0)
    assert all(torch.equal(value, by_position.state_dict()[key]) for key, value in model.state_dict().items())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(pixels), by_position.eval().forward_features(pixels))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("_blocks.3._bn1.running_var"),
     r"keys get no tensor, first blocks\.2\.0\.bn2\.running_var \(144,\) \(file key _blocks\.3\._bn1\.running_var"),
    (lambda s: s.update({"_blocks.5._project_conv.weight": torch.zeros(81, 240, 1, 1)}),
     r"file key _blocks\.5\._project_conv\.weight \(81, 240, 1, 1\) → tf_efficientnet_lite0 key "
     r"blocks\.3\.0\.conv_pwl\.weight \(80, 240, 1, 1\)"),
    (lambda s: s.update({"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}),
     r"file key _blocks\.0\._se_reduce\.weight \(8, 32, 1, 1\) has no counterpart"),
])
def test_weights_file_with_a_missing_misshapen_or_foreign_key_names_it(tmp_path, change, message):
    state = torch.load(packaged_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "lite0.pth")
    with pytest.raises(WeightsError, match=message):
        build_backbone("tf_efficientnet_lite0", str(tmp_path / "lite0.pth"))


# ----------------------------------------------------------------------------- CIFAR pickles


def _write_cifar(root: Path, dataset: str, key_type: type) -> dict[str, np.ndarray]:
    """Tiny CIFAR pickles with ``bytes`` keys (the original files) or ``str`` keys (a re-saved copy)."""
    folder_name, files, label = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                                  "labels") if dataset == "cifar10" else ("cifar-100-python", ["train", "test"],
                                                                          "coarse_labels"))
    folder = root / folder_name
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for index, name in enumerate(files):
        pixels[name] = rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8)
        batch = {"data": pixels[name], label: [3, (index + 1) % 10, 3]}
        with open(folder / name, "wb") as handle:
            pickle.dump({k.encode() if key_type is bytes else k: v for k, v in batch.items()}, handle)
    return pixels


@pytest.mark.parametrize("key_type", [bytes, str])
@pytest.mark.parametrize("dataset, normal, test_file, n_train", [("cifar10", "cat", "test_batch", 11),
                                                                 ("cifar100", "food_containers", "test", 2)])
def test_cifar_pickles_with_bytes_or_str_keys(tmp_path, key_type, dataset, normal, test_file, n_train):
    pixels = _write_cifar(tmp_path, dataset, key_type)
    task = load_tasks(make_config("demo", dataset=dataset, data_root=str(tmp_path), classes=normal))[0]
    assert len(task.train) == n_train and task.test_labels.tolist() == [0, 1, 0]
    expected = pixels[test_file][2].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(task.test.load(2)), expected)


def test_cifar_pickle_without_its_labels_is_a_data_error(tmp_path):
    _write_cifar(tmp_path, "cifar100", str)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as handle:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0]}, handle)
    with pytest.raises(DataError, match=r"test has no coarse_labels entry \(it has data, fine_labels\)"):
        load_tasks(make_config("demo", dataset="cifar100", data_root=str(tmp_path), classes="fish"))


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_cifar_batch_is_a_data_error_naming_it(tmp_path, damage):
    _write_cifar(tmp_path, "cifar10", bytes)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:100])
    else:
        batch.unlink()
    with pytest.raises(DataError, match=r"cannot read CIFAR batch .*data_batch_3 .*replace"):
        load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path), classes="cat"))


def _write_stl10(root: Path, n_train: int = 2, n_test: int = 3) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir()
    for split, count in (("train", n_train), ("test", n_test)):
        np.zeros((count, 3, 96, 96), np.uint8).tofile(folder / f"{split}_X.bin")
        np.arange(1, count + 1, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car"]))
    return folder


def test_stl10_binaries_read_and_damaged_ones_are_data_errors(tmp_path):
    folder = _write_stl10(tmp_path)
    task = load_tasks(make_config("demo", dataset="stl10", data_root=str(tmp_path), classes="bird"))[0]
    assert len(task.train) == 1 and task.test_labels.tolist() == [1, 0, 1]
    (folder / "test_X.bin").write_bytes(b"\0" * 100)  # not a whole number of 96 x 96 images
    with pytest.raises(DataError, match="cannot read STL-10 test files"):
        load_tasks(make_config("demo", dataset="stl10", data_root=str(tmp_path), classes="bird"))
    (folder / "class_names.txt").unlink()
    with pytest.raises(DataError, match="has no class_names.txt"):
        load_tasks(make_config("demo", dataset="stl10", data_root=str(tmp_path), classes="bird"))


@pytest.mark.parametrize("damage, message", [
    ("a label out of range", r"test labels in .* hold label 10, outside 0..9 for the 10 classes"),
    ("fewer labels than images", r"test in .*: 3 images but 2 labels"),
    ("rows of another size", r"test data in .* is not rows of 3 x 32 x 32 bytes"),
])
def test_a_cifar_batch_with_wrong_labels_or_pixels_is_a_data_error(tmp_path, damage, message):
    _write_cifar(tmp_path, "cifar10", bytes)
    batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [3, 10, 3]}
    if damage == "fewer labels than images":
        batch[b"labels"] = [3, 3]
    elif damage == "rows of another size":
        batch[b"data"] = np.zeros((3, 3000), np.uint8)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump(batch, handle)
    with pytest.raises(DataError, match=message):
        load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path), classes="cat"))


def test_stl10_pixels_are_read_column_major_and_labels_out_of_range_refused(tmp_path):
    """The binaries store each image channel by channel, column by column (as torchvision reads them)."""
    folder = _write_stl10(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)  # (N, H, W, C)
    images.transpose(0, 3, 2, 1).tofile(folder / "test_X.bin")
    task = load_tasks(make_config("demo", dataset="stl10", data_root=str(tmp_path), classes="bird"))[0]
    assert all(np.array_equal(np.asarray(task.test.load(i)), images[i]) for i in range(3))
    np.array([1, 4, 2], np.uint8).tofile(folder / "test_y.bin")  # 4: a fourth class of three
    with pytest.raises(DataError, match=r"STL-10 test_y.bin .* hold label 3, outside 0..2"):
        load_tasks(make_config("demo", dataset="stl10", data_root=str(tmp_path), classes="bird"))


# ----------------------------------------------------------------------------- bit-repeatable runs


def _demo_run(tmp_path: Path, cache: str, results: str) -> tuple[bytes, dict]:
    config = make_config("demo", classes="1,9", max_train_per_class=40, max_test=200, epochs=2, threads=1,
                         cache_dir=str(tmp_path / cache), results_dir=str(tmp_path / results))
    payload = main.run(config)
    timing = ("_seconds", "_per_second")
    metrics = {task: {k: untimed_curve(v) if k == "curve" else v for k, v in values.items() if not k.endswith(timing)}
               for task, values in payload["per_class"].items()}
    return (main.results_folder(config) / "scores.csv").read_bytes(), metrics


def _cache_arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every array of every unit of a cache, by unit and name, read through the units' JSON."""
    arrays = {}
    for meta_path in cache.rglob("*.json"):
        if not meta_path.name.endswith(".progress.json"):
            for name, entry in json.loads(meta_path.read_text())["arrays"].items():
                arrays[f"{meta_path.relative_to(cache)}:{name}"] = np.load(meta_path.parent / entry["file"])
    return arrays


def test_demo_runs_are_bit_repeatable_with_one_cache_or_two(tmp_path):
    """Three runs in one process, one cache (extracted, then read) and a fresh cache: the same scores.csv bytes
    and the same metrics and training curves to the last bit; the two caches hold the same arrays. (One
    thread: a run is repeatable for a given thread count; see utils.configure_torch.)"""
    first = _demo_run(tmp_path, "cache_a", "results_a")
    assert _demo_run(tmp_path, "cache_a", "results_b") == first
    assert _demo_run(tmp_path, "cache_b", "results_c") == first
    cached, fresh = _cache_arrays(tmp_path / "cache_a"), _cache_arrays(tmp_path / "cache_b")
    assert len(cached) == 6 and _same(fresh, cached)


def test_atomic_files_get_a_plain_files_mode_and_strict_json(tmp_path):
    """mkstemp makes owner-only files; results, checkpoints and cache metadata must be readable like any file
    the user writes. JSON is strict: NaN and infinities (held-out NLL with val_fraction 0) become null."""
    from utils import _UMASK, atomic_write_json

    atomic_write_json(tmp_path / "results.json", {"curve": [{"held_out_nll": float("nan")}, 1.5, float("inf")]})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~_UMASK
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"curve": [{"held_out_nll": None}, 1.5, None]}


def test_notes_of_a_run_without_held_out_images_say_where_epoch_and_threshold_came_from(tmp_path):
    config = make_config("demo", method="gaussian", classes="0", val_fraction=0.0, cache_dir=str(tmp_path / "cache"),
                         results_dir=str(tmp_path / "results"))
    main.run(config)
    payload = json.loads((main.results_folder(config) / "results.json").read_text())
    assert payload["held_out"].startswith("val_fraction 0: every normal training image is fitted")
    assert "the fit images' own scores" in payload["selection"] and "held-out" not in payload["selection"]
    assert "fit images themselves" in payload["per_class"]["0"]["threshold_rule"]
    assert "the fit images' own scores" in (main.results_folder(config) / "results.md").read_text()


def test_a_weights_file_torch_will_not_load_safely_is_named_without_unsafe_advice(tmp_path):
    from extractor import _read_state_dict

    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": np.zeros(3)}, path)  # a numpy array: refused by torch.load(weights_only=True)
    with pytest.raises(WeightsError, match="not a state dict saved by torch.save") as caught:
        _read_state_dict(str(path))
    assert "weights_only set to False" not in str(caught.value)


@pytest.mark.parametrize("script", sorted(path.name for path in (ROOT / "bench").glob("*.py")))
def test_every_bench_script_imports(script):
    """Each bench script's imports resolve (a renamed helper would otherwise break it only when run)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None))
