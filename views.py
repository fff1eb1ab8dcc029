"""Transformed views of an image: what the flows train on and what a test image's score averages over.

A view set is an ordered list of transforms of a uint8 image batch (B, 3, S, S); view 0 is always the
image itself, so ``--train_views 1 --test_views 1`` is the plain method, and the first K views of a set
do not depend on how many are taken (a cache of 8 views serves a run that asks for 4).

- ``rot90``: the 8 symmetries of the square: views 0-3 turn the image by 0, 90, 180 and 270 degrees
  (counter-clockwise), views 4-7 mirror it left-right first. Exact (no interpolation): a view's anomaly
  map turns back pixel for pixel.
- ``flip``: the image, mirrored left-right, mirrored top-bottom, both (4 views).
- ``rotate``: any angle, DifferNet's ``RandomRotation(180)``: view k >= 1 turns the image about its centre by
  the k-th angle of a fixed seeded sequence uniform in [-180, 180) (nearest neighbour, black corners). A
  map turns back by the opposite angle (bilinear), which is exact only up to interpolation.

The angles are fixed per view index (not drawn per image or per run), so that a cached view, a view
made by ``predict.py`` and a view made in another run are the same image.
"""

from __future__ import annotations

import torch
from torch import Tensor

VIEW_SETS = ("rot90", "flip", "rotate")
VIEW_COUNTS: dict[str, int | None] = {"rot90": 8, "flip": 4, "rotate": None}
"""How many distinct views each set has (None: any number)."""

ROTATION_SEED = 180
"""Seed of the ``rotate`` set's angle sequence: a constant of the set, so its views are the same everywhere."""


def check_views(view_set: str, count: int) -> None:
    """Raise ValueError when ``view_set`` has fewer than ``count`` distinct views."""
    if view_set not in VIEW_SETS:
        raise ValueError(f"unknown view set {view_set!r}; valid sets: {', '.join(VIEW_SETS)}")
    most = VIEW_COUNTS[view_set]
    if most is not None and count > most:
        raise ValueError(f"the {view_set} view set has {most} views, not {count}: ask for at most {most}, or use "
                         "--view_set rotate (any number of angles)")


def rotation_angles(count: int) -> Tensor:
    """The ``rotate`` set's angles in degrees (float64, counter-clockwise) of views 0 .. count-1; view 0 is 0."""
    generator = torch.Generator().manual_seed(ROTATION_SEED)
    drawn = torch.rand(max(count - 1, 0), generator=generator, dtype=torch.float64) * 360.0 - 180.0
    return torch.cat((torch.zeros(1, dtype=torch.float64), drawn))[:count]


def _dihedral(images: Tensor, view: int) -> Tensor:
    """View ``view`` (0-7) of the ``rot90`` set on the last two axes (H, W)."""
    mirrored = images.flip(-1) if view >= 4 else images
    return torch.rot90(mirrored, view % 4, dims=(-2, -1))


def _dihedral_inverse(maps: Tensor, view: int) -> Tensor:
    turned_back = torch.rot90(maps, -(view % 4), dims=(-2, -1))
    return turned_back.flip(-1) if view >= 4 else turned_back


def _flipped(images: Tensor, view: int) -> Tensor:
    """View ``view`` (0-3) of the ``flip`` set; each is its own inverse."""
    dims = [(), (-1,), (-2,), (-2, -1)][view]
    return images.flip(dims) if dims else images


def _rotated(images: Tensor, degrees: float, interpolation: str) -> Tensor:
    from torchvision.transforms.functional import InterpolationMode, rotate

    mode = InterpolationMode.NEAREST if interpolation == "nearest" else InterpolationMode.BILINEAR
    return rotate(images, degrees, interpolation=mode)


def view_of(images: Tensor, view_set: str, view: int) -> Tensor:
    """View ``view`` of a batch (..., H, W) (uint8 images (B, 3, S, S), or maps)."""
    if view == 0:
        return images
    if view_set == "rot90":
        return _dihedral(images, view)
    if view_set == "flip":
        return _flipped(images, view)
    return _rotated(images, float(rotation_angles(view + 1)[view]), "nearest")


def map_from_view(maps: Tensor, view_set: str, view: int) -> Tensor:
    """An anomaly map (B, S, S) of view ``view`` turned back onto the image (the inverse of :func:`view_of`)."""
    if view == 0:
        return maps
    if view_set == "rot90":
        return _dihedral_inverse(maps, view)
    if view_set == "flip":
        return _flipped(maps, view)
    angle = float(rotation_angles(view + 1)[view])
    return _rotated(maps.unsqueeze(1), -angle, "bilinear").squeeze(1)


def views_of(images: Tensor, view_set: str, count: int) -> list[Tensor]:
    """The first ``count`` views of a batch, each (B, 3, S, S)."""
    return [view_of(images, view_set, view) for view in range(count)]
