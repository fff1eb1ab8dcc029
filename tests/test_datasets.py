"""Datasets and protocols: counts, labels, subsets, folder layouts and their errors."""

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import make_config
from datasets import (CIFAR10_CLASSES, STL10_CLASSES, DataError, ImageList, dataset_identity, held_out_split,
                      image_list_from_files, list_image_files, load_mask, load_tasks, mvtec_tasks)


def write_image(path: Path, value: int = 128, mode: str = "RGB", size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode)).save(path)


def write_category(root: Path, masks: bool = True) -> None:
    """A minimal MVTec-layout category: one good training image, one good and one defective test image."""
    write_image(root / "train" / "good" / "000.png")
    write_image(root / "test" / "good" / "000.png")
    write_image(root / "test" / "crack" / "000.png", value=200)
    if masks:
        write_image(root / "ground_truth" / "crack" / "000_mask.png", value=255, mode="L")


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
    for split, count in (("train", 2), ("test", 1)):
        for name in CIFAR10_CLASSES:
            for index in range(count):
                write_image(tmp_path / split / name / f"{index}.png")
    tasks = load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path), classes="dog"))
    assert len(tasks) == 1 and len(tasks[0].train) == 2 and len(tasks[0].test) == 10
    assert tasks[0].test_labels.tolist() == [0 if name == "dog" else 1 for name in CIFAR10_CLASSES]


def test_cifar_folders_that_are_not_the_protocols_classes_are_refused(tmp_path):
    for name in ("apple", "aquarium_fish", "baby"):  # CIFAR-100 fine classes, not its 20 superclasses
        for split in ("train", "test"):
            write_image(tmp_path / "c100" / split / name / "0.png")
    with pytest.raises(DataError, match="CIFAR-100 folders .* are 3 classes; the protocol needs exactly "
                                        "aquatic_mammals, fish,"):
        load_tasks(make_config("demo", dataset="cifar100", data_root=str(tmp_path / "c100")))
    for name in CIFAR10_CLASSES:
        write_image(tmp_path / "c10" / "train" / name / "0.png")
        write_image(tmp_path / "c10" / "test" / name / "0.png")
    write_image(tmp_path / "c10" / "test" / "unicorn" / "0.png")
    with pytest.raises(DataError, match="unicorn under .* have no training folder"):
        load_tasks(make_config("demo", dataset="cifar10", data_root=str(tmp_path / "c10")))


def test_cats_vs_dogs_refuses_the_competition_layout_and_other_than_two_classes(tmp_path):
    write_image(tmp_path / "kaggle" / "train" / "cat.0.jpg")
    write_image(tmp_path / "kaggle" / "test1" / "1.jpg")
    with pytest.raises(DataError, match="Kaggle competition layout .* PetImages"):
        load_tasks(make_config("demo", dataset="catsvsdogs", data_root=str(tmp_path / "kaggle")))
    for name in ("Cat", "Dog", "Rabbit"):
        write_image(tmp_path / "pets" / name / "0.jpg")
    (tmp_path / "pets" / "__MACOSX").mkdir()
    with pytest.raises(DataError, match="exactly two class subfolders .* found Cat, Dog, Rabbit"):
        load_tasks(make_config("demo", dataset="catsvsdogs", data_root=str(tmp_path / "pets")))


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
    write_image(root / "ground_truth" / "crack" / "007.png", value=255, mode="L")  # named like the image
    with pytest.raises(DataError, match=r"ground_truth/crack/ holds 007\.png \(a mask is named after its image, "
                                        r"e\.g\. 000\.png -> 000_mask\.png"):
        load_tasks(make_config("demo", dataset="mvtec", data_root=str(tmp_path), classes="bottle"))


