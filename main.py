"""Train and evaluate: ``python main.py [--preset NAME] [--method M] [--field value ...]``.

``torchrun --nproc_per_node N main.py ...`` spreads the tasks over N processes and writes the same files
(:func:`run_shared`, ``distributed.py``).

For every task (normal class or category) of the configured dataset: take the cached features
(extracting what is missing), hold out ``val_fraction`` of the normal training images, fit the
method's detector on the rest (the held-out images pick the kept epoch and the decision threshold),
save it as one checkpoint, score the test split and compute the metrics. Nothing is selected on the
test set. Writes, under ``results_dir/<dataset identity>-<backbone>-<method>[-<fusion>]-<hash>/``:

- ``results.json``: ``per_class`` -> metrics, wall times, kept epoch, threshold; ``mean``; the
  configuration (``--config results.json`` re-runs it);
- ``results.md``: the table in the paper's layout;
- ``scores.csv``: ``task,path,label,score`` of every test image;
- ``checkpoints/<task>.pt``: the detector (``predict.py`` scores new images with it; ``--eval_only``
  rescores from it into ``eval_only/`` beside it, with the same files, and refuses settings it was
  not trained with);
- ``config.json``: the resolved settings (what ``--help-all`` would show as defaults for this run);
- ``figures/``: score histograms, held-out curves, and for CFLOW test images with their maps;
  ``maps/<task>/`` with ``--save_maps``.

The dataset identity is ``<dataset>-<root folder name>-<hash of the resolved root>`` (``digits`` for
the bundled digits); the last hash is of every setting that changes the results (``result_settings``), so
each set of settings has its own folder; ``--eval_only`` rescores the run whose checkpoints its settings load
(``evaluated_run``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from config import FIELDS_ADDED_LATER, Config, ConfigError, as_trained_before, describe, parse_args
from datasets import DataError, Task, dataset_identity, held_out_split, load_mask, load_tasks
from distributed import DistributedError, Ranks, session
from extractor import CacheError, FeatureExtractor, WeightsError, extract_tasks, task_features
from metrics import detection_and_localization, per_defect_type
from model import (TOKEN_NAMES, TRAINING_FIELDS, BothFeatures, Detector, DetectorError, StageFeatures, build_detector,
                   load_detector, settings_differences)
from report import (MAP_NORM_NOTES, ScoreRow, method_label, save_histogram, save_map_figure, save_training_curve,
                    write_results, write_scores_csv)
from train import TrainingError
from utils import atomic_write_bytes, configure_torch, file_sha256, run_cli

SplitFeatures = tuple[Any, Any, Any]
"""(fit, held-out, test) features of one task, in the form its detector takes."""


RUN_ONLY_FIELDS = frozenset({"device", "threads", "compile", "stage_workers", "num_workers", "extract_batch_size",
                             "cache_dir", "refresh_cache", "download", "results_dir", "eval_only", "n_figure_images",
                             "save_maps"})
"""Fields that change where or how fast a run works, or which extra files it draws, but no number of its
results.json or scores.csv beyond float rounding: runs that differ only in them share a results folder."""


def _readable_name(config: Config) -> str:
    name = f"{dataset_identity(config)}-{config.backbone}-{config.method}"
    return (name + f"-{config.fusion}" if config.method in ("sanf", "sanf_cflow") else name).replace("/", "_")


def result_settings(config: Config) -> dict[str, Any]:
    """The fields that make a run's numbers, as its results folder's hash reads them: all but the run-only ones;
    data_root is left to the dataset identity, which holds it resolved (``~/data`` and its absolute path are one
    folder); a field added later at the value every run before it had is left out, so that adding a field moves
    no saved run's folder."""
    return {name: value for name, value in config.to_dict().items()
            if name not in RUN_ONLY_FIELDS and name != "data_root"
            and not (name in FIELDS_ADDED_LATER and value == FIELDS_ADDED_LATER[name])}


def results_folder(config: Config) -> Path:
    """``results_dir/<dataset identity>-<backbone>-<method>[-<fusion>]-<settings hash>``: one folder per set of
    result settings, so a run with other settings never replaces another's results."""
    digest = hashlib.sha256(json.dumps(result_settings(config), sort_keys=True).encode()).hexdigest()[:8]
    return Path(config.results_dir) / f"{_readable_name(config)}-{digest}"


