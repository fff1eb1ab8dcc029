"""Datasets and evaluation protocols.

Every dataset becomes a list of :class:`Task` objects, one per normal class (one-class protocols:
CIFAR-10/100, STL-10, MNIST, Fashion-MNIST, Cats-vs-Dogs, digits) or per category (MVTec AD, a
generic folder). A task holds the normal training images and the labelled test images
(0 = normal, 1 = anomalous), plus pixel masks where the dataset has them. For the one-class
protocols the test split is one object shared by every task, so it is extracted and cached once.

Nothing is downloaded unless ``download=True``; a missing dataset stops with a :class:`DataError`
that says where the files are expected.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from config import Config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_SUPERCLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DIGITS_SPLIT_SEED = 0  # fixed: the digits train/test halves are part of the dataset's definition


class DataError(RuntimeError):
    """Missing, malformed or unreadable data; the message says what to fix."""


class FileLoader:
    """Loads images from files (picklable, for DataLoader workers)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __call__(self, position: int) -> Image.Image:
        path = self.paths[position]
        try:
            with Image.open(path) as image:
                return as_rgb(image, f"image {path}")
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"cannot read image {path} ({error}); remove or replace the file") from None

    def source(self, position: int) -> str:
        """The absolute, resolved path of the image (what predict.py matches scores.csv rows by)."""
        return os.path.realpath(self.paths[position])

    def stamp(self, position: int) -> str:
        """Size and modification time of the file: an image rewritten under the same name changes it."""
        try:
            status = os.stat(self.paths[position])
        except OSError as error:
            raise DataError(f"cannot read image {self.paths[position]} ({error}); remove or replace the file") from None
        return f"{status.st_size}:{status.st_mtime_ns}"


def as_rgb(image: Image.Image, name: str) -> Image.Image:
    """The RGB picture an image shows, whatever its mode (``name`` says which image in an error)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: Pillow's convert("RGB") clips at 255 (a white picture); scale 0..65535
        # to 0..255 instead (v * 257 -> v exactly)
        pixels = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(pixels).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise DataError(f"{name} holds 32-bit floats (mode F), whose range Pillow cannot know "
                        "(convert('RGB') clips them to 0 or 1); save it as an 8- or 16-bit image")
    return image.convert("RGB")


class InputLoader:
    """Loads the inputs of ``Detector.predict`` (see :func:`picture_of`) as RGB images when their batch is
    scored, so that a long list of paths is not decoded all at once."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __call__(self, position: int) -> Image.Image:
        return picture_of(self.items[position], f"image {position}")


def picture_of(item: Any, name: str) -> Image.Image:
    """One input of ``Detector.predict`` as an RGB PIL image.

    ``item``: a file path, a PIL image, a (3, H, W) tensor or an (H, W, 3) / (H, W) array, uint8 or
    float in [0, 1] (torchvision's ``to_tensor``; multiplied by 255 and rounded).
    """
    import torch

    from utils import to_numpy

    if isinstance(item, (str, os.PathLike)):
        if Path(item).is_dir():
            raise DataError(f"{name}: {item} is a folder; pass its files (datasets.list_image_files lists them)")
        if not Path(item).is_file():
            raise DataError(f"{name}: no image file {item}")
        return FileLoader([str(item)])(0)
    if isinstance(item, Image.Image):
        return as_rgb(item, name)
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or item.shape[0] != 3:
            grey = " (a grey one: image.expand(3, -1, -1))" if item.dim() == 3 and item.shape[0] == 1 else ""
            raise DataError(f"{name}: a tensor image must be (3, H, W){grey}; got {tuple(item.shape)}")
        item = to_numpy(item.permute(1, 2, 0))
    if not isinstance(item, np.ndarray):
        raise DataError(f"{name}: expected a file path, a PIL image, a tensor or an array; got {type(item).__name__}")
    if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] != 3):
        alpha = " (RGBA: drop the alpha channel, image[..., :3])" if item.ndim == 3 and item.shape[2] == 4 else ""
        raise DataError(f"{name}: an array image must be (H, W, 3) or (H, W){alpha}; got {item.shape}")
    if item.dtype != np.uint8:
        if not np.issubdtype(item.dtype, np.floating) or not (np.isfinite(item).all() and 0 <= item.min()
                                                               and item.max() <= 1):
            raise DataError(f"{name}: pixels must be uint8 or floats in [0, 1]; got {item.dtype} "
                            f"from {item.min()} to {item.max()}")
        item = np.rint(item * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(item)).convert("RGB")