def test_an_mvtec_root_given_as_a_folder_dataset_is_told_to_use_mvtec(tmp_path):
    write_category(tmp_path / "bottle")
    with pytest.raises(DataError, match=r"holds categories \(bottle\): use --dataset mvtec"):
        load_tasks(make_config("demo", dataset="folder", data_root=str(tmp_path)))


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="cifar10", data_root="/nonexistent/cifar"), "does not exist"),
    (dict(dataset="cifar10", data_root=""), "needs --data_root"),
    (dict(classes="eleven"), "unknown class eleven"),
    (dict(dataset="mvtec", data_root="/tmp", classes="bottle"), "not found under"),
    (dict(dataset="mvtec", data_root="/tmp", classes="bottel"), "bottel.*categories present under"),
])
def test_bad_data_requests_explain_the_fix(overrides, message, monkeypatch):
    monkeypatch.delenv("ANOMALY_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=message):
        load_tasks(make_config("demo", **overrides))


def test_corrupt_image_is_named(tmp_path):
    for split in ("train", "test"):
        for name in STL10_CLASSES:
            write_image(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "airplane" / "1.png").write_bytes(b"not an image")
    task = load_tasks(make_config("demo", dataset="stl10", data_root=str(tmp_path), classes="airplane"))[0]
    with pytest.raises(DataError, match="1.png"):
        task.train.load(1)


def test_cifar10_real_copy_counts(cifar10_root):
    tasks = load_tasks(make_config("demo", dataset="cifar10", data_root=str(cifar10_root)))
    assert [t.name for t in tasks][:3] == ["airplane", "automobile", "bird"]
    assert all(len(t.train) == 5000 for t in tasks)
    assert len(tasks[0].test) == 10000 and int(tasks[0].test_labels.sum()) == 9000


def test_unknown_but_well_formed_mvtec_category_is_read_with_a_note(tmp_path, capsys):
    write_category(tmp_path / "tire")
    tasks = load_tasks(make_config("demo", dataset="mvtec", data_root=str(tmp_path), classes="tire"))
    assert [t.name for t in tasks] == ["tire"] and tasks[0].test_labels.tolist() == [1, 0]
    assert capsys.readouterr().out.strip() == ("note: 'tire' is not one of MVTec AD's 15 categories; "
                                               "read as an MVTec-layout folder")
    write_category(tmp_path / "bottle")
    mvtec_tasks(tmp_path, ["bottle"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["tire", "../tire", "nothing"])
def test_malformed_mvtec_category_names_its_folder_and_the_present_ones(tmp_path, name):
    write_image(tmp_path / "tire" / "test" / "crack" / "000.png")  # no train/good
    write_category(tmp_path / "bottle")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / name)) + ".*categories present under .*: bottle"):
        mvtec_tasks(tmp_path, [name])


def test_mvtec_defect_images_still_need_masks(tmp_path):
    write_category(tmp_path / "tire", masks=False)
    with pytest.raises(DataError, match="no mask"):
        mvtec_tasks(tmp_path, ["tire"])
    task = load_tasks(make_config("demo", dataset="folder", data_root=str(tmp_path / "tire")))[0]
    assert task.test_masks is None  # the folder dataset reads unmasked defects


def test_all_mvtec_categories_are_the_folders_with_train_good(tmp_path):
    for name in ("zeta", "bottle", "alpha"):
        write_category(tmp_path / name)
    write_image(tmp_path / "broken" / "test" / "good" / "000.png")
    (tmp_path / "empty").mkdir()
    tasks = load_tasks(make_config("demo", dataset="mvtec", data_root=str(tmp_path), classes="all"))
    assert [t.name for t in tasks] == ["alpha", "bottle", "zeta"]
    with pytest.raises(DataError, match="no category folder with train/good"):
        mvtec_tasks(tmp_path / "empty", None)


def test_dataset_identity_tells_folders_apart_and_ignores_how_the_path_is_written(tmp_path, monkeypatch):
    for name in ("bottle", "tile tire"):
        write_category(tmp_path / name)
    bottle = dataset_identity(make_config("demo", dataset="folder", data_root=str(tmp_path / "bottle")))
    tire = dataset_identity(make_config("demo", dataset="folder", data_root=str(tmp_path / "tile tire")))
    assert bottle != tire and bottle.startswith("folder-bottle-") and tire.startswith("folder-tile_tire-")
    assert all(c.isalnum() or c in "._-" for c in bottle + tire)
    monkeypatch.chdir(tmp_path)
    for relative in ("bottle", "./bottle/", "tile tire/../bottle"):
        assert dataset_identity(make_config("demo", dataset="folder", data_root=relative)) == bottle
    monkeypatch.chdir(tmp_path / "bottle")
    assert dataset_identity(make_config("demo", dataset="folder", data_root=".")) == bottle
    assert dataset_identity(make_config("demo", dataset="mvtec", data_root=".")) != bottle
    assert dataset_identity(make_config("demo")) == "digits"


def test_source_is_the_resolved_file_path_or_the_array_id(tmp_path, monkeypatch):
    write_category(tmp_path / "bottle")
    monkeypatch.chdir(tmp_path)
    task = load_tasks(make_config("demo", dataset="folder", data_root="bottle"))[0]
    subset = task.test.subset(np.array([1]))
    assert subset.source(0) == str((tmp_path / "bottle" / "test" / "good" / "000.png").resolve())
    assert os.path.isabs(task.train.source(0))
    digits = load_tasks(make_config("demo", classes="3"))[0]
    assert digits.train.source(2) == digits.train.ids[2] and digits.train.source(2).startswith("digits/")


