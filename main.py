"""Train and evaluate: ``python main.py [--preset NAME] [--method M] [--field value ...]``.

For every task (normal class or category) of the configured dataset: take the cached features
(extracting what is missing), hold out ``val_fraction`` of the normal training images, fit the
method's detector on the rest (the held-out images pick the kept epoch and the decision threshold),
save it as one checkpoint, score the test split and compute the metrics. Nothing is selected on the
test set. Writes, under ``results_dir/<dataset identity>-<backbone>-<method>[-<fusion>]/``:

- ``results.json``: ``per_class`` -> metrics, wall times, kept epoch, threshold; ``mean``; the
  configuration (``--config results.json`` re-runs it);
- ``results.md``: the table in the paper's layout;
- ``scores.csv``: ``task,path,label,score`` of every test image;
- ``checkpoints/<task>.pt``: the detector (``predict.py`` scores new images with it; ``--eval_only``
  rescores from it into ``eval_only/`` beside it, with the same files, and refuses settings it was
  not trained with);
- ``config.json``: the resolved settings (what ``--help`` would show as defaults for this run);
- ``figures/``: score histograms, held-out curves, and for CFLOW test images with their maps;
  ``maps/<task>/`` with ``--save_maps``.

The dataset identity is ``<dataset>-<root folder name>-<hash of the resolved root>`` (``digits`` for
the bundled digits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from config import Config, ConfigError, describe, parse_args
from datasets import DataError, Task, dataset_identity, held_out_split, load_mask, load_tasks
from extractor import CacheError, FeatureExtractor, WeightsError, task_features
from metrics import detection_and_localization, per_defect_type
from model import TRAINING_FIELDS, Detector, DetectorError, StageFeatures, build_detector, load_detector
from report import (MAP_NORM_NOTES, method_label, save_histogram, save_map_figure, save_training_curve,
                    write_results, write_scores_csv)
from train import TrainingError
from utils import atomic_write_bytes, configure_torch, run_cli

SplitFeatures = tuple[Any, Any, Any]
"""(fit, held-out, test) features of one task, in the form its detector takes."""


def results_folder(config: Config) -> Path:
    name = f"{dataset_identity(config)}-{config.backbone}-{config.method}"
    if config.method == "sanf":
        name += f"-{config.fusion}"
    return Path(config.results_dir) / name.replace("/", "_")


def _as_tensors(arrays: dict[str, np.ndarray], index: np.ndarray | None = None) -> dict[str, Tensor]:
    """Cached float16 arrays (rows ``index``, default all) → float32 CPU tensors."""
    return {name: torch.from_numpy(np.asarray(array if index is None else array[index], dtype=np.float32))
            for name, array in arrays.items()}


def token_features(config: Config, task: Task, extractor: FeatureExtractor, fit_index: np.ndarray,
                   held_index: np.ndarray, shared_test: dict[str, dict[str, Tensor]]) -> SplitFeatures:
    """SANF / baseline features. ``shared_test`` keeps the last test split as tensors: the classes of a
    one-class protocol share it, so it is converted once per run, not once per class."""
    train, test = task_features(extractor, task, config)
    if task.test_key not in shared_test:
        shared_test.clear()
        shared_test[task.test_key] = _as_tensors(test)
    held = _as_tensors(train, held_index) if len(held_index) else None
    return _as_tensors(train, fit_index), held, shared_test[task.test_key]


def stage_features(config: Config, task: Task, extractor: FeatureExtractor, fit_index: np.ndarray,
                   held_index: np.ndarray) -> SplitFeatures:
    """CFLOW features: from the cache (extracting what it lacks) or, with ``--no-cache``, on the fly."""
    if not config.cache:
        def on_the_fly(index: np.ndarray, rotate_degrees: float = 0.0) -> StageFeatures:
            return StageFeatures(images=task.train.subset(index), extractor=extractor, config=config,
                                 rotate_degrees=rotate_degrees)

        held = on_the_fly(held_index) if len(held_index) else None
        return (on_the_fly(fit_index, config.rotate_degrees), held,
                StageFeatures(images=task.test, extractor=extractor, config=config))
    train, test = task_features(extractor, task, config)
    held = StageFeatures.from_arrays({k: v[held_index] for k, v in train.items()}, config.device) \
        if len(held_index) else None
    return (StageFeatures.from_arrays({k: v[fit_index] for k, v in train.items()}, config.device), held,
            StageFeatures.from_arrays(test, config.device))


def load_test_masks(task: Task, size: int) -> np.ndarray | None:
    """Ground-truth masks (N, size, size), nearest-resized; None when the dataset has none."""
    if task.test_masks is None:
        return None
    return np.stack([load_mask(path, (size, size)) for path in task.test_masks])


def defect_types_of(task: Task) -> np.ndarray | None:
    """The test sub-folder of each test image (``test/<type>/<name>``) for defect sets; None otherwise."""
    if task.test_masks is None:
        return None
    return np.array([Path(image_id).parent.name for image_id in task.test.ids])


def evaluate(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None,
             maps: np.ndarray | None, defect_types: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of one task; those that need normal and anomalous images are left out, with a note.
    With ``defect_types`` (defect sets), ``per_defect_type`` holds each type's AUROCs against the normal images."""
    if len(np.unique(labels)) < 2:
        kind = "normal" if labels.max(initial=0) == 0 else "anomalous"
        return {"note": f"the test split holds only {kind} images: AUROC, F1 and the pixel metrics are n/a"}
    note = ""
    if masks is not None and not (masks.any() and (~masks).any()):
        note = "the masks mark no defective pixel (or only defective ones): the pixel metrics are n/a"
        masks = maps = None
    elif masks is not None:
        empty = int((~masks[labels == 1].any(axis=(1, 2))).sum())
        if empty:
            note = (f"{empty} defective test image(s) have an empty mask; the pixel metrics count all their pixels "
                    "as normal")
    metrics = detection_and_localization(labels, scores, masks, None if masks is None else maps)
    if defect_types is not None:
        metrics["per_defect_type"] = per_defect_type(labels, defect_types, scores, masks, maps)
    return {**metrics, "note": note} if note else metrics


