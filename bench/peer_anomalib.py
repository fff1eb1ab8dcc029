"""Our CFLOW-AD against anomalib's own ``Cflow`` on one defect category, side by side.

    pip install anomalib        # only for this benchmark (a virtual environment with --system-site-packages
                                # and a constraint torch==2.14.1 keeps the project's torch)
    python bench/peer_anomalib.py --preset cflow_lite0 --data_root MVTEC --classes bottle --epochs 1 \
        --fiber_batch 64 --lr 1e-4
    python bench/peer_anomalib.py --preset cflow_lite0 --dataset folder --data_root DATA/magnetic_tile --epochs 1

Data: ``--dataset mvtec`` (one ``--classes`` category) is read by anomalib's ``MVTecAD``; ``--dataset folder``
(one MVTec-layout folder: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.png``) by its
``Folder`` datamodule (normal_dir ``train/good``, abnormal_dir the defect folders under ``test/``,
normal_test_dir ``test/good``, mask_dir ``ground_truth/<defect>``; the validation split is the test split, as
``MVTecAD``'s default, so that no test image is moved out of the test set). anomalib pairs masks with images
by sort order and checks only that the image stem occurs in the mask stem; this script checks the pairs
exactly and leaves the masks out of anomalib's datamodule where they do not pair (the metrics never use
anomalib's masks).

Both sides use the same backbone and weights (the packaged EfficientNet-Lite0 file is loaded into
anomalib's ``TimmFeatureExtractor``), the same stages, the same input normalisation (the backbone's
mean/std), the same image size, the same flows (coupling blocks, clamp, condition channels, soft permutation)
and the same number of epochs, and the same number of torch threads. The optimiser is Adam on both sides
(betas 0.9 / 0.999, no weight decay with the cflow defaults); its fibers per step and learning rate are each
side's own: anomalib's defaults (64 fibers, lr 1e-4) against ours from the command line (the cflow method
defaults 256 fibers, lr 2e-4; ``--fiber_batch 64 --lr 1e-4`` matches anomalib). The header states both.
The training images differ: ours holds out ``val_fraction`` (default 0.1) of the normal training images
for the kept epoch and the decision threshold and fits on the rest; anomalib trains on all of them.

Each side runs in its own process so that its peak memory (max RSS) is its own. Every metric of both sides is
computed by this repository's ``metrics.py`` from the anomaly maps and scores each side returns, against OUR
masks (``task.test_masks``) resized (nearest) to the image size, so that the numbers differ only by the
models. anomalib's epoch time counts its training epoch only (its per-epoch validation on the test set
excluded) and, like ours with ``cache=false``, includes decoding the images with ``num_workers`` loader
workers. Ours: "train seconds / epoch" is the whole training divided by the epochs run (the held-out NLL
passes, epoch 0's included, counted in); "last epoch" is the last epoch's training alone. Ours fits on fewer
images than anomalib unless ``--val_fraction 0``: the per-training-image row compares the two fairly. Both
sides run with ``utils.keep_freed_memory`` (glibc keeps freed memory for reuse). Ours runs with the feature
cache (the default workflow; the one-time extraction is reported apart) and with ``cache=false`` (the backbone
on every batch, like anomalib), both in one process; with ``--stage_workers N`` (N > 1) also with the cache
and N training processes. Besides wall-clock seconds, the table gives the CPU seconds (all threads, finished
child processes included) of the training epoch and of the test scoring (ours: measured around
``model.train_cflow`` and the test ``CFlowDetector.score`` call, wrapped in its child process). With other
jobs on the machine neither is clean: the wall clock counts the time the process waits, and with more than one
thread the CPU seconds count the OpenMP threads' spin-waiting for each other; ``--threads 1`` makes the CPU
seconds the work done.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, describe, parse_args  # noqa: E402
from datasets import load_tasks  # noqa: E402
from utils import peak_memory_gb as own_peak_memory_gb  # noqa: E402
from utils import to_numpy  # noqa: E402

ANOMALIB_FIBER_BATCH, ANOMALIB_LR = 64, 1e-4  # anomalib Cflow's defaults: its own optimiser setting
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1")


def peak_memory_gb(metrics: dict[str, Any] | None = None) -> float:
    """This process's peak RSS plus, after a CFLOW run with stage workers, each worker's (``metrics``: the
    run's results.json entry). The features the processes share count in each, so the sum is an upper bound."""
    return own_peak_memory_gb() + sum((metrics or {}).get("worker_peak_memory_gb", []))


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the ``--stage_workers`` processes)."""
    return sum(time_used for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for time_used in resource.getrusage(who)[:2])


def category_of(config: Config) -> str:
    """The one category compared: the ``--classes`` name for mvtec, the folder's name for folder."""
    if config.dataset == "folder":
        return Path(config.resolved_data_root()).resolve().name
    return config.class_list()[0]


