"""What views, scales and resolution cost: extraction seconds per image and cached bytes per image.

    python bench/views_cost.py --data_root DATA/magnetic_tile --images 32

For each setting the first ``--images`` training images are decoded and resized once per batch, then their
views go through the backbone (``FeatureExtractor.view_features``, the path the cache uses: one backbone
batch per view, no second pass over the images); decoding and backbone are timed apart. The first
setting (224 px, one scale, one view) is the reference of the ratio column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import make_config  # noqa: E402
from datasets import load_tasks  # noqa: E402
from extractor import FeatureExtractor, image_batches  # noqa: E402
from utils import configure_torch  # noqa: E402

SETTINGS = [(224, "1", 1), (224, "1,0.5,0.25", 1), (224, "1,0.5,0.25", 8), (320, "1,0.5,0.25", 8),
            (448, "1", 1), (448, "1,0.5,0.25", 1), (448, "1,0.5,0.25", 8)]
"""(img_size, scales, views) measured, the reference first."""


def measure(data_root: str, size: int, scales: str, views: int, count: int) -> dict[str, float]:
    config = make_config("mtd_lite0", method="sanf", data_root=data_root, img_size=size, scales=scales,
                         train_views=views, test_views=views, extract_batch_size=16)
    configure_torch(config)
    extractor = FeatureExtractor(config)
    images = load_tasks(config)[0].train.subset(np.arange(count))
    decode = backbone = 0.0
    started = time.perf_counter()
    for batch in image_batches(images, config):
        decode += time.perf_counter() - started
        started = time.perf_counter()
        features = extractor.view_features(batch, config.view_set, views)
        backbone += time.perf_counter() - started
        started = time.perf_counter()
    one_image = sum(value[0].numel() * 2 for value in features.values())  # float16 bytes, all its views
    return {"decode": decode / count, "backbone": backbone / count, "bytes": one_image,
            "dim": features["sem"].shape[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/views_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", required=True, help="the magnetic-tile folder (or another defect folder)")
    parser.add_argument("--images", type=int, default=32, help="training images timed per setting")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [(setting, measure(args.data_root, *setting, args.images)) for setting in SETTINGS]
    reference = rows[0][1]["decode"] + rows[0][1]["backbone"]
    print(f"{args.images} images per setting, {torch.get_num_threads()} torch threads\n")
    print("| img_size | scales | views | token dim | decode ms/img | backbone ms/img | vs reference | cached KB/img |")
    print("|---|---|---|---|---|---|---|---|")
    for (size, scales, views), m in rows:
        total = m["decode"] + m["backbone"]
        print(f"| {size} | {scales} | {views} | {m['dim']} | {1000 * m['decode']:.1f} | {1000 * m['backbone']:.1f} | "
              f"{total / reference:.2f}x | {m['bytes'] / 1024:.1f} |")


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
