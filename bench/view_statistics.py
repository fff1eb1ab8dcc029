"""One Gaussian for all views, or one per view: what the held-out normal training images say, beside the test figure.

    python bench/view_statistics.py --preset mtd_lite0 --data_root DATA/magnetic_tile --seeds 0,1,2 [--FIELD VALUE ...]

For each seed, on the preset's cached views (``--FIELD VALUE`` pairs go to the configuration, e.g. ``--img_size
224``), the shrunk Gaussian of the fitted views' tokens (SANF-AD's whitened start and the Gaussian baseline) is fitted
pooled (``--view_statistics pooled``) and per view index (``per_view``), and each is judged three ways:

- held-out NLL: the mean negative log-likelihood per dimension of the held-out normal training images' views, with
  every log-determinant, up to the constant ln sqrt(2 pi) (SANF-AD's held-out curve with ``per_view`` starts there;
  with ``pooled`` it leaves out the constant log|det W|); lower is better;
- synthetic AUROC: held-out normal images against ``DEFECT_COPIES`` synthetic defective copies of each
  (``synthetic.py``, local defects), scored as the detectors score (the mean over the test views);
- test AUROC: the test split's, for the table only; nothing here is chosen on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines import ViewWhitening  # noqa: E402
from config import parse_args  # noqa: E402
from datasets import held_out_split, load_tasks  # noqa: E402
from extractor import FeatureExtractor, image_batches  # noqa: E402
from main import token_features  # noqa: E402
from model import DEFECT_COPIES, flat_views, normalise_tokens  # noqa: E402
from synthetic import synthetic_defects  # noqa: E402
from utils import to_numpy  # noqa: E402


def fitted(tokens: torch.Tensor, views: int, per_view: bool) -> ViewWhitening:
    """The shrunk Gaussian of flat fit tokens (M * V, D), an image's views next to each other."""
    view = torch.arange(len(tokens)) % views
    whitening = ViewWhitening(views if per_view else 1, tokens.shape[-1])
    whitening.fit(tokens, view if per_view else torch.zeros_like(view))
    return whitening


def nll_per_dim(whitening: ViewWhitening, tokens: torch.Tensor, per_view: bool) -> torch.Tensor:
    """NLL per dimension (M,) of each image's views (M, V, D), averaged over its views (up to ln sqrt(2 pi))."""
    images, views, dim = tokens.shape
    view = torch.arange(images * views) % views if per_view else torch.zeros(images * views, dtype=torch.long)
    whitened = whitening(tokens.reshape(-1, dim), view)
    nll = 0.5 * whitened.square().sum(dim=1) - whitening.log_det[view]
    return (nll / dim).view(images, views).mean(dim=1)


def one_seed(argv: list[str], seed: int) -> dict[str, dict[str, float]]:
    config = parse_args([*argv, "--seed", str(seed)])
    task = load_tasks(config)[0]
    extractor = FeatureExtractor(config)
    fit_index, held_index = held_out_split(len(task.train), config.val_fraction, config.seed)
    fit, held, test = token_features(config, task, extractor, fit_index, held_index, {})
    images = torch.cat(list(image_batches(task.train.subset(held_index), config)))
    defects = torch.cat([synthetic_defects(images, seed=config.seed + copy)[0] for copy in range(DEFECT_COPIES)])
    with torch.no_grad():
        defect_sem = torch.cat([extractor.view_features(batch, config.view_set, config.test_views)["sem"].float()
                                for batch in defects.split(config.extract_batch_size)])

    def tokens(sem: torch.Tensor) -> torch.Tensor:
        sem = normalise_tokens(sem.float(), config.token_norm)
        return sem.unsqueeze(1) if sem.dim() == 2 else sem

    fit_sem = normalise_tokens(flat_views(fit)["sem"], config.token_norm)
    held_sem, test_sem, defect_sem = tokens(held["sem"]), tokens(test["sem"]), tokens(defect_sem)
    rows = {}
    for name, per_view in (("pooled", False), ("per_view", True)):
        whitening = fitted(fit_sem, config.train_views, per_view)
        held_scores, defect_scores = nll_per_dim(whitening, held_sem, per_view), nll_per_dim(whitening, defect_sem,
                                                                                             per_view)
        synthetic = roc_auc_score(np.r_[np.zeros(len(held_scores)), np.ones(len(defect_scores))],
                                  to_numpy(torch.cat((held_scores, defect_scores)).double()))
        rows[name] = {"held_out_nll": float(held_scores.mean()), "synthetic_auroc": float(synthetic),
                      "test_auroc": float(roc_auc_score(task.test_labels,
                                                        to_numpy(nll_per_dim(whitening, test_sem, per_view).double())))}
        print(f"seed {seed} {name}: " + ", ".join(f"{key} {value:.4f}" for key, value in rows[name].items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/view_statistics.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args, rest = parser.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [one_seed(rest, seed) for seed in seeds]
    lines = ["| statistics | held-out NLL per dim | synthetic-defect AUROC | test AUROC |", "|---|---|---|---|"]
    for name in ("pooled", "per_view"):
        cells = [", ".join(f"{result[name][key]:.4f}" for result in results)
                 for key in ("held_out_nll", "synthetic_auroc", "test_auroc")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nseeds {', '.join(map(str, seeds))} (one value per seed):\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