def dataset_label(config: Config) -> str:
    """'MVTec AD bottle (ROOT)' or 'folder dataset magnetic_tile (ROOT)': what the header names."""
    kind = "MVTec AD" if config.dataset == "mvtec" else "folder dataset"
    return f"{kind} {category_of(config)} ({config.resolved_data_root()})"


def _cpu_meter(owner: Any, name: str, store: dict[str, float]) -> None:
    """Wrap ``owner.name`` so that ``store[name]`` holds the CPU seconds of its latest call (its worker
    processes included)."""
    original = getattr(owner, name)

    def metered(*args: Any, **kwargs: Any) -> Any:
        started = _cpu_seconds()
        try:
            return original(*args, **kwargs)
        finally:
            store[name] = _cpu_seconds() - started

    setattr(owner, name, metered)


def ours(config: Config) -> dict[str, Any]:
    """Our main.py job on one category; metrics, seconds per epoch, test images/s, peak memory; CPU seconds of
    the training (``model.train_cflow``) and of the test scoring (the last ``CFlowDetector.score`` call)."""
    import torch

    import model
    from main import run

    cpu: dict[str, float] = {}
    _cpu_meter(model, "train_cflow", cpu)
    _cpu_meter(model.CFlowDetector, "score", cpu)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        payload = run(replace(config, cache_dir=f"{folder}/cache", results_dir=f"{folder}/results",
                              n_figure_images=0))
        total = time.perf_counter() - started
    metrics = next(iter(payload["per_class"].values()))
    return {**{k: metrics[k] for k in METRICS}, "seconds_per_epoch": metrics["seconds_per_epoch"],
            "last_epoch_seconds": metrics["curve"][-1]["seconds"], "feature_seconds": metrics["feature_seconds"],
            "test_images_per_second": metrics["n_test"] / metrics["score_seconds"],
            "train_cpu_seconds_per_epoch": cpu["train_cflow"] / max(metrics["epochs_run"], 1),
            "last_epoch_seconds_per_image": metrics["curve"][-1]["seconds"] / metrics["n_fit"],
            "test_images_per_cpu_second": metrics["n_test"] / cpu["score"],
            "stage_groups": metrics["stage_groups"], "stages": payload["stages"], "cache": config.cache,
            "n_fit": metrics["n_fit"],
            "n_held_out": metrics["n_held_out"], "n_test": metrics["n_test"], "total_seconds": total,
            "peak_rss_gb": peak_memory_gb(metrics),
            "threads": torch.get_num_threads()}


def anomalib_transform(config: Config) -> Any:
    """Resize to img_size and normalise with the backbone's own mean/std (those of our extractor)."""
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from extractor import FeatureExtractor

    reference = FeatureExtractor(config)
    return Compose([Resize((config.img_size, config.img_size), antialias=True),
                    Normalize(mean=(reference.mean / 255).flatten().tolist(),
                              std=(reference.std / 255).flatten().tolist())]), reference


def build_anomalib_cflow(config: Config) -> Any:
    """anomalib's ``Cflow`` with our settings and the weights our extractor loads (packaged file or
    --weights); post-processing, evaluation and visualisation off (our metrics.py scores both sides)."""
    from anomalib.models import Cflow
    from anomalib.pre_processing import PreProcessor

    transform, reference = anomalib_transform(config)
    model = Cflow(backbone=config.backbone.split(".")[0], layers=reference.layers, pre_trained=False,
                  fiber_batch_size=ANOMALIB_FIBER_BATCH, condition_vector=config.condition_dims,
                  coupling_blocks=config.n_flow_layers, clamp_alpha=config.clamp, permute_soft=config.permute_soft,
                  lr=ANOMALIB_LR, pre_processor=PreProcessor(transform=transform), post_processor=False,
                  evaluator=False, visualizer=False)
    weights = reference.head.backbone.state_dict()
    missing = model.model.encoder.feature_extractor.load_state_dict(weights, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"anomalib's extractor lacks weights for {missing[:5]}")
    return model


