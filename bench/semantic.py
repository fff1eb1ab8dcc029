"""Semantic one-class AD: SANF-AD with and without CAFF against kNN and Gaussian, on one feature cache.

    python bench/semantic.py --preset sanf_cifar10_lite0 --data_root DATA
    python bench/semantic.py --preset sanf_cifar10_lite0 --data_root DATA --backbone NAME --weights FILE

Runs ``main.py``'s job four times on the same cached features (extracting what the cache lacks
first, timed separately): SANF-AD with CAFF, SANF-AD without CAFF (``fusion=none``), kNN and the
Gaussian baseline, every one with the settings of the given preset/overrides (epochs: at most ``epochs``, the best
held-out epoch kept). Prints a markdown table (per-class and mean AUROC, training and scoring seconds, ratios
against kNN) and writes it to ``<results_dir>/bench_semantic.md``; each method's full results stay
in its own ``results_dir`` folder.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, describe, parse_args  # noqa: E402
from extractor import cache_folder, extract_all, folder_bytes  # noqa: E402
from main import EXPECTED_ERRORS, run  # noqa: E402
from report import method_label  # noqa: E402
from utils import atomic_write_bytes, configure_torch, run_cli  # noqa: E402

METHODS: tuple[dict[str, str], ...] = ({"method": "sanf", "fusion": "caff"}, {"method": "sanf", "fusion": "none"},
                                       {"method": "knn"}, {"method": "gaussian"})


def method_rows(base: Config) -> list[tuple[Config, dict[str, Any]]]:
    """(config, results payload) of every compared method, run one after the other."""
    rows = []
    for overrides in METHODS:
        config = replace(base, **overrides)
        print(f"\n=== {method_label(config)} ===", flush=True)
        rows.append((config, run(config)))
    return rows


def _fit_seconds(payload: dict[str, Any]) -> float:
    """Seconds every class's fit took (whitening, covariance or training; the held-out passes included)."""
    return sum(m["fit_seconds"] for m in payload["per_class"].values())


def table(rows: list[tuple[Config, dict[str, Any]]]) -> str:
    names = list(rows[0][1]["per_class"])
    knn_mean = next(p["mean"]["image_auroc"] for c, p in rows if c.method == "knn")
    gaussian_fit = next(_fit_seconds(p) for c, p in rows if c.method == "gaussian")
    lines = ["| method | " + " | ".join(names) + " | mean AUROC | vs kNN | fit s | fit / Gaussian's | score s |",
             "|---" * (len(names) + 6) + "|"]
    for config, payload in rows:
        per_class, mean = payload["per_class"], payload["mean"]
        score_seconds = sum(m["score_seconds"] for m in per_class.values())
        lines.append(f"| {method_label(config)} | " + " | ".join(f"{per_class[n]['image_auroc']:.3f}" for n in names)
                     + f" | **{mean['image_auroc']:.4f}** | {mean['image_auroc'] - knn_mean:+.4f} | "
                     f"{_fit_seconds(payload):.1f} | {_fit_seconds(payload) / max(gaussian_fit, 1e-9):.1f}x | "
                     f"{score_seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    base = parse_args(sys.argv[1:])
    print(describe(base))
    configure_torch(base)
    started = time.perf_counter()
    extract_all(base)
    extract_seconds = time.perf_counter() - started
    rows = method_rows(base)
    total = time.perf_counter() - started
    first = rows[0][1]["per_class"][next(iter(rows[0][1]["per_class"]))]
    header = (f"{base.dataset} one-class protocol ({first['n_fit']} training images per class fitted, {first['n_held_out']} "
              f"held out for every method, {first['n_test']} test images), {base.backbone} at {base.img_size} px, patch grid {base.patch_grid}; SANF: "
              f"{base.n_flow_layers} flow layers, hidden {base.hidden}, {base.epochs} epochs at most (patience {base.patience}), "
              f"batch {base.batch_size}, lr {base.lr:g}, Adam betas ({base.beta1:g}, {base.beta2:g}) eps "
              f"{base.adam_eps:g}, weight decay {base.weight_decay:g}, score {base.score}; kNN k={base.knn_k}; "
              f"token_norm {base.token_norm} for every method. {torch.get_num_threads()} CPU threads.")
    footer = (f"Wall time: feature extraction (what the cache lacked) {extract_seconds:.0f} s, whole run "
              f"{total:.0f} s; cache {folder_bytes(cache_folder(base)) / 1e9:.2f} GB.")
    text = f"{header}\n\n{table(rows)}\n\n{footer}\n"
    atomic_write_bytes(Path(base.results_dir) / "bench_semantic.md", text.encode())
    print("\n" + text)


if __name__ == "__main__":
    run_cli(main, EXPECTED_ERRORS)