class ArrayLoader:
    """Loads images from a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def __call__(self, position: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.pixels[position])).convert("RGB")


@dataclass(frozen=True)
class ImageList:
    """Images identified by stable ids, with one integer target each, loaded lazily as RGB."""

    ids: tuple[str, ...]
    targets: np.ndarray
    loader: Callable[[int], Image.Image]
    positions: np.ndarray  # positions in the loader's full list

    @classmethod
    def create(cls, ids: Sequence[str], targets: Sequence[int], loader: Callable[[int], Image.Image]) -> ImageList:
        return cls(tuple(ids), np.asarray(targets, dtype=np.int64), loader, np.arange(len(ids)))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        return self.loader(int(self.positions[index]))

    def source(self, index: int) -> str:
        """Where image ``index`` comes from: the loader's ``source`` (a resolved file path for
        :class:`FileLoader`), else its id (array-backed images such as ``test/123`` have no file)."""
        source = getattr(self.loader, "source", None)
        return self.ids[index] if source is None else source(int(self.positions[index]))

    def subset(self, indices: np.ndarray) -> ImageList:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageList(tuple(self.ids[i] for i in indices), self.targets[indices], self.loader,
                         self.positions[indices])

    def fingerprint(self) -> str:
        """Hash of the ids, the targets and, for files, each file's size and modification time: a cache built
        for other images, or for files since rewritten under the same names, is detected as stale."""
        digest = hashlib.sha256("\n".join(self.ids).encode())
        digest.update(self.targets.tobytes())
        stamp = getattr(self.loader, "stamp", None)
        if stamp is not None:
            digest.update("\n".join(stamp(int(position)) for position in self.positions).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Task:
    """One normal class (or category): what is trained on and what is scored."""

    name: str
    train: ImageList
    test: ImageList
    test_labels: np.ndarray  # 0 normal, 1 anomalous
    test_masks: tuple[str | None, ...] | None  # mask path per test image (None = all normal); None = no masks
    train_key: str  # cache unit names
    test_key: str


# ----------------------------------------------------------------------------- one-class sources


@dataclass(frozen=True)
class LabelledSplits:
    """A labelled dataset: class names and a train and a test split with class-index targets."""

    classes: tuple[str, ...]
    train: ImageList
    test: ImageList


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _folder_split(root: Path, split: str, classes: Sequence[str]) -> ImageList:
    paths: list[str] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        folder = root / split / name
        if not folder.is_dir():
            raise DataError(f"missing folder {folder}: the folder layout needs {root}/{split}/<class>/ for every class")
        files = _list_images(folder)
        paths += [str(p) for p in files]
        targets += [index] * len(files)
    ids = [os.path.relpath(p, root) for p in paths]
    return ImageList.create(ids, targets, FileLoader(paths))


def _class_folders(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))


def _image_folder(root: Path, dataset: str = "", expected: Sequence[str] = (), count: int = 0) -> LabelledSplits:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (torchvision ImageFolder layout).

    ``expected``: the class names the dataset's protocol defines (CIFAR-10's 10 classes, CIFAR-100's 20
    superclasses, STL-10's 10); other folders are refused, since the one-class protocol scores the whole test
    split. ``count``: the number of classes, where their folder names are not fixed (MNIST's digits)."""
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(f"no class folders under {root / 'train'}")
    if count and len(classes) != count:
        raise DataError(f"{dataset} folders under {root / 'train'} are {len(classes)} classes ({', '.join(classes)}); "
                        f"the protocol needs its {count}: arrange train/<class>/ and test/<class>/ so, or give "
                        "torchvision's files")
    if expected and set(classes) != set(expected):
        hint = (" (these look like CIFAR-100's 100 fine classes; the protocol uses the 20 superclasses)"
                if len(classes) == 100 else "")
        raise DataError(f"{dataset} folders under {root / 'train'} are {len(classes)} classes{hint}; the protocol "
                        f"needs exactly {', '.join(expected)}: arrange train/<class>/ and test/<class>/ so, or "
                        "give the original pickled files")
    test_only = sorted(set(_class_folders(root / "test")) - set(classes))
    if test_only:
        raise DataError(f"class folder(s) {', '.join(test_only)} under {root / 'test'} have no training folder; "
                        f"add {root / 'train'}/<class>/ for them or remove them (the test split is scored whole)")
    return LabelledSplits(classes, _folder_split(root, "train", classes), _folder_split(root, "test", classes))