def _folder_masks(root: Path, defects: list[str]) -> tuple[list[str] | None, str]:
    """mask_dir for anomalib's Folder, or None with the reason when its sort-order pairing would be wrong."""
    from anomalib.data.datasets.image.folder import make_folder_dataset

    masks = [f"ground_truth/{d}" for d in defects]
    if not defects or not all((root / m).is_dir() for m in masks):
        return None, "no ground_truth/<defect> folders: anomalib's Folder reads no masks"
    try:
        samples = make_folder_dataset(normal_dir="train/good", root=root, abnormal_dir=[f"test/{d}" for d in defects],
                                      mask_dir=masks)
    except Exception as error:  # anomalib's MisMatchError and its path checks
        return None, f"anomalib's Folder cannot pair the masks ({type(error).__name__}); given no mask_dir"
    abnormal = samples[samples.label_index == 1]
    wrong = [image for image, mask in zip(abnormal.image_path, abnormal.mask_path)
             if Path(mask).name != f"{Path(image).stem}_mask.png" or Path(mask).parent.name != Path(image).parent.name]
    if wrong:
        return None, (f"anomalib's Folder pairs {len(wrong)} image(s) with another image's mask (sort order); "
                      "given no mask_dir")
    return masks, "masks ground_truth/<defect>/<stem>_mask.png, every pair checked"


def anomalib_datamodule(config: Config) -> tuple[Any, str]:
    """anomalib's MVTecAD (--dataset mvtec) or Folder (--dataset folder) datamodule and a note on it."""
    from anomalib.data import Folder, MVTecAD
    from anomalib.data.utils import ValSplitMode

    common = dict(train_batch_size=config.batch_size, eval_batch_size=config.test_batch_size,
                  num_workers=config.num_workers, seed=config.seed)
    if config.dataset == "mvtec":
        return MVTecAD(root=config.resolved_data_root(), category=category_of(config), **common), "MVTecAD"
    root = Path(config.resolved_data_root()).resolve()
    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    masks, note = _folder_masks(root, defects)
    normal_test = "test/good" if (root / "test" / "good").is_dir() else None
    datamodule = Folder(name=root.name, root=root, normal_dir="train/good", abnormal_dir=[f"test/{d}" for d in defects],
                        normal_test_dir=normal_test, mask_dir=masks, val_split_mode=ValSplitMode.SAME_AS_TEST,
                        **common)
    return datamodule, f"Folder (abnormal_dir test/{{{','.join(defects)}}}, normal_test_dir {normal_test}; {note})"