def view_rows(arrays: dict[str, np.ndarray], index: np.ndarray | None = None, stored_views: int = 1,
              views: int = 1, flatten: bool = False) -> dict[str, np.ndarray]:
    """Cached float16 arrays (rows ``index``, default all) → float32 arrays of their first ``views`` views.

    A unit of ``stored_views`` > 1 holds (N, V, ...) arrays. One view: (M, ...); more: (M, views, ...), or with
    ``flatten`` (M * views, ...), an image's views next to each other."""
    selected = {}
    for name, array in arrays.items():
        rows = np.asarray(array if index is None else array[index], dtype=np.float32)
        if stored_views > 1:
            rows = rows[:, 0] if views == 1 else rows[:, :views]
            if views > 1 and flatten:
                rows = rows.reshape(-1, *rows.shape[2:])
        selected[name] = np.ascontiguousarray(rows)
    return selected


def _as_tensors(arrays: dict[str, np.ndarray], index: np.ndarray | None = None, stored_views: int = 1,
                views: int = 1, flatten: bool = False) -> dict[str, Tensor]:
    """:func:`view_rows` as float32 CPU tensors; a method fits ``flatten``ed views (every view one more sample)."""
    return {name: torch.from_numpy(rows) for name, rows in
            view_rows(arrays, index, stored_views, views, flatten).items()}


def token_features(config: Config, task: Task, extractor: FeatureExtractor, fit_index: np.ndarray,
                   held_index: np.ndarray, shared_test: dict[str, dict[str, Tensor]],
                   arrays: tuple[dict, dict] | None = None) -> SplitFeatures:
    """SANF / baseline features. ``shared_test`` keeps the last test split as tensors: the classes of a
    one-class protocol share it, so it is converted once per run, not once per class. ``arrays``: the cached
    (train, test) token arrays, where the caller has read them."""
    train, test = arrays or task_features(extractor, task, config)
    if task.test_key not in shared_test:
        shared_test.clear()
        shared_test[task.test_key] = _as_tensors(test, None, config.cached_views("test"), config.test_views)
    stored = config.cached_views("train")
    held = _as_tensors(train, held_index, stored, config.test_views) if len(held_index) else None
    return _as_tensors(train, fit_index, stored, config.train_views, flatten=True), held, shared_test[task.test_key]


def stage_features(config: Config, task: Task, extractor: FeatureExtractor, fit_index: np.ndarray,
                   held_index: np.ndarray, arrays: tuple[dict, dict] | None = None) -> SplitFeatures:
    """CFLOW features: from the cache (extracting what it lacks; ``arrays``: the cached (train, test) stage
    arrays, where the caller has read them) or, with ``--no-cache``, on the fly."""
    if not config.cache:
        def on_the_fly(index: np.ndarray, rotate_degrees: float = 0.0) -> StageFeatures:
            return StageFeatures(images=task.train.subset(index), extractor=extractor, config=config,
                                 rotate_degrees=rotate_degrees)

        held = on_the_fly(held_index) if len(held_index) else None
        return (on_the_fly(fit_index, config.rotate_degrees), held,
                StageFeatures(images=task.test, extractor=extractor, config=config))
    train, test = arrays or task_features(extractor, task, config)
    stored, views = config.cached_views("train"), config.test_views
    held = StageFeatures.from_arrays(view_rows(train, held_index, stored, views, flatten=True), config.device,
                                     views) if len(held_index) else None
    fit = view_rows(train, fit_index, stored, config.train_views, flatten=True)
    test_rows = view_rows(test, None, config.cached_views("test"), views, flatten=True)
    return (StageFeatures.from_arrays(fit, config.device), held,
            StageFeatures.from_arrays(test_rows, config.device, views))


