"""SANF-AD ablation in one table: Gaussian, kNN, SANF without CAFF, SANF with CAFF over the last stage,
SANF with CAFF over texture tokens, on every dataset given; image AUROC, mean ± std over seeds.

    python bench/ablation.py --cifar10 DATA/cifar10 --mvtec DATA/mvtec_ad_512 --magnetic_tile DATA/magnetic_tile
    python bench/ablation.py --seeds 0,1,2 --cifar_max_train 300 --cifar_max_test 1000 ...   # a quicker CIFAR-10 protocol
    python bench/ablation.py --cifar10 DATA/cifar10 --seeds 1,2 --variants gaussian,knn,none,caff_texture   # some rows

Every row runs ``main.run`` with the method's own defaults (no preset training values): EfficientNet-Lite0
features, ``token_norm power`` for every method alike, 10% of the normal training images held out for
every method. Seeds change the held-out split, the flow's initialisation and shuffling; kNN and the
Gaussian depend on the seed only through the held-out split. Digits always run (offline); the other
datasets run when their folder is given. The table goes to stdout and ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import make_config  # noqa: E402
from main import run  # noqa: E402
from utils import atomic_write_bytes  # noqa: E402

# short name (for --variants) → (row label, settings)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gaussian": ("Gaussian (Ledoit-Wolf)", {"method": "gaussian"}),
    "knn": ("kNN (k=2, cosine)", {"method": "knn"}),
    "none": ("SANF, no CAFF", {"method": "sanf", "fusion": "none"}),
    "caff_last": ("SANF, CAFF over the last stage", {"method": "sanf", "fusion": "caff", "texture_layers": "last",
                                                      "caff_context": "full"}),
    "caff_texture": ("SANF, CAFF over texture tokens (stride 16)",
                     {"method": "sanf", "fusion": "caff", "texture_layers": "auto"}),
}


def datasets(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Name → data settings (no training values: every method keeps its own defaults)."""
    lite0 = dict(backbone="tf_efficientnet_lite0", token_norm="power")
    chosen = {"digits": dict(dataset="digits", img_size=64, patch_grid=2, **lite0)}
    if args.cifar10:
        quick = [f"{args.cifar_max_train} train/class"] * bool(args.cifar_max_train) + \
            [f"{args.cifar_max_test} test"] * bool(args.cifar_max_test)
        name = "CIFAR-10" + (f" ({', '.join(quick)})" if quick else "")
        chosen[name] = dict(dataset="cifar10", data_root=args.cifar10, img_size=224, patch_grid=3,
                            max_train_per_class=args.cifar_max_train, max_test=args.cifar_max_test, **lite0)
    if args.mvtec:
        chosen["bottle"] = dict(dataset="folder", data_root=str(Path(args.mvtec) / "bottle"), img_size=224,
                                patch_grid=3, **lite0)
    if args.magnetic_tile:
        chosen["magnetic tile"] = dict(dataset="folder", data_root=args.magnetic_tile, img_size=224, patch_grid=3,
                                       **lite0)
    return chosen


def mean_auroc(settings: dict[str, Any], seed: int, cache_dir: str) -> tuple[float, float]:
    """Mean image AUROC over the dataset's tasks, and the run's seconds."""
    with tempfile.TemporaryDirectory() as results:
        config = make_config("demo", **settings, seed=seed, cache_dir=cache_dir, results_dir=results)
        started = time.perf_counter()
        payload = run(config)
        return payload["mean"]["image_auroc"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/ablation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar10", help="CIFAR-10 folder (full protocol unless --cifar_max_train)")
    parser.add_argument("--cifar_max_train", type=int, default=0, help="training images per class (0 = all)")
    parser.add_argument("--cifar_max_test", type=int, default=0, help="test images, a seeded subset (0 = all 10,000)")
    parser.add_argument("--mvtec", help="MVTec AD folder holding bottle/")
    parser.add_argument("--magnetic_tile", help="magnetic-tile folder (MVTec layout)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated rows among " + ", ".join(VARIANTS))
    parser.add_argument("--cache_dir", default="cache", help="feature cache shared by all rows")
    parser.add_argument("--out", default="results/bench_ablation.md", help="markdown table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose among {', '.join(VARIANTS)}")
    chosen = datasets(args)
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for variant, overrides in (VARIANTS[key] for key in args.variants.split(",")):
        table[variant] = {}
        for name, settings in chosen.items():
            runs = [mean_auroc({**settings, **overrides}, seed, args.cache_dir) for seed in seeds]
            aurocs = [auroc for auroc, _ in runs]
            spread = float(np.std(aurocs, ddof=1)) if len(aurocs) > 1 else 0.0  # sample std; 0 for one seed
            table[variant][name] = (float(np.mean(aurocs)), spread, float(np.mean([s for _, s in runs])))
            print(f"{variant} / {name}: {table[variant][name][0]:.4f} ± {table[variant][name][1]:.4f}", flush=True)
    header = "| method | " + " | ".join(chosen) + " |"
    lines = [header, "|---" * (len(chosen) + 1) + "|"]
    for variant, cells in table.items():
        lines.append(f"| {variant} | " + " | ".join(f"{m:.4f} ± {s:.4f} ({t:.0f} s)" for m, s, t in cells.values())
                     + " |")
    text = (f"Image AUROC, mean ± sample std (n - 1) over seeds {seeds} (seconds per run in brackets); "
            "EfficientNet-Lite0, token_norm power for every method, 10% of the normal training images held out "
            "for every method.\n\n"
            + "\n".join(lines) + "\n")
    atomic_write_bytes(Path(args.out), text.encode())
    print("\n" + text)


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