def lightning_device(device: str) -> tuple[str, Any]:
    """Lightning's accelerator and devices for a torch device: cpu, cuda (the current GPU) or cuda:N."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu", 1
    return "gpu", [int(index)] if index else 1


def anomalib_cflow(config: Config) -> dict[str, Any]:
    """anomalib's Cflow (Engine.fit for config.epochs epochs, then Engine.predict on the test split)."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch.callbacks import Callback

    from datasets import load_mask
    from utils import keep_freed_memory

    keep_freed_memory()  # the allocator setting our side gets from configure_torch: the same for both sides
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = build_anomalib_cflow(config)

    class EpochTimer(Callback):
        """Seconds of each training epoch without anomalib's validation on the test split, which
        Lightning runs before ``on_train_epoch_end``."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []

        @staticmethod
        def now() -> tuple[float, float]:
            return time.perf_counter(), _cpu_seconds()

        def on_train_epoch_start(self, *_: Any) -> None:
            self.started, self.validation = self.now(), (0.0, 0.0)

        def on_validation_epoch_start(self, *_: Any) -> None:
            self.validation_started = self.now()

        def on_validation_epoch_end(self, *_: Any) -> None:
            self.validation = tuple(total + now - start for total, now, start in
                                    zip(self.validation, self.now(), self.validation_started))

        def on_train_epoch_end(self, *_: Any) -> None:
            wall, cpu = (now - start - validation for now, start, validation in
                         zip(self.now(), self.started, self.validation))
            self.seconds.append(wall)
            self.cpu_seconds.append(cpu)

    timer = EpochTimer()
    datamodule, data_note = anomalib_datamodule(config)
    with tempfile.TemporaryDirectory() as folder:
        accelerator, devices = lightning_device(config.device)
        engine = Engine(max_epochs=config.epochs, accelerator=accelerator, devices=devices, default_root_dir=folder,
                        logger=False, callbacks=[timer], enable_progress_bar=True)
        started = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        batches = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
        predict_seconds, predict_cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started

    task = load_tasks(replace(config, classes=category_of(config)) if config.dataset == "mvtec" else config)[0]
    position = {str(Path(name).relative_to("test")): index for index, name in enumerate(task.test.ids)}
    size = (config.img_size, config.img_size)
    scores, maps = np.zeros(len(task.test)), np.zeros((len(task.test), *size), dtype=np.float32)
    filled = np.zeros(len(task.test), dtype=bool)
    for batch in batches:
        raw_maps = batch.anomaly_map.reshape(len(batch.image_path), 1, *batch.anomaly_map.shape[-2:]).float()
        anomaly_maps = torch.nn.functional.interpolate(raw_maps, size=size, mode="bilinear", align_corners=False)[:, 0]
        for path, score, anomaly_map in zip(batch.image_path, batch.pred_score.flatten(), anomaly_maps):
            index = position[f"{Path(path).parent.name}/{Path(path).name}"]
            scores[index], maps[index], filled[index] = float(score), to_numpy(anomaly_map), True
    if not filled.all():
        missing = [task.test.ids[i] for i in np.flatnonzero(~filled)[:5]]
        raise RuntimeError(f"anomalib scored {filled.sum()} of our {len(filled)} test images; missing e.g. {missing}")
    from metrics import detection_and_localization

    masks = np.stack([load_mask(path, size) for path in task.test_masks])  # OUR masks
    metrics = detection_and_localization(task.test_labels, scores, masks, maps)
    return {**{k: metrics[k] for k in METRICS}, "seconds_per_epoch": float(np.mean(timer.seconds)),
            "last_epoch_seconds": timer.seconds[-1],
            "last_epoch_seconds_per_image": timer.seconds[-1] / len(task.train),
            "fit_seconds": fit_seconds, "test_images_per_second": len(task.test) / predict_seconds,
            "train_cpu_seconds_per_epoch": float(np.mean(timer.cpu_seconds)),
            "test_images_per_cpu_second": len(task.test) / predict_cpu_seconds,
            "n_train": len(task.train), "n_test": len(task.test), "data_note": data_note,
            "peak_rss_gb": peak_memory_gb(), "threads": torch.get_num_threads()}


def in_child(function: Any, *args: Any) -> Any:
    """``function(*args)`` in a fresh process, so that peak memory and threads are its own."""
    # ProcessPoolExecutor's processes are not daemonic (Pool's are), so they may start --stage_workers
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def table(peer: dict[str, Any], ours_by_label: dict[str, dict[str, Any]]) -> str:
    """One row per measure: anomalib's value, each of our runs' and each one's ratio to anomalib's."""
    rows = [("Image AUROC", "image_auroc", "{:.4f}"), ("Pixel AUROC", "pixel_auroc", "{:.4f}"),
            ("AUPRO@0.3", "aupro", "{:.4f}"), ("Image F1-max", "image_f1", "{:.4f}"),
            ("Pixel F1-max", "pixel_f1", "{:.4f}"), ("Train seconds / epoch", "seconds_per_epoch", "{:.2f}"),
            ("Train seconds, last epoch", "last_epoch_seconds", "{:.2f}"),
            ("Train seconds per training image, last epoch", "last_epoch_seconds_per_image", "{:.4f}"),
            ("Test images / s (ours with the cache: the flows alone, features precomputed)",
             "test_images_per_second", "{:.1f}"),
            ("Train CPU seconds / epoch", "train_cpu_seconds_per_epoch", "{:.1f}"),
            ("Test images / CPU s", "test_images_per_cpu_second", "{:.2f}"),
            ("Peak memory (GB, max RSS; with stage workers the sum of every process's, the shared features "
             "counted in each)", "peak_rss_gb", "{:.2f}")]
    labels, ours = list(ours_by_label), list(ours_by_label.values())
    lines = [f"| measure | anomalib Cflow | {' | '.join(labels)} | "
             f"{' | '.join(f'{label} / anomalib' for label in labels)} |", "|---" * (2 + 2 * len(labels)) + "|"]
    for label, key, style in rows:
        lines.append(f"| {label} | {style.format(peer[key])} | {' | '.join(style.format(run[key]) for run in ours)} | "
                     f"{' | '.join(f'{run[key] / peer[key]:.2f}' for run in ours)} |")
    used = " | ".join(f"{run['n_fit']} (+{run['n_held_out']} held out)" for run in ours)
    lines.append(f"| Training images used | {peer['n_train']} | {used} |{' - |' * len(ours)}")
    extraction = " | ".join(f"{run['feature_seconds']:.1f}" if run["cache"] else "-" for run in ours)
    lines.append(f"| One-time feature extraction (s) | - | {extraction} |{' - |' * len(ours)}")
    return "\n".join(lines)


def workers_note(config: Config, cached: dict[str, Any]) -> str:
    """How our side's training ran: one process, and with ``--stage_workers`` also side by side."""
    if config.stage_workers == 1:
        return "Ours trains the stages one after the other in one process (--stage_workers 1). "
    return (f"Ours trains the stages one after the other in one process, and (cached features only) in "
            f"{config.stage_workers} processes side by side, stage groups {cached['stage_groups']} (--stage_workers). ")


