"""Train and evaluate: ``python main.py [--preset NAME] [--field value ...]``.

For every task (normal class or category) of the configured dataset: take the cached features
(extracting what is missing), train the configured method for a fixed number of epochs, score the
test split and compute the metrics. Nothing is selected on the test set. Writes, under
``results_dir/<dataset>-<backbone>-<method>[-<fusion>]/``:

- ``results.json``: ``per_class`` -> metrics and wall times, ``mean``, the configuration;
- ``results.md``: the table in the paper's layout;
- ``checkpoints/<task>.pt`` (``--eval_only true`` rescores from them);
- one figure per task (score histogram; for CFLOW test images with their anomaly maps).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from anomaly_map import AnomalyMapGenerator, reference_from_training
from baselines import GaussianScorer, KNNScorer
from config import Config, ConfigError, describe, parse_args
from datasets import DataError, ImageList, Task, load_mask, load_tasks
from extractor import CacheError, FeatureExtractor, WeightsError, image_batches, task_features
from metrics import detection_and_localization, image_auroc
from model import CFlowModel, SANFModel, cflow_loss, shuffled_fiber_chunks
from utils import atomic_torch_save, atomic_write_json, atomic_write_bytes, configure_torch, run_cli, seed_everything

SELECTION_NOTE = "fixed number of epochs; no epoch, threshold or setting was selected on the test set"
MAP_NORM_NOTES = {
    "train": "maps normalised with the per-stage maximum of log p / C over the training fibers: a test image's "
             "score does not depend on the other test images",
    "test": "maps normalised over the whole test set (official code): every score depends on the rest of the test set",
    "batch": "maps normalised per test batch of test_batch_size images (anomalib): scores depend on the batch",
}


class TrainingError(RuntimeError):
    """Training that cannot go on (non-finite loss, a checkpoint that does not fit)."""


def results_folder(config: Config) -> Path:
    name = f"{config.dataset}-{config.backbone}-{config.method}"
    if config.method == "sanf":
        name += f"-{config.fusion}"
    return Path(config.results_dir) / name.replace("/", "_")


def normalise_tokens(tokens: Tensor, how: str) -> Tensor:
    """Per-token normalisation over the channel axis: none, l2 (unit length) or power (signed square root,
    then unit length). Applied to every method's features alike, so that comparisons stay fair."""
    if how == "power":
        tokens = tokens.sign() * tokens.abs().sqrt()
    if how in ("l2", "power"):
        tokens = torch.nn.functional.normalize(tokens, dim=-1)
    return tokens


def as_tensors(features: dict[str, np.ndarray], config: Config) -> dict[str, Tensor]:
    """Cached float16 token arrays → float32 tensors on the device, normalised by ``token_norm``."""
    return {name: normalise_tokens(torch.from_numpy(np.asarray(array, dtype=np.float32)).to(config.device),
                                   config.token_norm) for name, array in features.items()}


# ----------------------------------------------------------------------------- SANF


def build_sanf(config: Config, dim: int, n_tokens: int) -> SANFModel:
    try:
        return _sanf_model(config, dim, n_tokens)
    except ValueError as error:  # shapes that do not fit the flow's settings (heads, token_dim)
        raise ConfigError(str(error)) from None


def _sanf_model(config: Config, dim: int, n_tokens: int) -> SANFModel:
    return SANFModel(dim, n_tokens, n_layers=config.n_flow_layers, hidden=config.hidden, heads=config.heads,
                     clamp=config.clamp, context=config.caff_context, fusion=config.fusion == "caff",
                     seed=config.seed, token_dim=config.token_dim)


def train_sanf(model: SANFModel, train: dict[str, Tensor], config: Config, name: str) -> dict[str, float]:
    """Fixed-epoch maximum-likelihood training; returns loss and throughput figures."""
    generator = seed_everything(config.seed)
    if not all(torch.isfinite(tokens).all() for tokens in train.values()):
        raise TrainingError(f"non-finite training features for '{name}'; rebuild the cache "
                            "(extractor.py --refresh_cache true) and check --weights")
    model.fit_preprocessing(train["sem"])
    optimizer = torch.optim.Adam(model.flow.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                 weight_decay=config.weight_decay)
    n_train = len(train["sem"])
    model.train()
    started = time.perf_counter()
    loss_value = math.nan
    with tqdm(range(config.epochs), desc=f"{name} sanf", unit="epoch") as epochs:
        for epoch in epochs:
            losses = []
            for batch, index in enumerate(torch.randperm(n_train, generator=generator).split(config.batch_size)):
                loss = model.nll_per_dim(train["sem"][index], train["patches"][index]).mean()
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss at epoch {epoch + 1}, batch {batch + 1} of '{name}'; "
                                        f"lower --lr (now {config.lr}) or set --grad_clip 1")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.flow.parameters(), config.grad_clip)
                optimizer.step()
                losses.append(loss.item())
            loss_value = float(np.mean(losses))
            epochs.set_postfix(nll_per_dim=f"{loss_value:.4f}")
    seconds = time.perf_counter() - started
    return {"train_seconds": seconds, "final_train_nll_per_dim": loss_value,
            "train_images_per_second": n_train * config.epochs / max(seconds, 1e-9)}


