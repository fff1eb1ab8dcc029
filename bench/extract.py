"""Extraction throughput and cache size, against the bare backbone and the public SANF-AD layout.

    python bench/extract.py --preset sanf_cifar10_lite0 --data_root DATA [--bench_images 2000]

Measures, in one process on the same images: (1) the bare backbone forward pass (eager timm
``forward_features``) on tensors already decoded, resized and normalised; (2) ``extractor.py``'s
whole path into a fresh cache (decoding, resizing, forward, pooling, float16 write). Then the cache
bytes per image of the full protocol against the public SANF-AD code's layout (65 tokens x 768 x
float32 per image, the test split saved once per normal class). Prints a markdown table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import parse_args  # noqa: E402
from datasets import load_tasks  # noqa: E402
from extractor import FeatureExtractor, cached_features, folder_bytes, image_batches  # noqa: E402

PUBLIC_BYTES_PER_IMAGE = 65 * 768 * 4


def bare_forward_rate(extractor: FeatureExtractor, batches: list[torch.Tensor]) -> float:
    """Images per second of the eager backbone alone on prepared tensors."""
    backbone = extractor.head.backbone
    pixels = [extractor.normalise(batch) for batch in batches]
    with torch.no_grad():
        backbone.forward_features(pixels[0])
        started = time.perf_counter()
        for batch in pixels:
            backbone.forward_features(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def pop_bench_images(argv: list[str], default: int) -> int:
    """Take ``--bench_images N`` out of ``argv`` (main.py's parser does not know it); N, else ``default``."""
    if "--bench_images" not in argv:
        return default
    position = argv.index("--bench_images")
    count = int(argv.pop(position + 1))
    argv.pop(position)
    return count


def main() -> None:
    argv = sys.argv[1:]
    count = pop_bench_images(argv, 2000)
    config = parse_args(argv)
    tasks = load_tasks(config)
    images = tasks[0].test.subset(np.arange(min(count, len(tasks[0].test))))
    extractor = FeatureExtractor(config)
    batches = list(image_batches(images, config))
    bare = bare_forward_rate(extractor, batches)
    with tempfile.TemporaryDirectory() as folder:
        scratch = replace(config, cache_dir=folder)
        started = time.perf_counter()
        cached_features(extractor, images, "bench", scratch, desc="extractor.py path")
        ours = len(images) / (time.perf_counter() - started)
        bytes_per_image = folder_bytes(Path(folder)) / len(images)
    n_train = sum(len(t.train) for t in tasks)
    n_test = len(tasks[0].test)
    ours_total = (n_train + n_test) * bytes_per_image
    public_total = (n_train + n_test * len(tasks)) * PUBLIC_BYTES_PER_IMAGE
    print(f"\n{config.dataset}, {config.backbone} at {config.img_size} px, patch grid {config.patch_grid}, "
          f"{len(images)} images, batch {config.extract_batch_size}, {torch.get_num_threads()} threads\n")
    print("| measure | bare backbone / public layout | extractor.py | ratio |")
    print("|---|---|---|---|")
    print(f"| images per second | {bare:.1f} | {ours:.1f} | {ours / bare:.2f} |")
    print(f"| cache bytes per image | {PUBLIC_BYTES_PER_IMAGE:,} | {bytes_per_image:,.0f} | "
          f"{bytes_per_image / PUBLIC_BYTES_PER_IMAGE:.3f} |")
    print(f"| cache for the protocol ({n_train} train + {n_test} test, {len(tasks)} classes) | "
          f"{public_total / 1e9:.2f} GB | {ours_total / 1e9:.2f} GB | {ours_total / public_total:.3f} |")


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
