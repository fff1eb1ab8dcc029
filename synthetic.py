"""Synthetic defects made from normal images, with their masks.

CFLOW's image score and stage aggregation are chosen on held-out normal *training* images and
defective copies of them (``anomaly_map.select_scoring``), never on a test split. The copies
follow the self-supervised defect literature (CutPaste, Li et al. 2021; DRAEM, Zavrtanik et al.
2021), kept simple and seeded:

- ``cutpaste``: a rectangle cut from another normal image, brightness-jittered, pasted elsewhere;
- ``scar``: a thin rotated bar of a colour far from the local mean (cracks, scratches);
- ``noise``: Gaussian noise inside an ellipse (rough or contaminated surface);
- ``blur``: an ellipse replaced by its blurred version (worn or smeared surface);
- ``stain``: a large, soft-edged ellipse made brighter or darker (stains, uneven colour or
  finish), 4 to 16 times the area of the other kinds.

Defect areas are log-uniform between ``min_area`` and ``max_area`` of the image, so small and
large defects are both represented. A mask holds only the pixels that changed visibly (by at least
``VISIBLE`` grey levels in some channel): a blur of a flat region or a patch pasted onto its
look-alike changes nothing one could see, so it is made again as ``noise``, which always shows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor

from utils import to_numpy

DEFECT_KINDS = ("cutpaste", "scar", "noise", "blur", "stain")
VISIBLE = 8


def _area_side(rng: np.random.Generator, size: int, min_area: float, max_area: float) -> float:
    """Side (pixels) of a square with a log-uniform area fraction."""
    area = math.exp(rng.uniform(math.log(min_area), math.log(max_area)))
    return math.sqrt(area) * size


def _ellipse_mask(rng: np.random.Generator, size: int, side: float) -> np.ndarray:
    aspect = rng.uniform(0.5, 2.0)
    half_w, half_h = side * math.sqrt(aspect) / 2, side / math.sqrt(aspect) / 2
    cx, cy = rng.uniform(half_w, size - half_w), rng.uniform(half_h, size - half_h)
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=255)
    return np.asarray(canvas) > 0


def _cutpaste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    aspect = rng.uniform(0.3, 3.3)
    width = int(np.clip(round(side * math.sqrt(aspect)), 2, size - 1))
    height = int(np.clip(round(side / math.sqrt(aspect)), 2, size - 1))
    sy, sx = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    ty, tx = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    patch = donor[sy:sy + height, sx:sx + width].astype(np.float32) * rng.uniform(0.6, 1.4)
    defective = image.copy()
    defective[ty:ty + height, tx:tx + width] = np.clip(patch, 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    mask[ty:ty + height, tx:tx + width] = True
    return defective, mask


def _scar(image: np.ndarray, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    thickness = max(2.0, rng.uniform(0.01, 0.03) * size)
    length = min(max(side * side / thickness, 4 * thickness), 0.6 * size)
    angle = rng.uniform(0, math.pi)
    cx, cy = rng.uniform(0.2 * size, 0.8 * size, size=2)
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    nx, ny = -math.sin(angle) * thickness / 2, math.cos(angle) * thickness / 2
    corners = [(cx - dx + nx, cy - dy + ny), (cx + dx + nx, cy + dy + ny), (cx + dx - nx, cy + dy - ny),
               (cx - dx - nx, cy - dy - ny)]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(corners, fill=255)
    mask = np.asarray(canvas) > 0
    local_mean = image[mask].mean(axis=0) if mask.any() else image.reshape(-1, 3).mean(axis=0)
    shift = rng.uniform(60, 120) * rng.choice([-1.0, 1.0])
    colour = np.clip(local_mean + shift, 0, 255)
    if abs(colour.mean() - local_mean.mean()) < 40:  # clipped to the near side: go the other way
        colour = np.clip(local_mean - shift, 0, 255)
    defective = image.copy()
    defective[mask] = colour.astype(np.uint8)
    return defective, mask


def _noise(image: np.ndarray, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse_mask(rng, image.shape[0], side)
    noisy = image.astype(np.float32) + rng.normal(0, rng.uniform(25, 50), image.shape).astype(np.float32)
    defective = image.copy()
    defective[mask] = np.clip(noisy[mask], 0, 255).astype(np.uint8)
    return defective, mask


def _blur(image: np.ndarray, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse_mask(rng, image.shape[0], side)
    radius = rng.uniform(0.01, 0.025) * image.shape[0]
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    defective = image.copy()
    defective[mask] = blurred[mask]
    return defective, mask


def _visible(image: np.ndarray, copy: np.ndarray) -> np.ndarray:
    return (np.abs(copy.astype(np.int16) - image.astype(np.int16)) >= VISIBLE).any(axis=-1)


def _stain(image: np.ndarray, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    region = _ellipse_mask(rng, size, min(side * rng.uniform(2.0, 4.0), 0.9 * size))
    softness = Image.fromarray((region * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(side / 4))
    weight = np.asarray(softness, dtype=np.float32)[..., None] / 255.0
    gain = 1.0 + rng.uniform(0.15, 0.35) * rng.choice([-1.0, 1.0])
    defective = np.clip(image.astype(np.float32) * (1.0 + (gain - 1.0) * weight), 0, 255).astype(np.uint8)
    return defective, region | (weight[..., 0] > 0.05)


def _visible_noise(image: np.ndarray, rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    copy, region = _noise(image, rng, side)
    return copy, _visible(image, copy) & region


_LOCAL_DEFECTS = {"scar": _scar, "blur": _blur, "stain": _stain}
"""The kinds made from the image alone (``cutpaste`` also takes a donor image; ``noise`` always shows)."""


def synthetic_defects(images: Tensor, seed: int, kinds: tuple[str, ...] = DEFECT_KINDS, min_area: float = 0.001,
                      max_area: float = 0.04) -> tuple[Tensor, Tensor]:
    """One defective copy of every image, the kinds taking turns.

    Args:
        images: uint8 (N, 3, S, S) normal images, N >= 2 (``cutpaste`` takes its patch from the next image).
        seed: the copies are a function of the images and the seed.
        kinds: defect kinds, from ``DEFECT_KINDS``.
        min_area, max_area: range of the defect area as a fraction of the image (log-uniform).

    Returns:
        uint8 (N, 3, S, S) defective images and bool (N, S, S) masks (True = defect).
    """
    unknown = set(kinds) - set(DEFECT_KINDS)
    if unknown or not kinds:
        raise ValueError(f"defect kinds must be among {DEFECT_KINDS}, got {kinds}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) < 2:
        raise ValueError(f"expected at least 2 uint8 images (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    rng = np.random.default_rng(seed)
    pixels = to_numpy(images.permute(0, 2, 3, 1))
    size = pixels.shape[1]
    defective, masks = [], []
    for index, image in enumerate(pixels):
        kind = kinds[index % len(kinds)]
        side = _area_side(rng, size, min_area, max_area)
        if kind == "noise":
            copy, mask = _visible_noise(image, rng, side)
        else:
            copy, region = (_cutpaste(image, pixels[(index + 1) % len(pixels)], rng, side) if kind == "cutpaste"
                            else _LOCAL_DEFECTS[kind](image, rng, side))
            mask = _visible(image, copy) & region
            if mask.sum() < 0.1 * region.sum():  # next to nothing one could see: noise instead
                copy, mask = _visible_noise(image, rng, side)
        defective.append(copy)
        masks.append(mask)
    return (torch.from_numpy(np.stack(defective)).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(np.stack(masks)))