@torch.no_grad()
def score_sanf(model: SANFModel, test: dict[str, Tensor], config: Config) -> Tensor:
    model.eval()
    batches = zip(test["sem"].split(1024), test["patches"].split(1024))
    return torch.cat([model.anomaly_score(sem, patches, config.score) for sem, patches in batches])


def run_sanf(config: Config, task: Task, train: dict[str, Tensor], test: dict[str, Tensor],
             folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    dim, n_tokens = train["sem"].shape[1], train["patches"].shape[1]
    model = build_sanf(config, dim, n_tokens).to(config.device)
    checkpoint = folder / "checkpoints" / f"{task.name}.pt"
    if config.eval_only:
        info = load_checkpoint(model, checkpoint, config)
    else:
        info = train_sanf(model, train, config, task.name)
        atomic_torch_save({"model": model.state_dict(), "config": config.to_dict(), "info": info}, checkpoint)
    started = time.perf_counter()
    scores = score_sanf(model, test, config).cpu().numpy()
    info["score_seconds"] = time.perf_counter() - started
    info["parameters"] = sum(p.numel() for p in model.flow.parameters())
    return scores, info


def load_checkpoint(model: torch.nn.Module, path: Path, config: Config) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"no checkpoint {path}; train first (without --eval_only)")
    saved = torch.load(path, map_location=config.device, weights_only=True)
    try:
        model.load_state_dict(saved["model"], strict=True)
    except RuntimeError:
        raise TrainingError(f"checkpoint {path} was trained with another model setting; retrain, or pass the "
                            "flow fields it was saved with") from None
    return dict(saved["info"])


# ----------------------------------------------------------------------------- baselines


def run_baseline(config: Config, task: Task, train: dict[str, Tensor], test: dict[str, Tensor],
                 folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    started = time.perf_counter()
    if config.method == "knn":
        scorer: KNNScorer | GaussianScorer = KNNScorer(config.knn_k).fit(train["sem"])
    else:
        scorer = GaussianScorer(config.gaussian_shrinkage).fit(train["sem"])
    info: dict[str, Any] = {"train_seconds": time.perf_counter() - started}
    if isinstance(scorer, GaussianScorer):
        info["shrinkage"] = scorer.used_shrinkage
    started = time.perf_counter()
    scores = scorer.score(test["sem"]).cpu().numpy()
    info["score_seconds"] = time.perf_counter() - started
    return scores, info


# ----------------------------------------------------------------------------- CFLOW


class StageFeatures:
    """Per-stage feature maps (B, C, H, W) of one image list, a batch of images at a time.

    Cached float16 arrays are converted once into float32 channels-last tensors, so that no epoch
    converts them again and a batch's fibers are a view of its maps (``CFlowModel.fibers_of``).
    Without the cache (``--cache false``) every batch goes through the backbone again, as in the
    official code and anomalib.
    """

    def __init__(self, images: ImageList, config: Config, arrays: dict[str, np.ndarray] | None = None,
                 extractor: FeatureExtractor | None = None) -> None:
        if (arrays is None) == (extractor is None):
            raise ValueError("give either the cached arrays or an extractor")
        self.images, self.config, self.extractor = images, config, extractor
        self.maps = None if arrays is None else {
            stage: torch.from_numpy(np.asarray(array, dtype=np.float32)).to(config.device)
            .contiguous(memory_format=torch.channels_last) for stage, array in arrays.items()}

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[dict[str, Tensor]]:
        """Feature maps of ``batch_size`` images at a time, in ``order`` (default: the listed order)."""
        order = torch.arange(len(self)) if order is None else order
        if self.maps is not None:
            for index in order.split(batch_size):
                yield {stage: maps[index.to(maps.device)] for stage, maps in self.maps.items()}
            return
        for images in image_batches(self.images.subset(order.numpy()), self.config, batch_size=batch_size):
            yield {stage: value.float() for stage, value in self.extractor(images).items()}

    def stage_channels(self) -> dict[str, int]:
        return {stage: feature_map.shape[1] for stage, feature_map in next(self.batches(1)).items()}


def cflow_features(extractor: FeatureExtractor, task: Task, config: Config) -> tuple[StageFeatures, StageFeatures]:
    """(train, test) stage features: from the cache (extracting what it lacks) or, with --cache false, on the fly."""
    if not config.cache:
        return (StageFeatures(task.train, config, extractor=extractor),
                StageFeatures(task.test, config, extractor=extractor))
    train, test = task_features(extractor, task, config)
    return StageFeatures(task.train, config, arrays=train), StageFeatures(task.test, config, arrays=test)


def build_cflow(config: Config, stage_channels: dict[str, int]) -> CFlowModel:
    return CFlowModel(stage_channels, condition_dims=config.condition_dims, n_blocks=config.n_flow_layers,
                      clamp=config.clamp, permute_soft=config.permute_soft, seed=config.seed)


def _fiber_step(model: CFlowModel, optimizer: torch.optim.Optimizer, stage: str, fibers: Tensor,
                conditions: Tensor, config: Config, where: str) -> float:
    """One optimizer step on one chunk of fibers; returns the chunk's loss."""
    loss = cflow_loss(model.fiber_log_likelihood_per_dim(stage, fibers, conditions))
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss at {where}, stage {stage}; lower --lr (now {config.lr}), raise "
                            f"--fiber_batch (now {config.fiber_batch}) or set --grad_clip 1")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.decoder(stage).parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()