def fit_or_load(config: Config, task: Task, extractor: FeatureExtractor, features: SplitFeatures,
                held_index: np.ndarray, checkpoint: Path) -> Detector:
    if config.eval_only:  # results.json reports this run's settings: they must be the checkpoint's
        return load_detector(checkpoint, config, extractor, also=TRAINING_FIELDS)
    detector = build_detector(config, extractor)
    detector.fit(features[0], features[1], task.name, task.train.subset(held_index))
    detector.save(checkpoint)
    return detector


def write_maps(folder: Path, task: Task, maps: np.ndarray) -> None:
    """One float16 ``.npy`` anomaly map per test image, named by its id."""
    for index, anomaly_map in enumerate(maps):
        path = folder / "maps" / task.name / f"{Path(task.test.ids[index]).with_suffix('')}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, anomaly_map.astype(np.float16))


def run_task(config: Config, task: Task, extractor: FeatureExtractor, folder: Path, out: Path,
             shared_test: dict[str, dict[str, Tensor]]) -> tuple[dict[str, Any], np.ndarray]:
    """Fit (or load) one task's detector (``folder/checkpoints``), score its test split, write its figures
    (under ``out``); returns metrics and scores."""
    started = time.perf_counter()
    fit_index, held_index = held_out_split(len(task.train), config.val_fraction, config.seed)
    if config.method == "cflow":
        features = stage_features(config, task, extractor, fit_index, held_index)
    else:
        features = token_features(config, task, extractor, fit_index, held_index, shared_test)
    feature_seconds = time.perf_counter() - started
    detector = fit_or_load(config, task, extractor, features, held_index, folder / "checkpoints" / f"{task.name}.pt")
    started = time.perf_counter()
    scores, maps = detector.score(features[2])
    score_seconds = time.perf_counter() - started
    masks = load_test_masks(task, config.img_size) if maps is not None else None
    metrics = {**evaluate(task.test_labels, scores, masks, maps, defect_types_of(task)), **detector.info,
               "threshold": detector.threshold, "threshold_rule": detector.threshold_rule,
               "test_flagged_fraction": float(detector.flagged(scores).mean()),
               "feature_seconds": feature_seconds, "score_seconds": score_seconds,
               "n_fit": len(fit_index), "n_held_out": len(held_index), "n_test": len(task.test)}
    _write_figures(config, task, detector, scores, maps, masks, metrics, out)
    print(_task_line(task.name, metrics))
    return metrics, scores


def _write_figures(config: Config, task: Task, detector: Detector, scores: np.ndarray, maps: np.ndarray | None,
                   masks: np.ndarray | None, metrics: dict[str, Any], folder: Path) -> None:
    auroc = metrics.get("image_auroc")
    label = f"{task.name}: {method_label(config)}" + (f", AUROC {auroc:.3f}" if auroc is not None else "")
    save_histogram(scores, task.test_labels, label, folder / "figures" / f"scores_{task.name}.png")
    if "curve" in detector.info and any("held_out_nll" in r for r in detector.info["curve"]):
        save_training_curve(detector.info["curve"], detector.info["kept_epoch"], f"{task.name}: held-out NLL",
                            folder / "figures" / f"training_{task.name}.png")
    if maps is not None:
        save_map_figure(task, scores, maps, masks, config, folder / "figures" / f"maps_{task.name}.png")
        if config.save_maps:
            write_maps(folder, task, maps)


