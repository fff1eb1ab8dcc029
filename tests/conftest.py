"""Shared fixtures: the repository root on sys.path and the real-data locations from the environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def untimed_curve(curve: list[dict]) -> list[dict]:
    """A training curve without its per-part seconds: what two seeded runs must share exactly."""
    return [{key: value for key, value in record.items() if key != "seconds"} for record in curve]


def not_below_baseline(method_auroc: float, baseline_auroc: float, labels) -> bool:
    """``method_auroc`` >= ``baseline_auroc`` - 2 standard errors (Hanley-McNeil, at the method's AUROC, for the
    test split's numbers of anomalous and normal images): what a method that starts from the baseline or
    should beat it must reach on the same split, whatever the last run measured."""
    from anomaly_map import auroc_standard_error

    positives = int(sum(labels))
    error = auroc_standard_error(method_auroc, positives, len(labels) - positives)
    return method_auroc >= baseline_auroc - 2 * error


def kept_the_best_measurement(metrics: dict) -> bool:
    """The kept epoch is the (first) measurement of lowest held-out NLL in the run's curve, epoch 0 included."""
    measured = [(record["held_out_nll"], index) for index, record in enumerate(metrics["curve"])
                if "held_out_nll" in record]
    return metrics["curve"][min(measured)[1]]["epoch"] == metrics["kept_epoch"]


def _data_folder(variable: str, marker: str) -> Path:
    value = os.environ.get(variable, "")
    if not value:
        pytest.skip(f"{variable} is not set (.ci/run sets it when ../shared/data exists)")
    folder = Path(value)
    if not (folder / marker).exists():
        pytest.skip(f"{variable}={value} has no {marker}")
    return folder


@pytest.fixture
def cifar10_root() -> Path:
    """The CIFAR-10 ImageFolder copy (train/<class>/, test/<class>/)."""
    return _data_folder("ANOMALY_CIFAR10_ROOT", "test/airplane")


@pytest.fixture
def mvtec_root() -> Path:
    """An MVTec AD folder holding at least the bottle category."""
    return _data_folder("ANOMALY_MVTEC_ROOT", "bottle/train/good")


@pytest.fixture
def vit_weights() -> Path:
    """The DINOv2-architecture ViT-S/14 state dict (float16) of ../shared/weights."""
    value = os.environ.get("ANOMALY_VIT_WEIGHTS", "")
    if not value:
        pytest.skip("ANOMALY_VIT_WEIGHTS is not set (.ci/run sets it when ../shared/weights holds "
                    "vit_small_patch14_dinov2.fp16.pth)")
    if not Path(value).is_file():
        pytest.skip(f"ANOMALY_VIT_WEIGHTS={value} is not a file")
    return Path(value)


@pytest.fixture
def magnetic_tile_root() -> Path:
    """The magnetic tile category folder in MVTec layout (train/good/, test/<defect>/, ground_truth/)."""
    return _data_folder("ANOMALY_MAGNETIC_TILE_ROOT", "train/good")