def train_cflow(model: CFlowModel, train: StageFeatures, config: Config, name: str) -> dict[str, Any]:
    """Fixed-epoch training; returns the loss history and throughput figures.

    Per image batch and stage, all fibers of the batch are shuffled and cut into chunks of
    ``fiber_batch``, with one Adam step per chunk (official code: 256, anomalib: 64). The stages'
    decoders share one optimizer; a step only moves the decoder whose chunk it was.
    """
    generator = seed_everything(config.seed)
    fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel per step: about half the step time
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                 weight_decay=config.weight_decay, fused=fused)
    model.train()
    history: list[dict[str, float]] = []
    n_fibers = 0
    started = time.perf_counter()
    with tqdm(range(config.epochs), desc=f"{name} cflow", unit="epoch") as epochs:
        for epoch in epochs:
            loss_sums = dict.fromkeys(model.stage_names, 0.0)
            counts = dict.fromkeys(model.stage_names, 0)
            order = torch.randperm(len(train), generator=generator)
            for batch, features in enumerate(train.batches(config.batch_size, order)):
                where = f"epoch {epoch + 1}, image batch {batch + 1} of '{name}'"
                for stage, feature_map in features.items():
                    fibers, conditions = model.fibers_of(feature_map)
                    for chunk in shuffled_fiber_chunks(fibers, conditions, config.fiber_batch, generator):
                        loss = _fiber_step(model, optimizer, stage, *chunk, config, where)
                        loss_sums[stage] += loss * len(chunk[0])
                        counts[stage] += len(chunk[0])
            history.append({stage: loss_sums[stage] / max(counts[stage], 1) for stage in loss_sums})
            n_fibers += sum(counts.values())
            epochs.set_postfix(loss=" ".join(f"{value:.3f}" for value in history[-1].values()))
    seconds = time.perf_counter() - started
    return {"train_seconds": seconds, "seconds_per_epoch": seconds / max(config.epochs, 1),
            "train_fibers_per_second": n_fibers / max(seconds, 1e-9),
            "train_fibers_per_epoch": n_fibers // max(config.epochs, 1),
            "final_train_loss": float(np.mean(list(history[-1].values()))) if history else math.nan,
            "train_loss_per_epoch": history}


def _progress(features: StageFeatures, batch_size: int, desc: str) -> tqdm:
    return tqdm(features.batches(batch_size), desc=desc, total=math.ceil(len(features) / batch_size),
                unit="batch", leave=False)