def _task_line(name: str, metrics: dict[str, Any]) -> str:
    parts = [f"{label} {metrics[key]:.4f}" for key, label in
             (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO@0.3"))
             if key in metrics]
    parts.append(f"kept epoch {metrics['kept_epoch']}" if "kept_epoch" in metrics else "")
    parts.append(f"scoring rule {metrics['scoring_rule']}" if "scoring_rule" in metrics else "")
    if "caff_context_chosen" in metrics:
        nll = ", ".join(f"{context} {value:.4f}" for context, value in metrics["caff_context_held_out_nll"].items())
        parts.append(f"CAFF context {metrics['caff_context_chosen']} (held-out NLL {nll})")
    parts.append(f"fit {metrics['fit_seconds']:.1f} s, score {metrics['score_seconds']:.1f} s")
    parts.append(f"{100 * metrics['test_flagged_fraction']:.1f}% of test images above the threshold")
    return f"{name}: " + ", ".join(p for p in parts if p) + (f" ({metrics['note']})" if "note" in metrics else "")


def note_replaced_run(folder: Path, config: Config) -> None:
    """A note when this run replaces the results and checkpoints of one made with other settings."""
    try:
        earlier = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    ignored = {"eval_only", "device", "threads", "stage_workers", "results_dir", "cache_dir", "refresh_cache",
               "num_workers"}
    changed = [f"{name} {earlier[name]!r} -> {value!r}" for name, value in config.to_dict().items()
               if name not in ignored and name in earlier and earlier[name] != value]
    if changed:
        print(f"note: replacing the results and checkpoints in {folder}, made with other settings "
              f"({'; '.join(changed)}); pass --results_dir to keep both")


def run(config: Config) -> dict[str, Any]:
    """The whole job, every task in turn; returns the results.json payload (rewritten after each task)."""
    started = time.perf_counter()
    configure_torch(config)
    tasks = load_tasks(config)
    extractor = FeatureExtractor(config)
    folder = results_folder(config)
    out = folder / "eval_only" if config.eval_only else folder  # a rescoring never overwrites the run it scores
    if not config.eval_only:
        note_replaced_run(folder, config)
    notes = {"held_out": f"{config.val_fraction:g} of each task's normal training images (seed {config.seed}) are held "
                         "out of the fit for every method; they pick the kept epoch and set the threshold"
             if config.val_fraction > 0 else "val_fraction 0: every normal training image is fitted; the last epoch is "
                                             "kept and the threshold comes from the fit images' scores (optimistic)"}
    if config.method == "cflow":
        notes.update(stages=extractor.layers, map_normalization=config.map_norm,
                     map_normalization_note=MAP_NORM_NOTES[config.map_norm])
        print(f"CFLOW stages: {', '.join(extractor.layers)} (--layers {config.layers})")
    per_class: dict[str, dict[str, Any]] = {}
    score_rows: list[tuple[str, str, int, float]] = []
    wall = {"features": 0.0, "methods": 0.0}
    shared_test: dict[str, dict[str, Tensor]] = {}
    for task in tasks:
        step = time.perf_counter()
        metrics, scores = run_task(config, task, extractor, folder, out, shared_test)
        per_class[task.name] = metrics
        score_rows += [(task.name, task.test.source(i), int(task.test_labels[i]), float(scores[i]))
                       for i in range(len(task.test))]
        wall["features"] += metrics["feature_seconds"]
        wall["methods"] += time.perf_counter() - step - metrics["feature_seconds"]
        wall["total"] = time.perf_counter() - started
        write_scores_csv(out / "scores.csv", score_rows)
        write_results(config, out, per_class, wall, complete=False, notes=notes)
    payload = write_results(config, out, per_class, wall, complete=True, notes=notes)
    atomic_write_bytes(out / "config.json", describe(config).encode())
    print((out / "results.md").read_text())
    print(f"results: {out} (total {wall['total']:.1f} s)")
    return payload


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    print(describe(config))
    run(config)


EXPECTED_ERRORS = (ConfigError, DataError, WeightsError, CacheError, TrainingError, DetectorError)
"""What bad input or settings raise: the scripts print it as one line and exit 2 (``utils.run_cli``)."""

if __name__ == "__main__":
    run_cli(main, EXPECTED_ERRORS)
