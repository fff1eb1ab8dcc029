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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from baselines import GaussianScorer, KNNScorer
from config import Config, ConfigError, describe, parse_args
from datasets import DataError, Task, load_tasks
from extractor import CacheError, FeatureExtractor, WeightsError, task_features
from metrics import image_auroc
from model import SANFModel
from utils import atomic_torch_save, atomic_write_json, atomic_write_bytes, configure_torch, run_cli, seed_everything

SELECTION_NOTE = "fixed number of epochs; no epoch, threshold or setting was selected on the test set"


class TrainingError(RuntimeError):
    """Training that cannot go on (non-finite loss, a checkpoint that does not fit)."""


def results_folder(config: Config) -> Path:
    name = f"{config.dataset}-{config.backbone}-{config.method}"
    if config.method == "sanf":
        name += f"-{config.fusion}"
    return Path(config.results_dir) / name.replace("/", "_")


def as_tensors(features: dict[str, np.ndarray], device: str) -> dict[str, Tensor]:
    return {name: torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device) for name, array in features.items()}


# ----------------------------------------------------------------------------- SANF


def build_sanf(config: Config, dim: int, n_tokens: int) -> SANFModel:
    return SANFModel(dim, n_tokens, n_layers=config.n_flow_layers, hidden=config.hidden, heads=config.heads,
                     clamp=config.clamp, context=config.caff_context, fusion=config.fusion == "caff",
                     seed=config.seed)


def train_sanf(model: SANFModel, train: dict[str, Tensor], config: Config, name: str) -> dict[str, float]:
    """Fixed-epoch maximum-likelihood training; returns loss and throughput figures."""
    generator = seed_everything(config.seed)
    model.fit_standardization(train["sem"], train["patches"])
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


def write_results(config: Config, folder: Path, per_class: dict[str, dict[str, Any]], wall: dict[str, float],
                  table: Callable[[Config, dict, dict], str], complete: bool) -> dict[str, Any]:
    metric_names = [k for k, v in next(iter(per_class.values())).items() if isinstance(v, float)]
    mean = {k: float(np.mean([m[k] for m in per_class.values()])) for k in metric_names}
    payload = {"per_class": per_class, "mean": mean, "config": config.to_dict(), "wall_seconds": wall,
               "selection": SELECTION_NOTE, "complete": complete}
    atomic_write_json(folder / "results.json", payload)
    settings = (f"{config.dataset}, {config.backbone} ({config.img_size} px), "
                f"{len(per_class)} {'classes' if config.method != 'cflow' else 'categories'}; "
                f"image AUROC{'' if config.method != 'cflow' else ' and localisation metrics'}; {SELECTION_NOTE}.")
    markdown = f"{table(config, per_class, mean)}\n\n{settings}\n"
    atomic_write_bytes(folder / "results.md", markdown.encode())
    return payload


RUNNERS = {"sanf": run_sanf, "knn": run_baseline, "gaussian": run_baseline}


def run(config: Config) -> dict[str, Any]:
    """The whole job; returns the results.json payload."""
    started = time.perf_counter()
    configure_torch(config)
    tasks = load_tasks(config)
    extractor = FeatureExtractor(config).to(config.device)
    folder = results_folder(config)
    per_class: dict[str, dict[str, Any]] = {}
    wall = {"features": 0.0, "methods": 0.0}
    runner = RUNNERS[config.method]
    payload: dict[str, Any] = {}
    for task in tasks:
        step = time.perf_counter()
        train, test = (as_tensors(f, config.device) for f in task_features(extractor, task, config))
        wall["features"] += time.perf_counter() - step
        step = time.perf_counter()
        scores, info = runner(config, task, train, test, folder)
        wall["methods"] += time.perf_counter() - step
        metrics = {"image_auroc": image_auroc(task.test_labels, scores), **info,
                   "n_train": len(task.train), "n_test": len(task.test)}
        per_class[task.name] = metrics
        print(f"{task.name}: image AUROC {metrics['image_auroc']:.4f} "
              f"(train {info['train_seconds']:.1f} s, score {info['score_seconds']:.1f} s)")
        save_histogram(scores, task.test_labels, f"{task.name}: {method_label(config)}, "
                       f"AUROC {metrics['image_auroc']:.3f}", folder / "figures" / f"scores_{task.name}.png")
        wall["total"] = time.perf_counter() - started
        payload = write_results(config, folder, per_class, wall, one_class_table, complete=False)
    payload = write_results(config, folder, per_class, wall, one_class_table, complete=True)
    print((folder / "results.md").read_text())
    print(f"results: {folder} (total {wall['total']:.1f} s)")
    return payload


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    print(describe(config))
    run(config)


if __name__ == "__main__":
    run_cli(main, (ConfigError, DataError, WeightsError, CacheError, TrainingError))