def test_held_out_split_is_seeded_disjoint_and_bounded():
    fit, held = held_out_split(50, 0.2, seed=3)
    assert len(held) == 10 and len(fit) == 40
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(50))
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(held) > 0)
    again = held_out_split(50, 0.2, seed=3)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], held)
    assert not np.array_equal(held_out_split(50, 0.2, seed=4)[1], held)
    assert len(held_out_split(50, 0.001, seed=0)[1]) == 1  # at least one held out
    assert len(held_out_split(2, 0.99, seed=0)[0]) == 1  # at least one kept for the fit
    assert len(held_out_split(1, 0.5, seed=0)[1]) == 0
    fit, held = held_out_split(7, 0.0, seed=0)
    assert np.array_equal(fit, np.arange(7)) and held.dtype == np.int64 and len(held) == 0
    with pytest.raises(ValueError):
        held_out_split(10, 1.5, seed=0)


def test_list_image_files_for_a_folder_a_glob_and_no_match(tmp_path):
    for name in ("b.png", "a.JPG", "sub/c.png", "sub/deeper/d.bmp"):
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    everything = list_image_files(str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in everything] == ["a.JPG", "b.png", "sub/c.png",
                                                                          "sub/deeper/d.bmp"]
    assert [p.name for p in list_image_files(str(tmp_path / "*.png"))] == ["b.png"]
    assert [p.name for p in list_image_files(str(tmp_path / "**" / "*.png"))] == ["b.png", "c.png"]
    with pytest.raises(DataError, match="nothing-\\*"):
        list_image_files(str(tmp_path / "nothing-*"))
    images = image_list_from_files(everything)
    assert isinstance(images, ImageList) and images.targets.tolist() == [0, 0, 0, 0]
    assert images.ids[0] == str((tmp_path / "a.JPG").resolve()) == images.source(0)
    assert images.load(3).mode == "RGB"


def test_magnetic_tile_real_copy(magnetic_tile_root, capsys):
    root = magnetic_tile_root.resolve()
    task = mvtec_tasks(root.parent, [root.name])[0]
    assert "is not one of MVTec AD's 15 categories" in capsys.readouterr().out
    # the published split (DifferNet's mtd_train_filenames.txt, reused by CS-Flow and PatchCore): 761 defect-free
    # training tiles; the other 191 defect-free and all 392 defective tiles are the test set
    assert len(task.train) == 761 and len(task.test) == 583 and int(task.test_labels.sum()) == 392
    split = root / "split.csv"
    if split.is_file():  # the copy's own list of the published training stems
        with open(split) as handle:
            listed = {row["stem"] for row in csv.DictReader(handle) if row["split"] == "train"}
        assert {Path(task.train.source(i)).stem for i in range(len(task.train))} == listed
    assert all((m is None) == (label == 0) for m, label in zip(task.test_masks, task.test_labels))
    assert task.test.source(0).startswith(str(root)) and os.path.isfile(task.test.source(0))
    folder = load_tasks(make_config("demo", dataset="folder", data_root=str(magnetic_tile_root)))[0]
    assert folder.test.ids == task.test.ids
    assert dataset_identity(make_config("demo", dataset="folder", data_root=str(magnetic_tile_root))).startswith(
        "folder-magnetic_tile-")


def test_masks_in_other_encodings_read_as_the_defect_they_mark(tmp_path):
    """0/255 (MVTec AD), 0/1, a palette label file (labelme: index 1 = dark red) and a mask drawn in red all
    mark the same 4x4 square; an all-black mask marks nothing."""
    square = np.zeros((16, 16), dtype=np.uint8)
    square[4:8, 4:8] = 1
    palette = Image.fromarray(square, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[4:8, 4:8, 0] = 255
    masks = {"mvtec.png": Image.fromarray(square * 255, "L"), "binary.png": Image.fromarray(square, "L"),
             "palette.png": palette, "red.png": Image.fromarray(red, "RGB"),
             "black.png": Image.fromarray(np.zeros((16, 16), np.uint8), "L")}
    for name, image in masks.items():
        image.save(tmp_path / name)
    expected = square.astype(bool)
    for name in ("mvtec.png", "binary.png", "palette.png", "red.png"):
        assert np.array_equal(load_mask(str(tmp_path / name), (16, 16)), expected), name
        assert load_mask(str(tmp_path / name), (8, 8)).sum() == 4, name
    assert not load_mask(str(tmp_path / "black.png"), (16, 16)).any()


@pytest.mark.parametrize("good", ["Good", "GOOD"])
def test_a_good_test_folder_in_other_case_holds_normal_images(tmp_path, good):
    root = tmp_path / "parts"
    write_image(root / "train" / "good" / "000.png")
    write_image(root / "test" / good / "000.png")
    write_image(root / "test" / "crack" / "000.png", value=200)
    task = load_tasks(make_config("demo", dataset="folder", data_root=str(root)))[0]
    assert dict(zip(task.test.ids, task.test_labels.tolist())) == {f"test/{good}/000.png": 0, "test/crack/000.png": 1}


def test_folder_given_as_dot_is_named_after_the_folder(tmp_path, monkeypatch):
    root = tmp_path / "my_parts"
    write_category(root, masks=False)
    monkeypatch.chdir(root)
    task = load_tasks(make_config("demo", dataset="folder", data_root="."))[0]
    assert task.name == "my_parts"


def test_one_file_whose_name_holds_glob_characters_is_found(tmp_path):
    path = tmp_path / "scan [2].png"
    write_image(path)
    assert list_image_files(str(path)) == [path]


def test_rewriting_an_image_under_its_name_changes_the_fingerprint(tmp_path):
    root = tmp_path / "parts"
    write_category(root, masks=False)
    config = make_config("demo", dataset="folder", data_root=str(root))
    before = load_tasks(config)[0].train.fingerprint()
    assert load_tasks(config)[0].train.fingerprint() == before
    write_image(root / "train" / "good" / "000.png", value=10, size=24)
    assert load_tasks(config)[0].train.fingerprint() != before


def test_float_image_is_refused_naming_the_fix(tmp_path):
    write_category(tmp_path / "parts", masks=False)
    float_image = Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), "F")
    float_image.save(tmp_path / "parts" / "train" / "good" / "000.tif")
    task = load_tasks(make_config("demo", dataset="folder", data_root=str(tmp_path / "parts")))[0]
    position = task.train.ids.index("train/good/000.tif")
    with pytest.raises(DataError, match=r"000\.tif holds 32-bit floats .* save it as an 8- or 16-bit image"):
        task.train.load(position)


