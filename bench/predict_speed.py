"""Prediction throughput on the same images: our ``predict.predict`` against anomalib's ``Engine.predict``.

    python bench/predict_speed.py --preset cflow_lite0 --data_root MVTEC --classes bottle
    python bench/predict_speed.py --preset cflow_lite0 --data_root MVTEC --classes bottle --checkpoint RUN/checkpoints/bottle.pt
    python bench/predict_speed.py --preset cflow_lite0 --dataset folder --data_root DATA/magnetic_tile

The images are the test split of the one category (``--dataset mvtec`` with one ``--classes`` name, or a
``--dataset folder``). Settings are main.py's flags (``config.parse_args``) plus:

- ``--checkpoint PATH``: time this trained detector (its backbone, stages, size and flows are used on both
  sides). Without it, ours is trained here once for 1 epoch (``main.run`` on a temporary results folder, in
  a process of its own, so that the peak memory column is predict's alone; the number of epochs does not
  change the cost of scoring).
- ``--anomalib_epochs N``: epochs of anomalib training before timing (default 0: untrained; its scoring
  cost does not depend on the weights).
- ``--repeats N``: timed passes per row (default 3); the row is the pass with the median time, and the
  last column gives the range of images/s over the passes (anomalib's rate moves by up to a third between
  runs on the 2-core machine, so a single pass can decide a ratio).

Ours: ``predict.predict(detector, images, out, batch_size, overlays)``, as ``predict.py`` runs it: reads and
resizes the images, runs the frozen backbone, the flows and the maps, writes ``predictions.csv`` and a
float16 ``.npy`` map per image; timed once with overlays off and once with overlays on (a PNG per image),
reported apart. anomalib: a ``Cflow`` with the same backbone and weights (the packaged Lite0 file loaded into
its ``TimmFeatureExtractor``), stages, size and flows; ``Engine.predict`` over a DataLoader of anomalib's
``PredictDataset`` holding the same files, at the same batch size and loader workers, resized at the dataset
level as anomalib's datamodules do, post-processing and visualisation off, predictions kept in memory.
``Engine.predict`` rather than ``TorchInferencer``: it is anomalib's batched path (the inferencer scores one
image per call from an exported model, which would compare batch size 1 with ours at batch size N).

Each side runs in its own process (``peer_anomalib.in_child``) with the same torch thread count. Model
construction, the backbone's TorchScript trace (ours) and a warm-up pass over the first two batches (the
TorchScript profiling executor optimises on its second call) are left out of the timed passes on both sides.
Besides wall-clock images/s the table gives images per process CPU second (all threads); with other jobs on
the machine and more than one thread those include the OpenMP threads' spin-waiting (``--threads 1`` makes
them the work done).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peer_anomalib import (build_anomalib_cflow, category_of, dataset_label, in_child,  # noqa: E402
                                 require_anomalib)
from config import Config, describe, parse_args  # noqa: E402
from utils import peak_memory_gb  # noqa: E402

MODEL_FIELDS = ("backbone", "weights", "layers", "img_size", "condition_dims", "n_flow_layers", "clamp",
                "permute_soft", "map_norm", "method")


def test_images(config: Config) -> list[str]:
    """The resolved paths of the category's test images, in our order."""
    from datasets import load_tasks

    task = load_tasks(replace(config, classes=category_of(config)) if config.dataset == "mvtec" else config)[0]
    return [task.test.source(index) for index in range(len(task.test))]


def train_here(config: Config, folder: str) -> str:
    """Train ours for 1 epoch under ``folder`` (in its own process: its memory is not predict's); the checkpoint."""
    from main import results_folder, run
    from utils import configure_torch

    configure_torch(config)
    trained = replace(config, epochs=1, cache_dir=f"{folder}/cache", results_dir=f"{folder}/results", n_figure_images=0)
    run(trained)
    return str(results_folder(trained) / "checkpoints" / f"{category_of(config)}.pt")


