"""Our CFLOW-AD against anomalib's own ``Cflow`` on one MVTec AD category, side by side.

    pip install anomalib        # only for this benchmark (a virtual environment with --system-site-packages
                                # and a constraint torch==2.14.1 keeps the project's torch)
    python bench/peer_anomalib.py --preset cflow_lite0 --data_root MVTEC --classes bottle --epochs 1

Both sides use the same backbone and weights (the packaged EfficientNet-Lite0 file is loaded into
anomalib's ``TimmFeatureExtractor``), the same stages, the same input normalisation (the backbone's
mean/std), the same image size and the same number of epochs; each side keeps its own optimiser setting
(anomalib: its defaults, 64 fibers per step at lr 1e-4; ours: the preset's); each side runs in its own process so
that its peak memory (max RSS) is its own. Every metric of both sides is computed by this
repository's ``metrics.py`` from the anomaly maps and scores each side returns, against the masks
resized (nearest) to the image size, so that the numbers differ only by the models. anomalib's
epoch time counts its training epoch only (its per-epoch validation on the test set excluded) and,
like ours with ``cache=false``, includes decoding the images with ``num_workers`` loader workers.
Ours runs twice: with the feature cache (the default workflow; the one-time extraction is reported
apart) and with ``cache=false`` (the backbone on every batch, like anomalib).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, describe, parse_args  # noqa: E402

ANOMALIB_FIBER_BATCH, ANOMALIB_LR = 64, 1e-4  # anomalib Cflow's defaults: its own optimiser setting
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def ours(config: Config) -> dict[str, Any]:
    """Our main.py job on one category; metrics, seconds per epoch, test images/s, peak memory."""
    from main import run

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        payload = run(replace(config, cache_dir=f"{folder}/cache", results_dir=f"{folder}/results",
                              n_figure_images=0))
        total = time.perf_counter() - started
    metrics = next(iter(payload["per_class"].values()))
    return {**{k: metrics[k] for k in METRICS}, "seconds_per_epoch": metrics["seconds_per_epoch"],
            "feature_seconds": metrics["feature_seconds"], "test_images_per_second": metrics["n_test"] / metrics["score_seconds"],
            "total_seconds": total, "peak_rss_gb": _peak_rss_gb()}


def anomalib_cflow(config: Config) -> dict[str, Any]:
    """anomalib's Cflow (Engine.fit for config.epochs epochs, then Engine.predict on the test split)."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Cflow
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch.callbacks import Callback
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from datasets import load_mask, load_tasks
    from extractor import FeatureExtractor
    from metrics import detection_and_localization

    torch.manual_seed(config.seed)
    reference = FeatureExtractor(config)  # our extractor, for the backbone's own pixel normalisation
    transform = Compose([Resize((config.img_size, config.img_size), antialias=True),
                         Normalize(mean=(reference.mean / 255).flatten().tolist(),
                                   std=(reference.std / 255).flatten().tolist())])
    model = Cflow(backbone=config.backbone.split(".")[0], layers=config.layer_list(), pre_trained=False,
                  fiber_batch_size=ANOMALIB_FIBER_BATCH, condition_vector=config.condition_dims,
                  coupling_blocks=config.n_flow_layers, clamp_alpha=config.clamp, permute_soft=config.permute_soft,
                  lr=ANOMALIB_LR, pre_processor=PreProcessor(transform=transform), post_processor=False,
                  evaluator=False, visualizer=False)
    weights = reference.head.backbone.state_dict()  # the weights our extractor loaded (packaged file or --weights)
    missing = model.model.encoder.feature_extractor.load_state_dict(weights, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"anomalib's extractor lacks weights for {missing[:5]}")

    class EpochTimer(Callback):
        """Seconds of each training epoch without anomalib's validation on the test split, which
        Lightning runs before ``on_train_epoch_end``."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, *_: Any) -> None:
            self.started, self.validation = time.perf_counter(), 0.0

        def on_validation_epoch_start(self, *_: Any) -> None:
            self.validation_started = time.perf_counter()

        def on_validation_epoch_end(self, *_: Any) -> None:
            self.validation += time.perf_counter() - self.validation_started

        def on_train_epoch_end(self, *_: Any) -> None:
            self.seconds.append(time.perf_counter() - self.started - self.validation)

    timer = EpochTimer()
    category = config.class_list()[0]
    datamodule = MVTecAD(root=config.resolved_data_root(), category=category, train_batch_size=config.batch_size,
                         eval_batch_size=config.test_batch_size, num_workers=config.num_workers, seed=config.seed)
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(max_epochs=config.epochs, accelerator="cpu", devices=1, default_root_dir=folder,
                        logger=False, callbacks=[timer], enable_progress_bar=True)
        started = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        batches = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
        predict_seconds = time.perf_counter() - started

    task = load_tasks(replace(config, classes=category))[0]
    position = {str(Path(name).relative_to("test")): index for index, name in enumerate(task.test.ids)}
    size = (config.img_size, config.img_size)
    scores, maps = np.zeros(len(task.test)), np.zeros((len(task.test), *size), dtype=np.float32)
    for batch in batches:
        raw_maps = batch.anomaly_map.reshape(len(batch.image_path), 1, *batch.anomaly_map.shape[-2:]).float()
        anomaly_maps = torch.nn.functional.interpolate(raw_maps, size=size, mode="bilinear", align_corners=False)[:, 0]
        for path, score, anomaly_map in zip(batch.image_path, batch.pred_score.flatten(), anomaly_maps):
            index = position[f"{Path(path).parent.name}/{Path(path).name}"]
            scores[index], maps[index] = float(score), anomaly_map.numpy()
    masks = np.stack([load_mask(path, size) for path in task.test_masks])
    metrics = detection_and_localization(task.test_labels, scores, masks, maps)
    return {**{k: metrics[k] for k in METRICS}, "seconds_per_epoch": float(np.mean(timer.seconds)),
            "fit_seconds": fit_seconds, "test_images_per_second": len(task.test) / predict_seconds,
            "peak_rss_gb": _peak_rss_gb()}


def in_child(function: Any, config: Config) -> dict[str, Any]:
    """``function(config)`` in a fresh process, so that peak memory and threads are its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, (config,))


