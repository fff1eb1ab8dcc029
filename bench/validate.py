"""Choose SANF / baseline settings on the TRAINING split only, never on the test split.

Each class's cached training features are split in two with the seed: one part fits the detector
of that class, the held-out parts of all classes form a labelled validation set (the class itself
normal, every other class anomalous). Prints the mean validation AUROC of each setting given as a
``--grid`` of Python dicts of Config overrides::

    python bench/validate.py --preset demo --grid '[{"epochs": 0}, {"epochs": 10, "lr": 1e-4}]'
    python bench/validate.py --preset sanf_cifar10_lite0 --data_root DATA --max_train_per_class 1000 \\
        --grid '[{"epochs": 0}, {"epochs": 4}]' --normal_classes airplane,cat

``--normal_classes`` limits which classes are fitted in turn (the held-out set keeps all classes).

Needs the training caches, i.e. ``extractor.py`` run with the same preset first (or extracts them).
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, parse_args  # noqa: E402
from datasets import load_tasks  # noqa: E402
from extractor import FeatureExtractor, cached_features  # noqa: E402
from datasets import held_out_split  # noqa: E402
from metrics import image_auroc  # noqa: E402
from model import build_detector  # noqa: E402
from utils import pop_option  # noqa: E402


def fit_and_score(config: Config, train: dict[str, torch.Tensor], test: dict[str, torch.Tensor]) -> np.ndarray:
    """Anomaly scores of ``test`` from the detector of ``config`` fitted on ``train`` as main.py fits it
    (``val_fraction`` of ``train`` held out to pick the epoch); no files written."""
    fit_index, held_index = held_out_split(len(train["sem"]), config.val_fraction, config.seed)
    detector = build_detector(config)
    held = {k: v[held_index] for k, v in train.items()} if len(held_index) else None
    detector.fit({k: v[fit_index] for k, v in train.items()}, held, "validation")
    return detector.score(test)[0]


def validation_auroc(config: Config, features: dict[str, dict[str, torch.Tensor]], fit_fraction: float,
                     normal_classes: list[str] | None = None) -> list[float]:
    """Per class (all, or ``normal_classes``): fit on ``fit_fraction`` of its training features, AUROC on
    all classes' held-out rest."""
    rng = np.random.default_rng(config.seed)
    fit, held_out, held_out_class = {}, [], []
    for index, (name, arrays) in enumerate(features.items()):
        order = rng.permutation(len(arrays["sem"]))
        cut = int(len(order) * fit_fraction)
        fit[name] = {k: v[np.sort(order[:cut])] for k, v in arrays.items()}
        held_out.append({k: v[np.sort(order[cut:])] for k, v in arrays.items()})
        held_out_class += [index] * (len(order) - cut)
    validation = {k: torch.cat([part[k] for part in held_out]) for k in held_out[0]}
    labels = np.asarray(held_out_class)
    aurocs = []
    for index, name in enumerate(features):
        if normal_classes and name not in normal_classes:
            continue
        aurocs.append(image_auroc(labels != index, fit_and_score(config, fit[name], validation)))
    return aurocs



def main() -> None:
    argv = sys.argv[1:]
    grid_text = pop_option(argv, "--grid", "[{}]")
    normal_classes = [n for n in pop_option(argv, "--normal_classes", "").split(",") if n]
    base = parse_args(argv)
    tasks = load_tasks(base)
    extractor = FeatureExtractor(base)
    raw = {task.name: cached_features(extractor, task.train, task.train_key, base) for task in tasks}
    for overrides in ast.literal_eval(grid_text):
        config = Config(**{**base.to_dict(), **overrides})
        started = time.perf_counter()
        features = {name: {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
                    for name, arrays in raw.items()}
        aurocs = validation_auroc(config, features, 0.5, normal_classes)
        print(f"{overrides}: validation AUROC mean {np.mean(aurocs):.4f} "
              f"({' '.join(f'{a:.3f}' for a in aurocs)}) in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