def header(config: Config, peer: dict[str, Any], cached: dict[str, Any]) -> str:
    matched = config.fiber_batch == ANOMALIB_FIBER_BATCH and config.lr == ANOMALIB_LR
    ours_setting = "set to anomalib's" if matched else "--fiber_batch 64 --lr 1e-4 would match anomalib's"
    return (f"{dataset_label(config)}, read by anomalib's {peer['data_note']}; {peer['n_test']} test images. "
            f"{config.backbone} stages {','.join(cached['stages'])} at {config.img_size} px, {config.epochs} epoch(s), "
            f"image batch {config.batch_size}, {config.n_flow_layers} coupling blocks, clamp {config.clamp:g}. "
            f"Adam fibers per step / lr: anomalib {ANOMALIB_FIBER_BATCH} / {ANOMALIB_LR:g} (its defaults), ours "
            f"{config.fiber_batch} / {config.lr:g} ({ours_setting}; the cflow method defaults are 256 / 2e-4). "
            f"Training images: anomalib trains on all {peer['n_train']}; ours holds out {cached['n_held_out']} "
            f"(val_fraction {config.val_fraction:g}, for the kept epoch and the threshold) and fits on "
            f"{cached['n_fit']}. Our maps normalised on {config.map_norm}; metrics of both sides by our metrics.py "
            f"against our masks. torch threads: anomalib {peer['threads']}, ours {cached['threads']}; "
            f"{config.num_workers} loader workers. {workers_note(config, cached)}"
            f"CPU seconds are the processes', all threads (with other jobs on the machine and more than one thread "
            f"they include spin-waiting).")


def require_anomalib() -> None:
    """Stop before any work when anomalib is not importable (it runs in a child process)."""
    if importlib.util.find_spec("anomalib") is None:
        raise SystemExit("error: anomalib is not installed in this Python; pip install anomalib in a separate "
                         "environment with --system-site-packages and a constraint torch==2.14.1, and run this "
                         "script with that environment's python")


def main() -> None:
    import torch

    config = parse_args(sys.argv[1:])
    if config.method != "cflow":
        raise SystemExit("error: give a CFLOW preset (e.g. --preset cflow_lite0)")
    if config.dataset not in ("mvtec", "folder"):
        raise SystemExit("error: --dataset mvtec (one --classes category) or --dataset folder")
    if config.dataset == "mvtec" and len(config.class_list() or []) != 1:
        raise SystemExit("error: give one --classes category with --dataset mvtec")
    if config.max_train_per_class or config.max_test:
        raise SystemExit("error: anomalib reads the full splits; drop --max_train_per_class / --max_test")
    require_anomalib()
    load_tasks(config)  # a missing or malformed data root stops here, before either side runs
    config = replace(config, threads=config.threads or torch.get_num_threads())  # the same count on both sides
    print(describe(config))
    peer = in_child(anomalib_cflow, config)
    cached = in_child(ours, config)
    runs = {f"ours (cache, {config.stage_workers} processes)": cached} if config.stage_workers > 1 else {}
    runs["ours (cache)"] = in_child(ours, replace(config, stage_workers=1)) if runs else cached
    runs["ours (cache=false)"] = in_child(ours, replace(config, cache=False, stage_workers=1))
    text = f"{header(config, peer, cached)}\n\n{table(peer, runs)}\n"
    print("\n" + text)


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