def ours(config: Config, checkpoint: str, origin: str, repeats: int) -> dict[str, Any]:
    """Time predict.predict with the ``checkpoint``'s detector, overlays off and on."""
    import torch

    from model import load_detector
    from predict import predict
    from utils import configure_torch

    configure_torch(config)
    images = test_images(config)
    with tempfile.TemporaryDirectory() as folder:
        detector = load_detector(checkpoint, device=config.device, test_batch_size=config.test_batch_size,
                                 threads=config.threads, num_workers=config.num_workers)
        started = time.perf_counter()
        detector.extractor  # noqa: B018  (builds and traces the backbone, outside the timed passes)
        setup_seconds = time.perf_counter() - started
        batch = config.test_batch_size
        predict(detector, images[:2 * batch], Path(folder) / "warm-up", batch, overlays=False)
        plain = median_pass([timed(lambda: predict(detector, images, Path(folder) / f"plain-{index}", batch,
                                                   overlays=False)) for index in range(repeats)])
        drawn = median_pass([timed(lambda: predict(detector, images, Path(folder) / f"overlays-{index}", batch,
                                                   overlays=True)) for index in range(repeats)])
    return {"plain": plain, "overlays": drawn, "setup_seconds": setup_seconds, "origin": origin,
            "threads": torch.get_num_threads(), "peak_rss_gb": peak_memory_gb(), "stages": detector.extractor.layers}


def anomalib_side(config: Config, epochs: int, repeats: int) -> dict[str, Any]:
    """anomalib's Cflow (untrained, or ``epochs`` of Engine.fit) and Engine.predict over the same images."""
    import torch
    from anomalib.data import PredictDataset
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader
    from torchvision.transforms.v2 import Resize

    from bench.peer_anomalib import anomalib_datamodule
    from utils import keep_freed_memory

    keep_freed_memory()  # the allocator setting our side gets from configure_torch: the same for both sides
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    images = test_images(config)
    started = time.perf_counter()
    model = build_anomalib_cflow(config)
    setup_seconds = time.perf_counter() - started
    # the resize anomalib's datamodules add at the dataset level (so that images of any size batch together)
    dataset = PredictDataset(images[0], transform=Resize((config.img_size, config.img_size), antialias=True))
    dataset.image_filenames = [Path(path) for path in images]

    def loader(count: int) -> DataLoader:
        subset = dataset if count >= len(dataset) else torch.utils.data.Subset(dataset, range(count))
        return DataLoader(subset, batch_size=config.test_batch_size, num_workers=config.num_workers, shuffle=False,
                          collate_fn=dataset.collate_fn)

    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(max_epochs=max(epochs, 1), accelerator="cpu", devices=1, default_root_dir=folder,
                        logger=False, enable_progress_bar=False)
        if epochs:
            datamodule, _ = anomalib_datamodule(replace(config, epochs=epochs))
            engine.fit(model=model, datamodule=datamodule)
        engine.predict(model=model, dataloaders=loader(2 * config.test_batch_size), return_predictions=True)  # warm-up
        passes = []
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            batches = engine.predict(model=model, dataloaders=loader(len(dataset)), return_predictions=True)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            count = sum(len(batch.image_path) for batch in batches)
            if count != len(images) or any(batch.anomaly_map is None for batch in batches):
                raise RuntimeError(f"anomalib returned {count} predictions (with maps?) for {len(images)} images")
            passes.append({"images": count, "seconds": seconds, "images_per_second": count / seconds,
                           "cpu_seconds": cpu_seconds})
    return {"plain": median_pass(passes),
            "setup_seconds": setup_seconds, "origin": f"trained for {epochs} epoch(s)" if epochs else "untrained",
            "threads": torch.get_num_threads(), "peak_rss_gb": peak_memory_gb()}


