"""Extraction at scale: the extractor's rate on 1,000 images against the whole protocol, and where the
kernel time goes.

    python bench/extract_scale.py --preset sanf_cifar10_lite0 --data_root DATA/cifar10            # 1,000 images
    python bench/extract_scale.py --preset sanf_cifar10_lite0 --data_root DATA/cifar10 --full     # + all 60,000

Each row runs ``extractor.py``'s path (decoding, resizing, forward, pooling, float16 write) into an empty
cache in a fresh process (``spawn``: its allocator and page cache state are its own), one row after the
other: the first ``--bench_images`` test images with glibc malloc's defaults, the same images with
``utils.keep_freed_memory`` (what every entry point now calls), and with ``--full`` every image of the
protocol with it. Besides images/s the table gives minor page faults per image and the kernel's share of
the process CPU time (``getrusage``), and the cache bytes per image. Prints a markdown table.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract import pop_bench_images  # noqa: E402
from config import parse_args  # noqa: E402
from datasets import load_tasks  # noqa: E402
from extractor import FeatureExtractor, cached_features, folder_bytes, task_features  # noqa: E402
from utils import keep_freed_memory, seed_everything  # noqa: E402


def extract(argv: list[str], count: int, keep_freed: bool) -> dict[str, Any]:
    """Extract ``count`` test images (0: the whole protocol) into a scratch cache; rate, faults, kernel share."""
    if keep_freed:
        keep_freed_memory()
    config = parse_args(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    tasks = load_tasks(config)
    extractor = FeatureExtractor(config)
    with tempfile.TemporaryDirectory() as folder:
        scratch = replace(config, cache_dir=folder)
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if count:
            images = tasks[0].test.subset(np.arange(min(count, len(tasks[0].test))))
            cached_features(extractor, images, "bench", scratch, desc=f"{len(images)} images")
            n_images = len(images)
        else:
            for task in tasks:
                task_features(extractor, task, scratch)
            n_images = sum(len(t.train) for t in tasks) + len(tasks[0].test)
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        cache_bytes = folder_bytes(Path(folder))
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"images": n_images, "seconds": seconds, "rate": n_images / seconds,
            "faults": (after.ru_minflt - before.ru_minflt) / n_images, "kernel": system / max(user + system, 1e-9),
            "bytes": cache_bytes / n_images, "peak_gb": after.ru_maxrss / 1e6}


def in_child(*args: Any) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(extract, args)


def main() -> None:
    argv = sys.argv[1:]
    full = "--full" in argv
    argv = [a for a in argv if a != "--full"]
    count = pop_bench_images(argv, 1000)
    config = parse_args(argv)
    runs = [(f"{count:,} test images, glibc defaults", in_child(argv, count, False)),
            (f"{count:,} test images, freed memory kept", in_child(argv, count, True))]
    if full:
        runs.append(("whole protocol, freed memory kept", in_child(argv, 0, True)))
    reference = runs[1][1]["rate"]
    print(f"\n{config.dataset}, {config.backbone} at {config.img_size} px, batch {config.extract_batch_size}, "
          f"{config.threads or torch.get_num_threads()} threads, {config.num_workers} loader workers\n")
    print("| run | images | seconds | images / s | vs 1,000 kept | minor faults / image | kernel share of CPU | "
          "cache bytes / image | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, run in runs:
        print(f"| {label} | {run['images']:,} | {run['seconds']:.1f} | {run['rate']:.1f} | "
              f"{run['rate'] / reference:.2f} | "
              f"{run['faults']:,.0f} | {run['kernel']:.1%} | {run['bytes']:,.0f} | {run['peak_gb']:.2f} |")


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
