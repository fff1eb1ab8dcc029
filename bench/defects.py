"""CFLOW-AD on the defect sets, beside anomalib's Cflow and the image-level baselines, in one run.

    python bench/defects.py --epochs 3                          # every defect set in ../shared/data
    python bench/defects.py --sets magnetic_tile --epochs 3 --skip_anomalib
    python bench/defects.py --layers blocks.1,blocks.2,blocks.4,blocks.6 --skip_anomalib --skip_baselines

Defect sets: MVTec AD bottle (``ANOMALY_MVTEC_ROOT``/bottle) and the magnetic tile folder
(``ANOMALY_MAGNETIC_TILE_ROOT``), each read as an MVTec-layout folder (``--dataset folder``). Every
other flag is a ``main.py`` flag; the defaults are ``--preset cflow_lite0 --scoring auto``.

Per set, one table: our CFLOW trained once and scored under the image-score rule ``scoring auto``
chose on training data (held-out normal images + synthetic defects; the anomaly map, hence the
pixel metrics, is the paper's either way), under the paper's rule with the official normalisation
(exp/max, whole test set) and with anomalib's (exp/max, per batch); anomalib's
``Cflow`` with the same backbone weights, stages, size, flows and epochs (its own optimiser setting,
``bench/peer_anomalib.py``); kNN and Gaussian on the same backbone's pooled features. Metrics of
every row by this repository's ``metrics.py`` against the same masks. Rules are never chosen on
these numbers: they only report what each rule gives.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, describe, parse_args  # noqa: E402
from bench.peer_anomalib import anomalib_cflow, in_child, peak_memory_gb, require_anomalib  # noqa: E402

SETS = {"bottle": ("ANOMALY_MVTEC_ROOT", "bottle"), "magnetic_tile": ("ANOMALY_MAGNETIC_TILE_ROOT", "")}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def set_roots(names: list[str]) -> dict[str, Path]:
    roots = {}
    for name in names:
        variable, sub = SETS[name]
        if not os.environ.get(variable):
            print(f"skipping {name}: {variable} is not set")
            continue
        roots[name] = Path(os.environ[variable]) / sub
    return roots


def ours(config: Config) -> list[dict[str, Any]]:
    """Train once (scoring auto), then rescore the same checkpoint under the official and anomalib rules."""
    from anomaly_map import ScoringRule
    from datasets import held_out_split, load_tasks
    from extractor import FeatureExtractor
    from main import evaluate, load_test_masks, results_folder, run, stage_features
    from model import load_detector

    with tempfile.TemporaryDirectory() as folder:
        config = replace(config, cache_dir=f"{folder}/cache", results_dir=f"{folder}/results", n_figure_images=0)
        payload = run(config)
        metrics = next(iter(payload["per_class"].values()))
        task = load_tasks(config)[0]
        extractor = FeatureExtractor(config)
        fit_index, held_index = held_out_split(len(task.train), config.val_fraction, config.seed)
        test = stage_features(config, task, extractor, fit_index, held_index)[2]
        masks = load_test_masks(task, config.img_size)
        detector = load_detector(results_folder(config) / "checkpoints" / f"{task.name}.pt", extractor=extractor)
        common = {**{k: metrics[k] for k in ("seconds_per_epoch", "epochs_run", "kept_epoch")},
                  "peak_rss_gb": peak_memory_gb(metrics), "stages": extractor.layers}
        rows = [{"row": f"ours, scoring auto (chose {metrics['scoring_rule']})", **common,
                 **{k: metrics[k] for k in METRICS}}]
        for label, norm in (("official", "test"), ("anomalib", "batch")):
            detector.config = replace(detector.config, map_norm=norm)
            detector.rule = ScoringRule("exp", "max")
            scores, maps = detector.score(test)
            result = evaluate(task.test_labels, scores, masks, maps)
            rows.append({"row": f"ours, the paper's rule exp/max, {label} normalisation", **common,
                         **{k: result[k] for k in METRICS}})
        selection = sorted(metrics.get("scoring_selection", []), key=lambda r: -r["image_auroc"])
        rows[0]["selection"] = selection
    return rows


def baseline(config: Config) -> dict[str, Any]:
    from main import run

    with tempfile.TemporaryDirectory() as folder:
        payload = run(replace(config, cache_dir=f"{folder}/cache", results_dir=f"{folder}/results"))
    metrics = next(iter(payload["per_class"].values()))
    return {"row": f"{config.method} on pooled {config.backbone} features (image level)",
            "image_auroc": metrics["image_auroc"]}


def _cell(row: dict[str, Any], key: str, style: str) -> str:
    return style.format(row[key]) if key in row and row[key] is not None else "-"


def table(name: str, config: Config, rows: list[dict[str, Any]]) -> str:
    stages = ",".join(rows[0]["stages"])
    lines = [f"### {name}: {config.backbone} {stages} at {config.img_size} px, {config.epochs} epoch(s) at most", "", "| | image AUROC | pixel AUROC | AUPRO@0.3 | train s / epoch | epochs run (kept) | peak memory (GB) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        epochs = f"{row['epochs_run']} ({row['kept_epoch']})" if "kept_epoch" in row else "-"
        lines.append(f"| {row['row']} | {_cell(row, 'image_auroc', '{:.3f}')} | {_cell(row, 'pixel_auroc', '{:.3f}')} "
                     f"| {_cell(row, 'aupro', '{:.3f}')} | {_cell(row, 'seconds_per_epoch', '{:.1f}')} | {epochs} "
                     f"| {_cell(row, 'peak_rss_gb', '{:.2f}')} |")
    selection = rows[0].get("selection")
    if selection:
        paper = next(r for r in selection if r["rule"] == "exp/max")
        lines += ["", "`scoring auto`: image AUROC of the candidates on the held-out normal training images and 3 "
                  "synthetic defective copies of each, best first: " + "; ".join(
                      f"{r['rule']} {r['image_auroc']:.3f}" for r in selection[:6])
                  + f"; the paper's exp/max {paper['image_auroc']:.3f}."]
    return "\n".join(lines)


def main() -> None:
    own = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    own.add_argument("--sets", default=",".join(SETS), help="comma-separated among " + ", ".join(SETS))
    own.add_argument("--skip_anomalib", action="store_true")
    own.add_argument("--skip_baselines", action="store_true")
    args, rest = own.parse_known_args()
    unknown = sorted(set(args.sets.split(",")) - set(SETS))
    if unknown:
        raise SystemExit(f"error: unknown --sets {', '.join(unknown)}; choose among {', '.join(SETS)}")
    base = parse_args(["--preset", "cflow_lite0", "--dataset", "folder", "--scoring", "auto", *rest])  # --help here
    if not args.skip_anomalib:
        require_anomalib()
    roots = set_roots(args.sets.split(","))
    if not roots:
        raise SystemExit("error: no defect set to run: set " + " or ".join(SETS[name][0] for name in SETS))
    print(describe(base))
    for name, root in roots.items():
        config = replace(base, data_root=str(root), classes="all")
        rows = in_child(ours, config)
        if not args.skip_anomalib:
            peer = in_child(anomalib_cflow, config)
            rows.append({"row": f"anomalib Cflow ({peer['n_train']} training images, its own Adam setting)",
                         **{k: peer[k] for k in (*METRICS, "seconds_per_epoch", "peak_rss_gb")}})
        if not args.skip_baselines:
            for method in ("knn", "gaussian"):
                rows.append(in_child(baseline, replace(config, method=method)))
        print("\n" + table(name, config, rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