@torch.no_grad()
def training_reference(model: CFlowModel, train: StageFeatures, config: Config) -> dict[str, float]:
    """Per-stage maximum of log p / C over the training fibers, once training has ended (map_norm=train)."""
    model.eval()
    batches = _progress(train, config.test_batch_size, "training reference")
    return reference_from_training(model.stage_log_likelihood_maps(features) for features in batches)


@torch.no_grad()
def stage_log_likelihoods(model: CFlowModel, features: StageFeatures, batch_size: int) -> dict[str, Tensor]:
    """log p / C maps (N, H_l, W_l) of every image, per stage, computed ``batch_size`` images at a time."""
    model.eval()
    batches = [model.stage_log_likelihood_maps(f) for f in _progress(features, batch_size, "scoring")]
    return {stage: torch.cat([maps[stage] for maps in batches]) for stage in model.stage_names}


def anomaly_maps(stage_maps: dict[str, Tensor], config: Config,
                 reference: dict[str, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) float64 and anomaly maps (N, S, S) float32 at img_size, under ``map_norm``.

    ``train`` maps each image with the training reference alone (needs ``reference``); ``test``
    normalises the whole test set at once (official code); ``batch`` each group of
    ``test_batch_size`` images (anomalib).
    """
    size = (config.img_size, config.img_size)
    generator = AnomalyMapGenerator(size, config.map_norm, reference if config.map_norm == "train" else None)
    count = len(next(iter(stage_maps.values())))
    group = count if config.map_norm == "test" else config.test_batch_size
    scores, maps = [], []
    for start in range(0, count, group):
        batch_maps = generator({stage: values[start:start + group] for stage, values in stage_maps.items()})
        scores.append(generator.image_scores(batch_maps).cpu().numpy())
        maps.append(batch_maps.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def score_cflow(model: CFlowModel, test: StageFeatures, config: Config,
                reference: dict[str, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly maps of the test images (see :func:`anomaly_maps`)."""
    return anomaly_maps(stage_log_likelihoods(model, test, config.test_batch_size), config, reference)


def load_test_masks(task: Task, size: int) -> np.ndarray | None:
    """Ground-truth masks (N, size, size), nearest-resized; None when the dataset has none."""
    if task.test_masks is None:
        return None
    return np.stack([load_mask(path, (size, size)) for path in task.test_masks])


def run_cflow(config: Config, task: Task, extractor: FeatureExtractor, folder: Path) -> dict[str, Any]:
    """Train (or load) one category's decoders, score its test images, write its figure; returns its metrics."""
    started = time.perf_counter()
    train, test = cflow_features(extractor, task, config)
    feature_seconds = time.perf_counter() - started
    model = build_cflow(config, test.stage_channels()).to(config.device)
    checkpoint = folder / "checkpoints" / f"{task.name}.pt"
    if config.eval_only:
        info = load_checkpoint(model, checkpoint, config)
        if "training_reference" not in info:
            raise TrainingError(f"checkpoint {checkpoint} holds no training reference; retrain without --eval_only")
    else:
        info = train_cflow(model, train, config, task.name)
        info["training_reference"] = training_reference(model, train, config)
        atomic_torch_save({"model": model.state_dict(), "config": config.to_dict(), "info": info}, checkpoint)
    started = time.perf_counter()
    scores, maps = score_cflow(model, test, config, info["training_reference"])
    info["score_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    masks = load_test_masks(task, config.img_size)
    metrics = detection_and_localization(task.test_labels, scores, masks, None if masks is None else maps)
    metrics_seconds = time.perf_counter() - started
    save_map_figure(task, scores, maps, masks, config, folder / "figures" / f"maps_{task.name}.png")
    metrics = {**metrics, **info, "feature_seconds": feature_seconds, "metrics_seconds": metrics_seconds,
               "map_normalization": config.map_norm, "parameters": sum(p.numel() for p in model.parameters()),
               "n_train": len(task.train), "n_test": len(task.test)}
    localisation = (f", pixel AUROC {metrics['pixel_auroc']:.4f}, AUPRO@0.3 {metrics['aupro']:.4f}"
                    if "pixel_auroc" in metrics else "")
    print(f"{task.name}: image AUROC {metrics['image_auroc']:.4f}{localisation}, image F1 "
          f"{metrics['image_f1']:.4f} (maps normalised on {config.map_norm}); train "
          f"{metrics['train_seconds']:.1f} s = {metrics['seconds_per_epoch']:.2f} s/epoch, "
          f"{metrics['train_fibers_per_second']:.0f} fibers/s; score {metrics['score_seconds']:.1f} s")
    return metrics




# ----------------------------------------------------------------------------- outputs


def save_histogram(scores: np.ndarray, labels: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    bins = np.histogram_bin_edges(scores, bins=60)
    axis.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label="normal")
    axis.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label="anomalous")
    axis.set_xlabel("anomaly score")
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _evenly_spaced(members: np.ndarray, count: int) -> np.ndarray:
    return members[np.linspace(0, len(members) - 1, count).round().astype(int)] if count else members[:0]


def figure_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """About half defective and half good test images, evenly spaced in test order; no score is looked at."""
    defective, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_defective = min(len(defective), max((count + 1) // 2, count - len(good)))
    n_good = min(len(good), count - n_defective)
    return np.concatenate([_evenly_spaced(defective, n_defective), _evenly_spaced(good, n_good)])


def save_map_figure(task: Task, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray | None, config: Config,
                    path: Path) -> None:
    """One row per drawn test image: the image, its ground truth, the anomaly map over the image.

    Every overlay uses the same colour scale, from the median to the maximum of all test-map pixels,
    so rows compare and the mostly normal pixels below the median stay blue.
    """
    indices = figure_indices(task.test_labels, config.n_figure_images)
    if not len(indices):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    size = config.img_size
    low, high = float(np.median(maps)), float(maps.max())
    figure, axes = plt.subplots(len(indices), 3, figsize=(7.2, 2.5 * len(indices)), squeeze=False)
    for row, index in zip(axes, indices):
        image = np.asarray(task.test.load(index).resize((size, size), Image.BICUBIC))
        truth = np.zeros((size, size), dtype=bool) if masks is None else masks[index]
        row[0].imshow(image)
        row[0].set_title(task.test.ids[index], fontsize=7)
        row[1].imshow(truth, cmap="gray", vmin=0, vmax=1)
        row[1].set_title("ground truth" if masks is not None else "no ground truth", fontsize=7)
        row[2].imshow(image)
        row[2].imshow(maps[index], cmap="jet", alpha=0.5, vmin=low, vmax=high)
        row[2].set_title(f"anomaly map, image score {scores[index]:.3f}", fontsize=7)
        for axis in row:
            axis.axis("off")
    figure.suptitle(f"{task.name}: {method_label(config)}\ncolour scale {low:.3f} (blue) to {high:.3f} (red): "
                    "median to maximum of all test-map pixels", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def method_label(config: Config) -> str:
    if config.method == "sanf":
        fusion = "CAFF" if config.fusion == "caff" else "no CAFF"
        return f"SANF-AD ({fusion}, score {config.score})"
    if config.method == "knn":
        return f"kNN (k={config.knn_k}, cosine)"
    if config.method == "gaussian":
        return "Gaussian (Mahalanobis)"
    return f"CFLOW-AD (maps normalised on {config.map_norm})"


def one_class_table(config: Config, per_class: dict[str, dict[str, Any]], mean: dict[str, float]) -> str:
    """Classes as columns, mean last (the SANF-AD paper's Table 2)."""
    names = list(per_class)
    header = "| method | " + " | ".join(names) + " | mean |"
    rule = "|---" * (len(names) + 2) + "|"
    row = (f"| {method_label(config)} | " + " | ".join(f"{per_class[n]['image_auroc']:.3f}" for n in names)
           + f" | **{mean['image_auroc']:.3f}** |")
    return "\n".join([header, rule, row])


CFLOW_ROWS = (("image_auroc", "Image AUROC", "{:.3f}"), ("pixel_auroc", "Pixel AUROC", "{:.3f}"),
              ("aupro", "AUPRO@0.3", "{:.3f}"), ("image_f1", "Image F1-max", "{:.3f}"),
              ("pixel_f1", "Pixel F1-max", "{:.3f}"), ("seconds_per_epoch", "Train s/epoch", "{:.1f}"),
              ("train_fibers_per_second", "Train fibers/s", "{:.0f}"))


def cflow_table(config: Config, per_class: dict[str, dict[str, Any]], mean: dict[str, float]) -> str:
    """anomalib's layout: metrics as rows, categories as columns, the average first."""
    names = list(per_class)
    lines = [f"{method_label(config)}", "", "| Metric | Average | " + " | ".join(names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for key, label, style in CFLOW_ROWS:
        if key in mean:
            values = " | ".join(style.format(per_class[name][key]) for name in names)
            lines.append(f"| {label} | **{style.format(mean[key])}** | {values} |")
    return "\n".join(lines)


def write_results(config: Config, folder: Path, per_class: dict[str, dict[str, Any]], wall: dict[str, float],
                  table: Callable[[Config, dict, dict], str], complete: bool,
                  notes: dict[str, Any] | None = None) -> dict[str, Any]:
    metric_names = [k for k, v in next(iter(per_class.values())).items() if isinstance(v, float)]
    mean = {k: float(np.mean([m[k] for m in per_class.values()])) for k in metric_names}
    payload = {"per_class": per_class, "mean": mean, "config": config.to_dict(), "wall_seconds": wall,
               "selection": SELECTION_NOTE, "complete": complete, **(notes or {})}
    atomic_write_json(folder / "results.json", payload)
    noun = ("category", "categories") if config.method == "cflow" else ("class", "classes")
    settings = (f"{config.dataset}, {config.backbone} ({config.img_size} px), "
                f"{len(per_class)} {noun[len(per_class) != 1]}; "
                f"image AUROC{'' if config.method != 'cflow' else ' and localisation metrics'}; {SELECTION_NOTE}.")
    markdown = f"{table(config, per_class, mean)}\n\n{settings}\n"
    atomic_write_bytes(folder / "results.md", markdown.encode())
    return payload


RUNNERS = {"sanf": run_sanf, "knn": run_baseline, "gaussian": run_baseline}


def run_one_class(config: Config, task: Task, extractor: FeatureExtractor, folder: Path,
                  shared_test: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
    """Fit SANF or a baseline on one normal class, score the test split; returns its metrics.

    ``shared_test`` keeps the last test split as tensors: the classes of a one-class protocol share
    it, so it is converted once per run, not once per class.
    """
    started = time.perf_counter()
    train_arrays, test_arrays = task_features(extractor, task, config)
    train = as_tensors(train_arrays, config)
    if task.test_key not in shared_test:
        shared_test.clear()
        shared_test[task.test_key] = as_tensors(test_arrays, config)
    feature_seconds = time.perf_counter() - started
    scores, info = RUNNERS[config.method](config, task, train, shared_test[task.test_key], folder)
    metrics = {"image_auroc": image_auroc(task.test_labels, scores), **info, "feature_seconds": feature_seconds,
               "n_train": len(task.train), "n_test": len(task.test)}
    print(f"{task.name}: image AUROC {metrics['image_auroc']:.4f} "
          f"(train {info['train_seconds']:.1f} s, score {info['score_seconds']:.1f} s)")
    save_histogram(scores, task.test_labels, f"{task.name}: {method_label(config)}, "
                   f"AUROC {metrics['image_auroc']:.3f}", folder / "figures" / f"scores_{task.name}.png")
    return metrics


def run(config: Config) -> dict[str, Any]:
    """The whole job, every task in turn; returns the results.json payload (rewritten after each task)."""
    started = time.perf_counter()
    configure_torch(config)
    tasks = load_tasks(config)
    extractor = FeatureExtractor(config)
    folder = results_folder(config)
    if config.method == "cflow":
        table: Callable[[Config, dict, dict], str] = cflow_table
        notes = {"map_normalization": config.map_norm, "map_normalization_note": MAP_NORM_NOTES[config.map_norm]}
        run_task = partial(run_cflow, config, extractor=extractor, folder=folder)
    else:
        table, notes = one_class_table, None
        run_task = partial(run_one_class, config, extractor=extractor, folder=folder, shared_test={})
    per_class: dict[str, dict[str, Any]] = {}
    wall = {"features": 0.0, "methods": 0.0}
    for task in tasks:
        step = time.perf_counter()
        metrics = per_class[task.name] = run_task(task)
        wall["features"] += metrics["feature_seconds"]
        wall["methods"] += time.perf_counter() - step - metrics["feature_seconds"]
        wall["total"] = time.perf_counter() - started
        write_results(config, folder, per_class, wall, table, complete=False, notes=notes)
    payload = write_results(config, folder, per_class, wall, table, complete=True, notes=notes)
    print((folder / "results.md").read_text())
    print(f"results: {folder} (total {wall['total']:.1f} s)")
    return payload


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    print(describe(config))
    run(config)


if __name__ == "__main__":
    run_cli(main, (ConfigError, DataError, WeightsError, CacheError, TrainingError))