def test_cats_vs_dogs_folders_split_each_class_80_20_disjoint_and_repeatably(tmp_path):
    """Kaggle PetImages layout (Cat/, Dog/): per class, round(20%) of the files are test images, the rest
    training images; together they are every file once; a second read gives the same split."""
    for name, count in (("Cat", 10), ("Dog", 7)):
        for index in range(count):
            write_image(tmp_path / "pets" / name / f"{index}.jpg", value=index)
    config = make_config("demo", dataset="catsvsdogs", data_root=str(tmp_path / "pets"))
    tasks = load_tasks(config)
    assert [task.name for task in tasks] == ["Cat", "Dog"]
    cat = tasks[0]
    train_files = list(cat.train.ids)
    test_files = list(cat.test.ids)
    assert len(train_files) == 8 and all(i.startswith("Cat/") for i in train_files)  # 10 - round(2.0)
    assert sorted(i for i in test_files if i.startswith("Cat/")) == sorted(
        f"Cat/{n}.jpg" for n in range(10) if f"Cat/{n}.jpg" not in train_files)
    assert sum(i.startswith("Dog/") for i in test_files) == 1  # round(1.4)
    assert len(tasks[1].train) == 6 and set(tasks[1].train.ids).isdisjoint(test_files)
    assert cat.test_labels.tolist() == [0 if i.startswith("Cat/") else 1 for i in test_files]
    again = load_tasks(config)
    assert again[0].train.ids == cat.train.ids and again[0].test.ids == cat.test.ids
    (tmp_path / "pets" / "Cat" / "empty.jpg").write_bytes(b"")  # PetImages ships empty files: left out
    write_image(tmp_path / "pets" / "Cat" / "10.jpg")  # one class's new file does not move the other's split
    more = load_tasks(config)
    assert "Cat/empty.jpg" not in more[0].train.ids + more[0].test.ids and len(more[0].train) == 9
    assert more[1].train.ids == tasks[1].train.ids


@pytest.mark.parametrize("dataset, folders, message", [
    ("stl10", ("a", "b"), "STL-10 folders .* are 2 classes; the protocol needs exactly airplane, bird, car"),
    ("stl10", STL10_CLASSES[:9], "are 9 classes"),
    ("mnist", tuple("0123456789")[:9], "MNIST folders .* are 9 classes .*the protocol needs its 10"),
    ("fmnist", ("shirt", "trouser"), "Fashion-MNIST folders .* are 2 classes"),
])
def test_stl10_and_mnist_folders_need_the_protocol_s_classes(tmp_path, dataset, folders, message):
    """A folder of other classes would be read as other one-class tasks, each scored against the wrong rest."""
    for split in ("train", "test"):
        for name in folders:
            write_image(tmp_path / split / name / "0.png")
    with pytest.raises(DataError, match=message):
        load_tasks(make_config("demo", dataset=dataset, data_root=str(tmp_path)))


def test_ten_digit_folders_are_mnist(tmp_path):
    for split in ("train", "test"):
        for name in "0123456789":
            write_image(tmp_path / split / name / "0.png")
    tasks = load_tasks(make_config("demo", dataset="mnist", data_root=str(tmp_path), classes="3"))
    assert [task.name for task in tasks] == ["3"] and len(tasks[0].test) == 10