def both_features(config: Config, task: Task, extractor: FeatureExtractor, fit_index: np.ndarray,
                  held_index: np.ndarray, shared_test: dict[str, dict[str, Tensor]]) -> SplitFeatures:
    """``sanf_cflow`` features: each split's tokens and stage maps, from the one cache unit that a single
    backbone pass per image filled."""
    train, test = task_features(extractor, task, config)

    def named(arrays: dict, names: tuple[str, ...]) -> dict:
        return {name: arrays[name] for name in names}

    tokens = token_features(config, task, extractor, fit_index, held_index, shared_test,
                            (named(train, TOKEN_NAMES), named(test, TOKEN_NAMES)))
    layers = tuple(extractor.layers)
    stages = stage_features(config, task, extractor, fit_index, held_index, (named(train, layers), named(test, layers)))
    return tuple(None if token is None else BothFeatures(token, stage) for token, stage in zip(tokens, stages))


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
             shared_test: dict[str, dict[str, Tensor]]) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """Fit (or load) one task's detector (``folder/checkpoints``), score its test split, write its figures
    (under ``out``); returns metrics, scores and each head's scores (sanf_cflow; else empty)."""
    started = time.perf_counter()
    fit_index, held_index = held_out_split(len(task.train), config.val_fraction, config.seed)
    if config.method == "cflow":
        features = stage_features(config, task, extractor, fit_index, held_index)
    elif config.method == "sanf_cflow":
        features = both_features(config, task, extractor, fit_index, held_index, shared_test)
    else:
        features = token_features(config, task, extractor, fit_index, held_index, shared_test)
    feature_seconds = time.perf_counter() - started
    detector = fit_or_load(config, task, extractor, features, held_index, folder / "checkpoints" / f"{task.name}.pt")
    started = time.perf_counter()
    scores, maps, head_scores = detector.score_by_head(features[2])
    score_seconds = time.perf_counter() - started
    masks = load_test_masks(task, config.img_size) if maps is not None else None
    metrics = {**evaluate(task.test_labels, scores, masks, maps, defect_types_of(task)), **detector.info,
               "threshold": detector.threshold, "threshold_rule": detector.threshold_rule,
               "test_flagged_fraction": float(detector.flagged(scores).mean()),
               "feature_seconds": feature_seconds, "score_seconds": score_seconds,
               "n_fit": len(fit_index), "n_held_out": len(held_index), "n_test": len(task.test)}
    for head, values in head_scores.items():  # each head's own image AUROC beside the combined one
        auroc = evaluate(task.test_labels, values, None, None).get("image_auroc")
        if auroc is not None:
            metrics[f"{head}_image_auroc"] = auroc
    _write_figures(config, task, detector, scores, maps, masks, metrics, out)
    print(_task_line(task.name, metrics))
    return metrics, scores, head_scores


def _write_figures(config: Config, task: Task, detector: Detector, scores: np.ndarray, maps: np.ndarray | None,
                   masks: np.ndarray | None, metrics: dict[str, Any], folder: Path) -> None:
    auroc = metrics.get("image_auroc")
    label = f"{task.name}: {method_label(config)}" + (f", AUROC {auroc:.3f}" if auroc is not None else "")
    save_histogram(scores, task.test_labels, label, folder / "figures" / f"scores_{task.name}.png")
    trained = {"": detector.info, **{f"_{head}": info for head, info in detector.info.get("heads", {}).items()}}
    for suffix, info in trained.items():
        if "curve" in info and any("held_out_nll" in row for row in info["curve"]):
            title = f"{task.name}{suffix.replace('_', ' ')}: held-out NLL"
            save_training_curve(info["curve"], info["kept_epoch"], title,
                                folder / "figures" / f"training_{task.name}{suffix}.png")
    if maps is not None:
        save_map_figure(task, scores, maps, masks, config, folder / "figures" / f"maps_{task.name}.png")
        if config.save_maps:
            write_maps(folder, task, maps)