def timed(call: Any) -> dict[str, Any]:
    """``call()``'s figures (predict.predict's dict) with the wall and process CPU seconds (all its threads) of
    the whole call: listing the images and writing predictions.csv included, as anomalib's timer includes
    all of ``Engine.predict``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    figures = call()
    seconds = time.perf_counter() - started
    return {**figures, "seconds": seconds, "images_per_second": figures["images"] / seconds,
            "cpu_seconds": time.process_time() - cpu_started}


def median_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """The pass with the median wall time (the lower middle one for an even count), with the range of
    images/s over all passes."""
    ordered = sorted(passes, key=lambda figures: figures["seconds"])
    rates = [figures["images_per_second"] for figures in passes]
    return {**ordered[(len(ordered) - 1) // 2], "rate_range": (min(rates), max(rates)), "passes": len(passes)}


def table(peer: dict[str, Any], mine: dict[str, Any]) -> str:
    """Wall-clock throughput and, less sensitive to other jobs on the machine, images per CPU second."""
    reference = peer["plain"]
    rows = [("anomalib Cflow, Engine.predict (predictions in memory)", peer["plain"], peer),
            ("ours, predict.predict, overlays off (csv + .npy maps)", mine["plain"], mine),
            ("ours, predict.predict, overlays on (csv + .npy maps + PNG overlays)", mine["overlays"], mine)]
    lines = ["| side | images | seconds | images / s | ratio ours / anomalib | CPU seconds | images / CPU s | "
             "ratio ours / anomalib (CPU) | peak memory (GB) | images / s, all passes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, figures, side in rows:
        per_cpu = figures["images"] / figures["cpu_seconds"]
        lines.append(f"| {label} | {figures['images']} | {figures['seconds']:.2f} | {figures['images_per_second']:.1f} | "
                     f"{figures['images_per_second'] / reference['images_per_second']:.2f} | "
                     f"{figures['cpu_seconds']:.1f} | {per_cpu:.2f} | "
                     f"{per_cpu / (reference['images'] / reference['cpu_seconds']):.2f} | {side['peak_rss_gb']:.2f} | "
                     f"{figures['rate_range'][0]:.1f}-{figures['rate_range'][1]:.1f} ({figures['passes']}) |")
    return "\n".join(lines)


def header(config: Config, images: int, peer: dict[str, Any], mine: dict[str, Any]) -> str:
    return (f"Prediction on {dataset_label(config)}: its {images} test images. {config.backbone} stages "
            f"{','.join(mine['stages'])} at {config.img_size} px, {config.n_flow_layers} coupling blocks per stage, batch size "
            f"{config.test_batch_size}, {config.num_workers} loader workers, device {config.device}; torch threads: "
            f"anomalib {peer['threads']}, ours {mine['threads']}. Ours: {mine['origin']}, map_norm {config.map_norm}. "
            f"anomalib: {peer['origin']}, post-processing and visualiser off. Untimed setup (model, weights, "
            f"trace): anomalib {peer['setup_seconds']:.1f} s, ours {mine['setup_seconds']:.1f} s; two warm-up batches "
            f"before the timed passes; each row is the pass with the median time. images / s is wall clock; "
            f"images / CPU s counts the process's CPU seconds "
            f"(all threads; with other jobs on the machine and more than one thread they include spin-waiting).")


def parse(argv: list[str]) -> tuple[Config, str | None, int, int]:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--checkpoint", default=None)
    extra.add_argument("--anomalib_epochs", type=int, default=0)
    extra.add_argument("--repeats", type=int, default=3)
    known, rest = extra.parse_known_args(argv)
    if known.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    config = parse_args(rest, prog="predict_speed.py")
    if known.checkpoint:  # the model settings are the checkpoint's; data and run settings the command line's
        from model import load_detector

        trained = load_detector(known.checkpoint).config
        config = replace(config, **{name: getattr(trained, name) for name in MODEL_FIELDS})
    return config, known.checkpoint, known.anomalib_epochs, known.repeats


def main() -> None:
    import torch

    config, checkpoint, anomalib_epochs, repeats = parse(sys.argv[1:])
    if config.method != "cflow":
        raise SystemExit("error: give a CFLOW preset (e.g. --preset cflow_lite0) or a CFLOW --checkpoint")
    if config.dataset not in ("mvtec", "folder") or (config.dataset == "mvtec" and len(config.class_list() or []) != 1):
        raise SystemExit("error: --dataset mvtec with one --classes category, or --dataset folder")
    require_anomalib()
    config = replace(config, threads=config.threads or torch.get_num_threads())  # the same count on both sides
    print(describe(config))
    images = len(test_images(config))
    with tempfile.TemporaryDirectory() as folder:
        origin = f"checkpoint {checkpoint}" if checkpoint else "trained for 1 epoch in a process of its own"
        checkpoint = checkpoint or in_child(train_here, config, folder)
        peer = in_child(anomalib_side, config, anomalib_epochs, repeats)
        mine = in_child(ours, config, checkpoint, origin, repeats)
    print(f"\n{header(config, images, peer, mine)}\n\n{table(peer, mine)}\n")


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