def _has_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _array_split(name: str, pixels: np.ndarray, targets: Sequence[int]) -> ImageList:
    return ImageList.create([f"{name}/{i}" for i in range(len(pixels))], targets, ArrayLoader(pixels))


def _unpickle(path: Path, *keys: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys, which must include ``keys``: the original files (Python 2
    pickles) give ``bytes`` keys, a copy re-saved from Python 3 (or read the way torchvision does) ``str``."""
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise DataError(f"cannot read CIFAR batch {path} ({error}); replace the file or the whole folder") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = [key for key in keys if key not in batch]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} entry (it has {', '.join(map(str, batch))}); "
                        "is it a CIFAR batch file?")
    return batch


def _cifar_split(name: str, batches: Sequence[dict[str, Any]], label_key: str, classes: Sequence[str],
                 path: Path) -> ImageList:
    """The images of CIFAR batches (rows of 3 x 32 x 32 bytes) with their labels, checked for size, count
    and range."""
    pixels, labels = [], []
    for batch in batches:
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.size % (3 * 32 * 32):
            raise DataError(f"CIFAR {name} data in {path} is not rows of 3 x 32 x 32 bytes ({data.dtype}, "
                            f"{data.size} values); replace the files")
        pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64).ravel())
        if len(pixels[-1]) != len(labels[-1]):
            raise DataError(f"CIFAR {name} in {path}: {len(pixels[-1])} images but {len(labels[-1])} {label_key}; "
                            "replace the files")
    targets = np.concatenate(labels)
    _check_label_range(targets, classes, f"CIFAR {name} {label_key} in {path}")
    return _array_split(name, np.concatenate(pixels), targets)


def _check_label_range(targets: np.ndarray, classes: Sequence[str], where: str) -> None:
    outside = targets[(targets < 0) | (targets >= len(classes))]
    if len(outside):
        raise DataError(f"{where} hold label {int(outside[0])}, outside 0..{len(classes) - 1} for the "
                        f"{len(classes)} classes; replace the files")


def _find_pickle_dir(root: Path, name: str, marker: str) -> Path | None:
    for candidate in (root / name, root):
        if (candidate / marker).is_file():
            return candidate
    return None


def _missing(dataset: str, root: Path, expected: str) -> DataError:
    return DataError(f"{dataset} not found under '{root}': expected {expected}; set --data_root "
                     f"(or ANOMALY_DATA_ROOT), or --download where torchvision can fetch it")


def _torchvision_download(dataset_class: str, root: Path, **kwargs) -> None:
    import torchvision.datasets

    getattr(torchvision.datasets, dataset_class)(str(root), download=True, **kwargs)


def cifar10(root: Path, download: bool) -> LabelledSplits:
    folder = _find_pickle_dir(root, "cifar-10-batches-py", "data_batch_1")
    if folder is None and not _has_image_folder(root) and download:
        _torchvision_download("CIFAR10", root)
        folder = _find_pickle_dir(root, "cifar-10-batches-py", "data_batch_1")
    if folder is not None:
        batches = [_unpickle(folder / f"data_batch_{i}", "data", "labels") for i in range(1, 6)]
        test = _unpickle(folder / "test_batch", "data", "labels")
        return LabelledSplits(CIFAR10_CLASSES, _cifar_split("train", batches, "labels", CIFAR10_CLASSES, folder),
                              _cifar_split("test", [test], "labels", CIFAR10_CLASSES, folder))
    if _has_image_folder(root):
        return _image_folder(root, "CIFAR-10", CIFAR10_CLASSES)
    raise _missing("CIFAR-10", root, "cifar-10-batches-py/ (torchvision) or train/<class>/ and test/<class>/")


def cifar100(root: Path, download: bool) -> LabelledSplits:
    """CIFAR-100 with the 20 superclasses (coarse labels) as classes."""
    folder = _find_pickle_dir(root, "cifar-100-python", "train")
    if folder is None and not _has_image_folder(root) and download:
        _torchvision_download("CIFAR100", root)
        folder = _find_pickle_dir(root, "cifar-100-python", "train")
    if folder is not None:
        train, test = (_unpickle(folder / name, "data", "coarse_labels") for name in ("train", "test"))
        return LabelledSplits(CIFAR100_SUPERCLASSES,
                              _cifar_split("train", [train], "coarse_labels", CIFAR100_SUPERCLASSES, folder),
                              _cifar_split("test", [test], "coarse_labels", CIFAR100_SUPERCLASSES, folder))
    if _has_image_folder(root):
        return _image_folder(root, "CIFAR-100", CIFAR100_SUPERCLASSES)
    raise _missing("CIFAR-100", root, "cifar-100-python/ (torchvision) or train/<superclass>/ and test/<superclass>/")


def stl10(root: Path, download: bool) -> LabelledSplits:
    folder = _find_pickle_dir(root, "stl10_binary", "train_X.bin")
    if folder is None and not _has_image_folder(root) and download:
        _torchvision_download("STL10", root, split="train")
        folder = _find_pickle_dir(root, "stl10_binary", "train_X.bin")
    if folder is not None:
        def read(split: str) -> tuple[np.ndarray, np.ndarray]:
            try:
                pixels = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
                labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            except (OSError, ValueError) as error:
                raise DataError(f"cannot read STL-10 {split} files in {folder} ({error}); replace them") from None
            if len(pixels) != len(labels):
                raise DataError(f"STL-10 {split} in {folder}: {len(pixels)} images but {len(labels)} labels; "
                                "replace the files")
            return pixels.transpose(0, 3, 2, 1), labels  # stored column-major

        names_file = folder / "class_names.txt"
        if not names_file.is_file():
            raise DataError(f"STL-10 in {folder} has no class_names.txt; replace the folder")
        names = tuple(names_file.read_text().split())
        (train_pixels, train_targets), (test_pixels, test_targets) = read("train"), read("test")
        for split, targets in (("train", train_targets), ("test", test_targets)):
            _check_label_range(targets, names, f"STL-10 {split}_y.bin (1-based on disk) in {folder}")
        return LabelledSplits(names, _array_split("train", train_pixels, train_targets),
                              _array_split("test", test_pixels, test_targets))
    if _has_image_folder(root):
        return _image_folder(root, "STL-10", STL10_CLASSES)
    raise _missing("STL-10", root, "stl10_binary/ (torchvision) or train/<class>/ and test/<class>/")


def _mnist_like(dataset_class: str, label: str, root: Path, download: bool) -> LabelledSplits:
    import torchvision.datasets

    from utils import to_numpy

    if _has_image_folder(root) and not (root / dataset_class).is_dir():
        return _image_folder(root, label, count=10)
    try:
        splits = [getattr(torchvision.datasets, dataset_class)(str(root), train=train, download=download)
                  for train in (True, False)]
    except RuntimeError:
        raise _missing(label, root, f"{dataset_class}/raw/ (torchvision) or train/<class>/ and test/<class>/") from None
    train, test = splits
    return LabelledSplits(tuple(train.classes), _array_split("train", to_numpy(train.data), to_numpy(train.targets)),
                          _array_split("test", to_numpy(test.data), to_numpy(test.targets)))


def digits() -> LabelledSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images), split in halves stratified by digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    train_index, test_index = train_test_split(np.arange(len(pixels)), test_size=0.5, stratify=bunch.target,
                                               random_state=DIGITS_SPLIT_SEED)
    ids = [f"digits/{i}" for i in range(len(pixels))]
    full = ImageList.create(ids, bunch.target, ArrayLoader(pixels))
    return LabelledSplits(tuple(str(d) for d in range(10)), full.subset(np.sort(train_index)),
                          full.subset(np.sort(test_index)))


def cats_vs_dogs(root: Path, test_fraction: float = 0.2) -> LabelledSplits:
    """A folder with one subfolder per class (Kaggle PetImages: Cat/, Dog/).

    With ``train/`` and ``test/`` subfolders these are used; otherwise each class's sorted files are
    shuffled with a fixed seed and the last 20 % are the test split (10,000 / 2,500 per class for the
    12,500-image Kaggle set, the PANDA / MSAD protocol).
    """
    competition = (root / "train").is_dir() and any(
        path.name.lower().startswith(("cat.", "dog.")) for path in _list_images(root / "train"))
    if competition:
        raise DataError(f"{root} is the Kaggle competition layout (train/cat.N.jpg, test1/), whose test images "
                        "have no labels; the protocol uses Microsoft's PetImages folder (Cat/, Dog/): point "
                        "--data_root at it")
    if _has_image_folder(root):
        return _image_folder(root)
    if not root.is_dir():
        raise DataError(f"Cats-vs-Dogs not found under '{root}': expected one subfolder per class (Cat/, Dog/); "
                        "set --data_root (or ANOMALY_DATA_ROOT) to the PetImages folder")
    classes = tuple(name for name in _class_folders(root) if not name.startswith((".", "__")))
    if len(classes) != 2:
        raise DataError(f"Cats-vs-Dogs under {root} needs exactly two class subfolders (Cat/, Dog/), found "
                        f"{', '.join(classes) or 'none'}")
    split_paths: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for index, name in enumerate(classes):
        listed = _list_images(root / name)
        files = [str(p) for p in listed if p.stat().st_size > 0]
        if len(files) < len(listed):  # PetImages ships empty files (Cat/666.jpg)
            print(f"note: {len(listed) - len(files)} empty file(s) in {root / name} left out")
        order = np.random.default_rng([0, index]).permutation(len(files))  # one class's split ignores the other
        n_test = int(round(len(files) * test_fraction))
        split_paths["test"] += [(files[i], index) for i in sorted(order[:n_test])]
        split_paths["train"] += [(files[i], index) for i in sorted(order[n_test:])]

    def image_list(pairs: list[tuple[str, int]]) -> ImageList:
        paths = [p for p, _ in pairs]
        return ImageList.create([os.path.relpath(p, root) for p in paths], [t for _, t in pairs], FileLoader(paths))

    return LabelledSplits(classes, image_list(split_paths["train"]), image_list(split_paths["test"]))


# ----------------------------------------------------------------------------- defect datasets


def _defect_task(name: str, root: Path, masks_required: bool, key_prefix: str) -> Task:
    """``root/train/good``, ``root/test/<defect>``, optional ``root/ground_truth/<defect>/<stem>_mask.png``."""
    train_folder = root / "train" / "good"
    if not train_folder.is_dir():
        categories = defect_categories(root)
        hint = (f"; {root} holds categories ({', '.join(categories[:5])}{' ...' if len(categories) > 5 else ''}): "
                "use --dataset mvtec (--classes picks them), or point --data_root at one of them") if categories else ""
        raise DataError(f"missing folder {train_folder}: expected {root}/train/good/ and {root}/test/<label>/{hint}")
    if not (root / "test").is_dir():
        raise DataError(f"missing folder {root / 'test'}: expected {root}/test/good/ and {root}/test/<defect>/")
    train_paths = [str(p) for p in _list_images(train_folder)]
    test_paths: list[str] = []
    labels: list[int] = []
    masks: list[str | None] = []
    missing_masks: list[str] = []
    has_ground_truth = (root / "ground_truth").is_dir()
    for defect in _class_folders(root / "test"):
        normal = defect.lower() == "good"  # test/Good too (a case-insensitive disk finds train/good in Train/Good)
        for path in _list_images(root / "test" / defect):
            test_paths.append(str(path))
            labels.append(int(not normal))
            mask = root / "ground_truth" / defect / f"{path.stem}_mask.png"
            if normal:
                masks.append(None)
            elif mask.is_file():
                masks.append(str(mask))
            else:
                masks.append(None)
                missing_masks.append(os.path.relpath(path, root))
    if not train_paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {train_folder}: put the normal training "
                        "images there")
    if not test_paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the subfolders of {root / 'test'}: put the "
                        "test images in test/good/ and test/<defect>/")
    if missing_masks and (masks_required or has_ground_truth):
        shown = ", ".join(missing_masks[:5]) + (" ..." if len(missing_masks) > 5 else "")
        first = root / "ground_truth" / Path(missing_masks[0]).parent.name
        present = sorted(p.name for p in first.iterdir())[:3] if first.is_dir() else []
        found = f"; {os.path.relpath(first, root)}/ holds {', '.join(present)}" if present else ""
        raise DataError(f"{len(missing_masks)} defective test image(s) of '{name}' have no mask "
                        f"ground_truth/<defect>/<name>_mask.png: {shown}{found} (a mask is named after its image, "
                        "e.g. 000.png -> 000_mask.png; without ground_truth/ the pixel metrics are left out)")
    for image_path, mask_path in zip(test_paths, masks):
        if mask_path is not None:
            _check_mask_size(mask_path, image_path)
    train = ImageList.create([os.path.relpath(p, root) for p in train_paths], [0] * len(train_paths),
                             FileLoader(train_paths))
    test = ImageList.create([os.path.relpath(p, root) for p in test_paths], labels, FileLoader(test_paths))
    with_masks = has_ground_truth or masks_required
    return Task(name, train, test, np.asarray(labels), tuple(masks) if with_masks else None,
                f"{key_prefix}train", f"{key_prefix}test")


def _check_mask_size(mask_path: str, image_path: str) -> None:
    """A mask must have its image's size (only the headers are read): one of another size is almost always
    the mask of another image, which a silent resize would turn into wrong pixel metrics."""
    sizes = []
    for kind, path in (("mask", mask_path), ("image", image_path)):
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"cannot read {kind} {path} ({error}); remove or replace the file") from None
    if sizes[0] != sizes[1]:
        raise DataError(f"mask {mask_path} is {sizes[0][0]}x{sizes[0][1]} px but its image {image_path} is "
                        f"{sizes[1][0]}x{sizes[1][1]} px; replace the mask with the one of that image")


def _is_defect_folder(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir()


def defect_categories(root: Path) -> list[str]:
    """The sorted subfolders of ``root`` that have ``train/good/`` (MVTec layout); [] if root is missing."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_defect_folder(p))


def mvtec_tasks(root: Path, names: list[str] | None) -> list[Task]:
    """One task per category folder ``root/<name>``; None = every subfolder with ``train/good/``.

    Names outside MVTec AD's 15 are accepted for folders in its layout (magnetic tile, MVTec-style
    exports of other data); a note says so, because a typo of a real category would otherwise only
    show up as a missing folder.
    """
    if names is None:
        names = defect_categories(root)
        if not names:
            raise DataError(f"no category folder with train/good/ under '{root}': expected "
                            f"{root}/<category>/train/good/ and {root}/<category>/test/<defect>/ (MVTec AD layout)")
    bad = [n for n in names if Path(n).name != n or n in (".", "..") or not _is_defect_folder(root / n)]
    if bad:
        present = defect_categories(root)
        raise DataError(f"category folder(s) {', '.join(str(root / n) for n in bad)} not found under '{root}' "
                        f"or without train/good/; categories present under '{root}': "
                        f"{', '.join(present) if present else 'none'} (pass --classes)")
    for name in names:
        if name not in MVTEC_CATEGORIES:
            print(f"note: '{name}' is not one of MVTec AD's 15 categories; read as an MVTec-layout folder")
    return [_defect_task(n, root / n, True, f"{n}/") for n in names]


# ----------------------------------------------------------------------------- prediction inputs


def list_image_files(pattern: str) -> list[Path]:
    """A directory: every image file under it, recursively; otherwise a glob pattern (``**`` recurses)."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        candidates = path.rglob("*")
    elif path.is_file():  # a file name may hold glob characters ('scan [2].png')
        candidates = iter([path])
    else:
        candidates = map(Path, glob.glob(str(path), recursive=True))
    files = sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found for '{pattern}': "
                        f"pass a folder or a glob pattern such as 'images/**/*.png'")
    return files


def image_list_from_files(paths: Sequence[Path]) -> ImageList:
    """Unlabelled images (targets 0) whose ids are their resolved paths."""
    resolved = [os.path.realpath(p) for p in paths]
    return ImageList.create(resolved, [0] * len(resolved), FileLoader(resolved))


# ----------------------------------------------------------------------------- protocol


def dataset_identity(config: Config) -> str:
    """A file-name-safe name of the data a run reads, for cache and results folder names.

    The dataset kind alone is not enough: two ``--dataset folder`` runs on different folders (or two
    MVTec copies at different resolutions) would share caches and results. The hash of the resolved
    root tells them apart, and makes a relative and an absolute path to one folder agree.
    """
    if config.dataset == "digits":
        return "digits"
    root = Path(config.resolved_data_root()).resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{config.dataset}-{root.name}-{digest}")


def held_out_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (fit, held-out) indices into ``count`` training images.

    Its own generator stream ([seed, 7919]), so asking for a held-out part does not change the
    other seeded draws (subsets, initialisation). At least one image is held out when fraction > 0
    (a tiny fraction would otherwise silently hold out none) and at least one is kept for the fit.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"held-out fraction must lie in [0, 1], got {fraction}")
    held = 0 if fraction == 0 or count < 2 else min(max(round(count * fraction), 1), count - 1)
    order = np.random.default_rng([seed, 7919]).permutation(count).astype(np.int64)
    return np.sort(order[held:]), np.sort(order[:held])


def _subset_indices(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if limit <= 0 or limit >= n else np.sort(rng.choice(n, size=limit, replace=False))


def _stratified_indices(targets: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """About ``limit`` indices, the same fraction of every target value."""
    if limit <= 0 or limit >= len(targets):
        return np.arange(len(targets))
    chosen = []
    values, counts = np.unique(targets, return_counts=True)
    quotas = np.floor(counts * limit / len(targets)).astype(int)
    quotas[np.argsort(-(counts * limit / len(targets) - quotas))[: limit - quotas.sum()]] += 1
    for value, quota in zip(values, quotas):
        members = np.flatnonzero(targets == value)
        chosen.append(rng.choice(members, size=quota, replace=False))
    return np.sort(np.concatenate(chosen))


def _one_class_tasks(splits: LabelledSplits, names: list[str] | None, config: Config, dataset: str) -> list[Task]:
    names = list(splits.classes) if names is None else names
    unknown = [n for n in names if n not in splits.classes]
    if unknown:
        raise DataError(f"unknown class {', '.join(unknown)} for {dataset}; valid: {', '.join(splits.classes)}")
    test = splits.test.subset(_stratified_indices(splits.test.targets, config.max_test,
                                                  np.random.default_rng(config.seed)))
    suffix = f"-n{config.max_test}-s{config.seed}" if config.max_test else ""
    tasks = []
    for name in names:
        index = splits.classes.index(name)
        members = np.flatnonzero(splits.train.targets == index)
        if len(members) == 0:
            raise DataError(f"class '{name}' of {dataset} has no training images")
        rng = np.random.default_rng([config.seed, index])
        train = splits.train.subset(members[_subset_indices(len(members), config.max_train_per_class, rng)])
        train_suffix = f"-n{config.max_train_per_class}-s{config.seed}" if config.max_train_per_class else ""
        tasks.append(Task(name, train, test, (test.targets != index).astype(np.int64), None,
                          f"train-{name}{train_suffix}", f"test{suffix}"))
    return tasks


def load_tasks(config: Config) -> list[Task]:
    """The tasks of ``config.dataset`` for ``config.classes``, with the quick-subset limits applied."""
    root = Path(config.resolved_data_root())
    names = config.class_list()
    dataset = config.dataset
    if dataset != "digits" and not config.resolved_data_root():
        raise DataError(f"dataset {dataset} needs --data_root (or the environment variable ANOMALY_DATA_ROOT)")
    if dataset != "digits" and not root.is_dir() and not config.download:
        raise DataError(f"data root '{root}' does not exist; pass --data_root with the {dataset} folder")
    if dataset == "mvtec":
        tasks = mvtec_tasks(root, names)
    elif dataset == "folder":
        name = root.resolve().name  # '.' names the current folder
        task = _defect_task(name, root, False, "")
        if names is not None and names != [name]:
            raise DataError(f"the folder dataset has one category, '{name}'; got --classes {config.classes}")
        tasks = [task]
    else:
        readers: dict[str, Callable[[], LabelledSplits]] = {
            "digits": digits,
            "cifar10": lambda: cifar10(root, config.download),
            "cifar100": lambda: cifar100(root, config.download),
            "stl10": lambda: stl10(root, config.download),
            "mnist": lambda: _mnist_like("MNIST", "MNIST", root, config.download),
            "fmnist": lambda: _mnist_like("FashionMNIST", "Fashion-MNIST", root, config.download),
            "catsvsdogs": lambda: cats_vs_dogs(root),
        }
        return _one_class_tasks(readers[dataset](), names, config, dataset)
    if config.max_train_per_class or config.max_test:
        tasks = [_limit_defect_task(t, config) for t in tasks]
    return tasks


def _limit_defect_task(task: Task, config: Config) -> Task:
    rng = np.random.default_rng(config.seed)
    train_index = _subset_indices(len(task.train), config.max_train_per_class, rng)
    test_index = _stratified_indices(task.test_labels, config.max_test, rng)
    masks = None if task.test_masks is None else tuple(task.test_masks[i] for i in test_index)
    tag = f"-n{config.max_train_per_class}-{config.max_test}-s{config.seed}"
    return Task(task.name, task.train.subset(train_index), task.test.subset(test_index),
                task.test_labels[test_index], masks, task.train_key + tag, task.test_key + tag)


def load_mask(path: str | None, size: tuple[int, int]) -> np.ndarray:
    """A binary mask resized (nearest) to ``size`` = (height, width); all zeros for None.

    Defective: a palette image's pixels of index > 0 (index 0 is the background in labelme / VOC label
    files); otherwise the gray level (RGB: luminance) above half the mask's brightest pixel, so that 0/255
    masks (MVTec AD), 0/1 masks and masks drawn in a colour all read alike. An all-black mask is empty.
    """
    if path is None:
        return np.zeros(size, dtype=bool)
    try:
        with Image.open(path) as image:
            palette = image.mode == "P"
            levels = np.asarray(image if palette else image.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"cannot read mask {path} ({error}); remove or replace the file") from None
    defective = levels > 0 if palette else levels > max(levels.max(), 1) / 2
    resized = Image.fromarray(defective.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(resized) > 0
