"""Where the time of CFLOW-AD goes: one training epoch, and scoring new images (the predict path).

    python bench/profile_cflow.py --preset cflow_lite0 --data_root DATA/mvtec_ad_512 --classes bottle
    python bench/profile_cflow.py ... --fiber_batch 64 --lr 1e-4 --bench_images 48   # a part of the epoch

Runs one training epoch on the cached features of the category (the method's own settings unless
flags say otherwise) and then ``predict.predict`` over its test images, both under
``torch.profiler``, and sums the wall time of the ``record_function`` labels the code carries
(``train.*`` in train.py, ``predict.*`` in model.py / predict.py). What no label covers is listed as
"rest" (data loading: batch indexing for training; image decoding and resizing for predict). The
profiler's own overhead is the ratio of the profiled to an unprofiled run of the same work.
``--bench_images N`` trains the profiled epoch on the first N fit images only: the profiler keeps every
operator event in memory, and a whole epoch of 64-fiber steps outgrew 24 GB.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import predict  # noqa: E402
from bench.extract import pop_bench_images  # noqa: E402
from config import Config, parse_args  # noqa: E402
from datasets import held_out_split, load_tasks  # noqa: E402
from extractor import FeatureExtractor, task_features  # noqa: E402
from model import CFlowDetector, StageFeatures, load_detector  # noqa: E402
from train import train_cflow  # noqa: E402
from utils import configure_torch  # noqa: E402


def labelled_seconds(prof: profile, prefix: str) -> dict[str, float]:
    """Wall seconds per ``record_function`` label starting with ``prefix`` (nested calls counted once)."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith(prefix):
            totals[event.key] = event.cpu_time_total / 1e6
    return totals


def table(title: str, wall: float, parts: dict[str, float], overhead: float) -> str:
    rest = max(wall - sum(parts.values()), 0.0)
    lines = [f"**{title}**: {wall:.2f} s (profiler overhead x{overhead:.2f})", "",
             "| part | seconds | share |", "|---|---|---|"]
    for name, seconds in sorted(parts.items(), key=lambda item: -item[1]) + [("rest (data)", rest)]:
        lines.append(f"| {name} | {seconds:.2f} | {100 * seconds / wall:.1f}% |")
    return "\n".join(lines)


def one_epoch(config: Config, fit: StageFeatures) -> float:
    detector = CFlowDetector(config)
    detector.build(fit.stage_channels())
    started = time.perf_counter()
    train_cflow(detector.model, fit, None, dataclasses.replace(config, epochs=1), "profile")
    return time.perf_counter() - started


def main() -> None:
    argv = sys.argv[1:]
    images_profiled = pop_bench_images(argv, 0)
    config = dataclasses.replace(parse_args(argv), method="cflow")
    configure_torch(config)
    task = load_tasks(config)[0]
    extractor = FeatureExtractor(config)
    train_arrays, _ = task_features(extractor, task, config)
    fit_index, _ = held_out_split(len(task.train), config.val_fraction, config.seed)
    if images_profiled:
        fit_index = fit_index[:images_profiled]
    fit = StageFeatures.from_arrays({k: v[fit_index] for k, v in train_arrays.items()}, config.device)
    plain = one_epoch(config, fit)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = one_epoch(config, fit)
    print(table(f"One training epoch, {task.name} ({len(fit)} images), {config.fiber_batch} fibers per step", profiled,
                labelled_seconds(prof, "train."), profiled / plain))

    with tempfile.TemporaryDirectory() as folder:
        detector = CFlowDetector(dataclasses.replace(config, epochs=1), extractor)
        detector.fit(fit, None, "profile")
        detector.save(Path(folder) / "detector.pt")
        detector = load_detector(Path(folder) / "detector.pt", detector.config, extractor)
        images = [task.test.source(i) for i in range(len(task.test))]
        for overlays in (False, True):
            plain = predict.predict(detector, images, Path(folder) / "plain", config.test_batch_size, overlays)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                figures = predict.predict(detector, images, Path(folder) / "out", config.test_batch_size, overlays)
            print("\n" + table(f"predict.py on {figures['images']} test images ({figures['images_per_second']:.1f} "
                               f"images/s unprofiled: {plain['images_per_second']:.1f}), overlays "
                               f"{'on' if overlays else 'off'}", figures["seconds"], labelled_seconds(prof, "predict."),
                               figures["seconds"] / plain["seconds"]))
    print(f"\n{torch.get_num_threads()} CPU threads; {config.backbone} stages {','.join(extractor.layers)} at "
          f"{config.img_size} px.")


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
