"""Datasets and protocols: counts, labels, subsets, folder layouts and their errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import make_config
from datasets import DataError, MVTEC_CATEGORIES, load_mask, load_tasks


def write_image(path: Path, value: int = 128, mode: str = "RGB", size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode)).save(path)


def test_digits_protocol_counts():
    tasks = load_tasks(make_config("demo"))
    assert [t.name for t in tasks] == [str(d) for d in range(10)]
    assert sum(len(t.train) for t in tasks) == 898
    assert all(len(t.test) == 899 and t.test is tasks[0].test for t in tasks)  # one shared test split
    zero = tasks[0]
    assert (zero.test_labels == 0).sum() == (zero.test.targets == 0).sum() == 89
    assert set(zero.train.targets) == {0}


def test_quick_subsets_are_seeded_and_stratified():
    config = make_config("demo", max_train_per_class=20, max_test=300, seed=3)
    tasks = load_tasks(config)
    assert all(len(t.train) == 20 for t in tasks)
    counts = np.bincount(tasks[0].test.targets, minlength=10)
    assert counts.sum() == 300 and counts.min() >= 29 and counts.max() <= 31
    again = load_tasks(config)
    assert again[4].train.ids == tasks[4].train.ids and again[0].test.ids == tasks[0].test.ids
    other = load_tasks(make_config("demo", max_train_per_class=20, max_test=300, seed=4))
    assert other[4].train.ids != tasks[4].train.ids
    assert tasks[0].train_key != load_tasks(make_config("demo", classes="0"))[0].train_key


def test_torchvision_pickled_cifar10_layout(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for name, labels in [(f"data_batch_{i}", [i % 10, (i + 1) % 10]) for i in range(1, 6)] + [("test_batch", [3, 5, 3])]:
        pixels[name] = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": pixels[name], b"labels": labels}, handle)
    tasks = load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path), classes="cat"))
    assert len(tasks) == 1 and tasks[0].name == "cat"
    assert len(tasks[0].train) == 2  # label 3: 2nd image of batch 2, 1st of batch 3
    assert tasks[0].test_labels.tolist() == [0, 1, 0]
    for index, (batch, row) in enumerate((("data_batch_2", 1), ("data_batch_3", 0))):
        expected = pixels[batch][row].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(np.asarray(tasks[0].train.load(index).convert("RGB")), expected)


def test_image_folder_cifar_layout(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "dog", "frog"):
            for index in range(count):
                write_image(tmp_path / split / name / f"{index}.png")
    tasks = load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path), classes="dog"))
    assert len(tasks) == 1 and len(tasks[0].train) == 3 and len(tasks[0].test) == 6
    assert tasks[0].test_labels.tolist() == [1, 1, 0, 0, 1, 1]


def test_mvtec_layout_with_masks_and_modes(tmp_path):
    root = tmp_path / "bottle"
    write_image(root / "train" / "good" / "000.png", mode="L")
    write_image(root / "test" / "good" / "000.png", mode="RGBA")
    write_image(root / "test" / "broken" / "000.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:8, 4:8] = 255
    (root / "ground_truth" / "broken").mkdir(parents=True)
    Image.fromarray(mask).save(root / "ground_truth" / "broken" / "000_mask.png")
    task = load_tasks(make_config("demo", dataset="mvtec", data_root=str(tmp_path), classes="bottle"))[0]
    assert task.test_labels.tolist() == [1, 0]
    assert task.test.load(1).mode == "RGB" and task.train.load(0).mode == "RGB"
    assert load_mask(task.test_masks[1], (8, 8)).sum() == 0
    assert load_mask(task.test_masks[0], (8, 8)).sum() == 4


def test_defective_image_without_mask_is_named(tmp_path):
    root = tmp_path / "bottle"
    write_image(root / "train" / "good" / "000.png")
    write_image(root / "test" / "crack" / "007.png")
    (root / "ground_truth").mkdir()
    with pytest.raises(DataError, match="007.png"):
        load_tasks(make_config("demo", dataset="mvtec", data_root=str(tmp_path), classes="bottle"))


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="cifar10", data_root="/nonexistent/cifar"), "does not exist"),
    (dict(dataset="cifar10", data_root=""), "needs --data_root"),
    (dict(classes="eleven"), "unknown class eleven"),
    (dict(dataset="mvtec", data_root="/tmp", classes="bottle"), "not found under"),
    (dict(dataset="mvtec", data_root="/tmp", classes="bottel"), "valid: " + ", ".join(MVTEC_CATEGORIES[:2])),
])
def test_bad_data_requests_explain_the_fix(overrides, message, monkeypatch):
    monkeypatch.delenv("ANOMALY_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=message):
        load_tasks(make_config("demo", **overrides))


def test_corrupt_image_is_named(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            write_image(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not an image")
    task = load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path), classes="a"))[0]
    with pytest.raises(DataError, match="1.png"):
        task.train.load(1)


def test_cifar10_real_copy_counts(cifar10_root):
    tasks = load_tasks(make_config("demo", dataset="cifar10", data_root=str(cifar10_root)))
    assert [t.name for t in tasks][:3] == ["airplane", "automobile", "bird"]
    assert all(len(t.train) == 5000 for t in tasks)
    assert len(tasks[0].test) == 10000 and int(tasks[0].test_labels.sum()) == 9000