def table(config: Config, peer: dict[str, Any], cached: dict[str, Any], on_the_fly: dict[str, Any]) -> str:
    rows = [("Image AUROC", "image_auroc", "{:.4f}"), ("Pixel AUROC", "pixel_auroc", "{:.4f}"),
            ("AUPRO@0.3", "aupro", "{:.4f}"), ("Image F1-max", "image_f1", "{:.4f}"),
            ("Pixel F1-max", "pixel_f1", "{:.4f}"), ("Train seconds / epoch", "seconds_per_epoch", "{:.2f}"),
            ("Test images / s", "test_images_per_second", "{:.1f}"), ("Peak memory (GB, max RSS)", "peak_rss_gb", "{:.2f}")]
    lines = ["| measure | anomalib Cflow | ours (cache) | ours (cache=false) | ours (cache) / anomalib | "
             "ours (cache=false) / anomalib |", "|---|---|---|---|---|---|"]
    for label, key, style in rows:
        lines.append(f"| {label} | {style.format(peer[key])} | {style.format(cached[key])} | "
                     f"{style.format(on_the_fly[key])} | {cached[key] / peer[key]:.2f} | "
                     f"{on_the_fly[key] / peer[key]:.2f} |")
    lines.append(f"| One-time feature extraction (s) | - | {cached['feature_seconds']:.1f} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    config = parse_args(sys.argv[1:])
    if config.method != "cflow" or len(config.class_list() or []) != 1:
        raise SystemExit("error: give a CFLOW preset (e.g. --preset cflow_lite0) and one --classes category")
    print(describe(config))
    peer = in_child(anomalib_cflow, config)
    cached = in_child(ours, config)
    on_the_fly = in_child(ours, replace(config, cache=False))
    import torch

    header = (f"MVTec AD {config.classes} ({config.resolved_data_root()}), {config.backbone} stages {config.layers} at "
              f"{config.img_size} px, {config.epochs} epoch(s), image batch {config.batch_size}; fibers per step / lr: "
              f"anomalib {ANOMALIB_FIBER_BATCH} / {ANOMALIB_LR:g} (its defaults), ours {config.fiber_batch} / "
              f"{config.lr:g}; our maps normalised on {config.map_norm}; "
              f"{torch.get_num_threads()} CPU threads.")
    text = f"{header}\n\n{table(config, peer, cached, on_the_fly)}\n"
    print("\n" + text)


if __name__ == "__main__":
    main()