def _task_line(name: str, metrics: dict[str, Any]) -> str:
    parts = [f"{label} {metrics[key]:.4f}" for key, label in
             (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO@0.3"))
             if key in metrics]
    parts.append(f"kept epoch {metrics['kept_epoch']}" if "kept_epoch" in metrics else "")
    for head, info in metrics.get("heads", {}).items():
        auroc = f"image AUROC {metrics[f'{head}_image_auroc']:.4f}, " if f"{head}_image_auroc" in metrics else ""
        parts.append(f"{head} head: {auroc}kept epoch {info['kept_epoch']}")
    parts.append(f"scoring rule {metrics['scoring_rule']}" if "scoring_rule" in metrics else "")
    if "caff_context_chosen" in metrics:
        nll = ", ".join(f"{context} {value:.4f}" for context, value in metrics["caff_context_held_out_nll"].items())
        parts.append(f"CAFF context {metrics['caff_context_chosen']} (held-out NLL {nll})")
    parts.append(f"fit {metrics['fit_seconds']:.1f} s, score {metrics['score_seconds']:.1f} s")
    parts.append(f"{100 * metrics['test_flagged_fraction']:.1f}% of test images above the threshold")
    return f"{name}: " + ", ".join(p for p in parts if p) + (f" ({metrics['note']})" if "note" in metrics else "")


def evaluated_run(config: Config) -> Path:
    """The run folder --eval_only rescores: that of these settings, else the one run of the same dataset, backbone
    and method whose checkpoints these settings load (differing only in what a checkpoint does not fix, such as
    --max_test or --scoring); a DetectorError naming how the runs there differ otherwise."""
    folder = results_folder(config)
    if (folder / "checkpoints").is_dir():
        return folder
    loadable, others = [], []
    for results in sorted(folder.parent.glob(f"{_readable_name(config)}-*/results.json")):
        try:
            trained = Config(**as_trained_before(json.loads(results.read_text())["config"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            others.append(f"{results.parent.name}: its results.json holds no settings of this version "
                          f"({type(error).__name__})")
            continue
        differences = settings_differences(trained, config, TRAINING_FIELDS)
        if differences:
            others.append(f"{results.parent.name}: {'; '.join(differences)}")
        else:
            loadable.append(results.parent)
    if len(loadable) == 1:
        return loadable[0]
    if loadable:
        raise DetectorError(f"--eval_only: the runs {', '.join(run.name for run in loadable)} in {folder.parent} "
                            "were all trained with these settings; pass --config <run>/results.json of the one to "
                            "rescore")
    hint = f": {' | '.join(others)}" if others else "; train first (main.py without --eval_only)"
    raise DetectorError(f"--eval_only: no run in {folder.parent} was trained with these settings{hint}")


def run(config: Config, ranks: Ranks | None = None) -> dict[str, Any] | None:
    """The whole job, every task in turn; returns the results.json payload (rewritten after each task). Under
    torchrun (``ranks``) the tasks are spread over the ranks (:func:`run_shared`); ranks but 0 return None."""
    started = time.perf_counter()
    ranks = ranks or Ranks()
    local = ranks.local_config(config)
    configure_torch(local)
    tasks = load_tasks(config)
    extractor = FeatureExtractor(local)
    folder = evaluated_run(config) if config.eval_only else results_folder(config)
    out = folder / "eval_only" if config.eval_only else folder  # a rescoring never overwrites the run it scores
    notes = {"held_out": f"{config.val_fraction:g} of each task's normal training images (seed {config.seed}) are held "
                         "out of the fit for every method; they pick the kept epoch and set the threshold"
             if config.val_fraction > 0 else "val_fraction 0: every normal training image is fitted; the last epoch is "
                                             "kept and the threshold comes from the fit images' scores (optimistic)"}
    if config.uses_stages():
        notes.update(stages=extractor.layers, map_normalization=config.map_norm,
                     map_normalization_note=MAP_NORM_NOTES[config.map_norm])
        print(f"CFLOW stages: {', '.join(extractor.layers)} (--layers {config.layers})")
    if ranks.distributed:
        return run_shared(config, local, ranks, tasks, extractor, (folder, out), notes, started)
    per_class: dict[str, dict[str, Any]] = {}
    score_rows: list[ScoreRow] = []
    wall = {"features": 0.0, "methods": 0.0}
    shared_test: dict[str, dict[str, Tensor]] = {}
    for task in tasks:
        step = time.perf_counter()
        metrics, scores, head_scores = run_task(config, task, extractor, folder, out, shared_test)
        per_class[task.name] = metrics
        score_rows += _score_rows(task, scores, head_scores)
        wall["features"] += metrics["feature_seconds"]
        wall["methods"] += time.perf_counter() - step - metrics["feature_seconds"]
        wall["total"] = time.perf_counter() - started
        write_scores_csv(out / "scores.csv", score_rows)
        write_results(config, out, per_class, wall, complete=False, notes=notes)
    return finish_run(config, out, per_class, wall, notes)


def _score_rows(task: Task, scores: Any, head_scores: dict[str, Any]) -> list[ScoreRow]:
    """scores.csv rows of one task's test images: task, path, label, score and each head's score."""
    return [(task.name, task.test.source(i), int(task.test_labels[i]), float(scores[i]),
             {head: float(values[i]) for head, values in head_scores.items()}) for i in range(len(task.test))]


def finish_run(config: Config, out: Path, per_class: dict[str, dict[str, Any]], wall: dict[str, float],
               notes: dict[str, Any]) -> dict[str, Any]:
    """The complete results.json and results.md, and config.json; returns the results.json payload."""
    payload = write_results(config, out, per_class, wall, complete=True, notes=notes)
    atomic_write_bytes(out / "config.json", describe(config).encode())
    print((out / "results.md").read_text())
    print(f"results: {out} (total {wall['total']:.1f} s)")
    return payload


def run_shared(config: Config, local: Config, ranks: Ranks, tasks: list[Task], extractor: FeatureExtractor,
               folders: tuple[Path, Path], notes: dict[str, Any], started: float) -> dict[str, Any] | None:
    """The job over several ranks: the cache extracted by all (each unit's images split over them), then task i
    run by rank i % world on its device (``local``), each leaving a task record (:func:`run_or_reuse`); once every
    rank is done, rank 0 writes scores.csv, results.json, results.md and config.json from the records in task
    order, as one process would (wall times aside; each task's figures come from its rank). Returns the
    results.json payload on rank 0, None elsewhere."""
    folder, out = folders
    extract_started = time.perf_counter()
    if config.cache:
        extract_tasks(extractor, tasks, local, ranks)
    extract_seconds = time.perf_counter() - extract_started
    shared_test: dict[str, dict[str, Tensor]] = {}
    for index in ranks.share(len(tasks)):
        run_or_reuse(config, local, tasks[index], extractor, folders, shared_test)
    ranks.gather("tasks done")
    if ranks.rank:
        return None
    records = []
    for task in tasks:
        record = reusable_record(record_path(out, task), config, folder / "checkpoints" / f"{task.name}.pt")
        if record is None:
            raise DistributedError(f"the record of task {task.name} ({record_path(out, task)}) is missing or not this "
                                   "run's although its rank finished: --results_dir must be one folder that every "
                                   "rank shares (on several machines, a shared file system)")
        records.append(record)
    per_class = {task.name: record["metrics"] for task, record in zip(tasks, records)}
    score_rows = [row for task, record in zip(tasks, records)
                  for row in _score_rows(task, record["scores"], record.get("head_scores", {}))]
    features = sum(record["metrics"]["feature_seconds"] for record in records)
    wall = {"features": extract_seconds + features, "methods": sum(record["seconds"] for record in records) - features,
            "total": time.perf_counter() - started}
    write_scores_csv(out / "scores.csv", score_rows)
    payload = finish_run(config, out, per_class, wall, notes)
    shutil.rmtree(out / "parts")
    return payload


def record_path(out: Path, task: Task) -> Path:
    """Where a rank leaves what it found for ``task`` under torchrun: ``parts/<task>.json`` in the output folder."""
    return out / "parts" / f"{task.name}.json"


def run_or_reuse(config: Config, local: Config, task: Task, extractor: FeatureExtractor, folders: tuple[Path, Path],
                 shared_test: dict[str, dict[str, Tensor]]) -> None:
    """One task of this rank: reused when an earlier run left its record with these settings and the checkpoint
    it vouches for (:func:`reusable_record`), else run (with ``local``, this rank's device) and recorded.

    The record holds ``config``'s settings, the checkpoint's SHA-256, the metrics, the test scores and the
    seconds taken, written atomically after the checkpoint; it is JSON with NaN kept as NaN, so that rank 0
    computes the means from the same numbers as one process. An old record is deleted before the task runs:
    no record ever vouches for a checkpoint that is being replaced."""
    folder, out = folders
    path, checkpoint = record_path(out, task), folder / "checkpoints" / f"{task.name}.pt"
    record = reusable_record(path, config, checkpoint)
    if record is not None:
        print(f"{_task_line(task.name, record['metrics'])} [reused: {path} and {checkpoint.name}, same settings]")
        return
    path.unlink(missing_ok=True)
    step = time.perf_counter()
    metrics, scores, head_scores = run_task(local, task, extractor, folder, out, shared_test)
    record = {"config": config.to_dict(), "checkpoint_sha256": file_sha256(checkpoint), "metrics": metrics,
              "scores": [float(score) for score in scores],
              "head_scores": {head: [float(score) for score in values] for head, values in head_scores.items()},
              "seconds": time.perf_counter() - step}
    atomic_write_bytes(path, json.dumps(record, indent=1, allow_nan=True).encode())


def reusable_record(path: Path, config: Config, checkpoint: Path) -> dict[str, Any] | None:
    """The task record at ``path`` when it holds exactly ``config``'s settings and ``checkpoint`` is still the file
    it was made with; None otherwise, with a note when a record is there but does not qualify."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        print(f"note: task record {path} is unreadable ({error}); the task is run again")
        return None
    if not isinstance(record, dict) or record.get("config") != config.to_dict():
        print(f"note: task record {path} was made with other settings; the task is run again")
        return None
    if not checkpoint.is_file() or file_sha256(checkpoint) != record.get("checkpoint_sha256"):
        print(f"note: checkpoint {checkpoint} is not the one task record {path} was made with; the task is run again")
        return None
    return record


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    print(describe(config))
    with session(config) as ranks:
        run(config, ranks)


EXPECTED_ERRORS = (ConfigError, DataError, WeightsError, CacheError, TrainingError, DetectorError, DistributedError)
"""What bad input or settings raise: the scripts print it as one line and exit 2 (``utils.run_cli``)."""

if __name__ == "__main__":
    run_cli(main, EXPECTED_ERRORS)
