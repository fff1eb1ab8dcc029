"""The GPU path end to end, against the CPU, with a speed table.

    python bench/gpu_check.py --device cuda     # one GPU: at most about 8 minutes
    python bench/gpu_check.py --device cpu      # a dry run of the same steps on small data (2 cores: under 10 min)

Data: ``ANOMALY_MVTEC_ROOT`` (a folder holding MVTec AD's ``bottle``) and ``ANOMALY_CIFAR10_ROOT`` (CIFAR-10 as
torchvision's files or ``train/<class>/``, ``test/<class>/``); the demo needs none. Every run writes into a
temporary folder (``--work`` keeps it).

Steps, each through the project's own entry points (``main.run``, ``config.make_config``, ``predict.predict``):

1. the demo (``python main.py``: SANF-AD on the digits, every digit in turn);
2. CFLOW-AD on MVTec AD bottle with ``--scoring auto`` (``--preset cflow_lite0``);
3. ``predict.py``'s scoring of the bottle test images with that checkpoint;
4. SANF-AD on a CIFAR-10 subset (automobile and ship, 300 training images per class, 1000 test images;
   ``--preset sanf_cifar10_lite0``).

Each runs on ``--device``; then the same checkpoint scores the same images on the CPU: ``main.py --eval_only
--device cpu`` from the same feature cache (what differs is the head's arithmetic: flows, maps, scores), and
for step 3 ``predict`` on the CPU, backbone included. The largest absolute score difference is printed and
must be at most ``--tolerance`` (1e-4), else the script exits with status 1. With ``--device cpu`` both sides
run on the CPU, so every difference must be 0: a CPU run is repeatable bit for bit.

Then the speed table: extraction images/s, CFLOW-AD seconds per training epoch and predict images/s, for
EfficientNet-Lite0 (the runs above) and the papers' backbones with random weights (``--weights none``, speed
only: ViT-B/16 at 384 px for SANF-AD's tokens, extracted by a kNN run, and WideResNet-50-2 at 256 px for
CFLOW-AD, trained for one epoch), and anomalib's ``Cflow`` epoch where anomalib is installed
(``bench/peer_anomalib.py``; full bottle split, so on a device run only). Extraction images/s is what the run
measured around its cache misses (``feature_seconds``: decoding, resizing, the backbone, writing the cache).

The dry run (``--device cpu``) takes fewer images (digits 0 and 1 with 200 test images; bottle 24 training and
16 test images at 128 px; 30 CIFAR images per class and 60 test images at 128 px; the papers' backbones on a
few images at 224 and 128 px), one or two epochs, and prints the table with its CPU figures.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import predict  # noqa: E402
from config import Config, ConfigError, make_config  # noqa: E402
from main import EXPECTED_ERRORS, results_folder, run  # noqa: E402
from model import load_detector  # noqa: E402
from utils import configure_device, configure_torch, run_cli  # noqa: E402

DATA_VARIABLES = {"mvtec": "ANOMALY_MVTEC_ROOT", "cifar10": "ANOMALY_CIFAR10_ROOT"}


def data_roots() -> dict[str, str]:
    """The data folders from the environment; a ConfigError names a missing variable."""
    missing = [variable for variable in DATA_VARIABLES.values() if not os.environ.get(variable)]
    if missing:
        raise ConfigError(f"set {' and '.join(missing)}: {DATA_VARIABLES['mvtec']} to a folder holding MVTec AD's "
                          f"bottle, {DATA_VARIABLES['cifar10']} to CIFAR-10's")
    roots = {name: os.environ[variable] for name, variable in DATA_VARIABLES.items()}
    if not Path(roots["mvtec"], "bottle", "train", "good").is_dir():
        raise ConfigError(f"{DATA_VARIABLES['mvtec']}={roots['mvtec']} holds no bottle/train/good: point it at "
                          "MVTec AD")
    return roots


def scores_of(folder: Path) -> dict[tuple[str, str], float]:
    """(task, image) → score of a run's scores.csv."""
    with open(folder / "scores.csv", newline="") as handle:
        return {(row["task"], row["path"]): float(row["score"]) for row in csv.DictReader(handle)}


def largest_difference(ours: dict[Any, float], theirs: dict[Any, float]) -> float:
    if ours.keys() != theirs.keys():
        raise RuntimeError(f"the two scorings cover other images ({len(ours)} against {len(theirs)})")
    return max(abs(ours[key] - theirs[key]) for key in ours)


def run_and_rescore(config: Config, label: str, checks: list[tuple[str, int, float]]) -> dict[str, Any]:
    """``main.run`` on the config's device, then ``--eval_only`` on the CPU from the same cache; records the largest
    score difference in ``checks``; returns the device run's results.json payload."""
    started = time.perf_counter()
    payload = run(config)
    seconds = time.perf_counter() - started
    run(dataclasses.replace(config, device="cpu", eval_only=True))
    folder = results_folder(config)
    device_scores, cpu_scores = scores_of(folder), scores_of(folder / "eval_only")
    checks.append((f"{label}: main.py on {config.device}, rescored on cpu", len(device_scores),
                   largest_difference(device_scores, cpu_scores)))
    print(f"[{label}] {seconds:.1f} s on {config.device}")
    return payload


def extraction_rate(payload: dict[str, Any]) -> float:
    """Images extracted per second over a run's tasks (a one-class protocol's shared test split counted once)."""
    tasks = list(payload["per_class"].values())
    images = sum(task["n_fit"] + task["n_held_out"] for task in tasks) + tasks[0]["n_test"]
    return images / sum(task["feature_seconds"] for task in tasks)


def predicted(checkpoint: Path, device: str, images: list[str], out: Path) -> tuple[dict[str, float], float]:
    """``predict.py``'s scoring of ``images`` on ``device`` (maps written, no overlays): scores by image and
    images/s of a second, timed pass (the first warms TorchScript's profiling executor up)."""
    detector = load_detector(checkpoint, device=device, num_workers=0)
    configure_torch(detector.config)
    predict.predict(detector, images, out, detector.config.test_batch_size, overlays=False)
    figures = predict.predict(detector, images, out, detector.config.test_batch_size, overlays=False)
    with open(out / "predictions.csv", newline="") as handle:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    return scores, figures["images_per_second"]


def anomalib_epoch_seconds(config: Config) -> str:
    """anomalib Cflow's seconds per training epoch on the full bottle split, or why there is none."""
    if importlib.util.find_spec("anomalib") is None:
        reason = "skipped: anomalib is not installed"
    elif config.device == "cpu":
        reason = "skipped: a dry run (anomalib reads the full split)"
    else:
        from bench.peer_anomalib import anomalib_cflow, in_child

        full = dataclasses.replace(config, max_train_per_class=0, max_test=0, epochs=1, scoring="exp/max")
        try:
            return f"{in_child(anomalib_cflow, full)['seconds_per_epoch']:.2f}"
        except Exception as error:  # a peer's failure is reported in its cell, not a failure of this check
            reason = f"failed: {type(error).__name__}: {str(error)[:80]}"
    print(f"anomalib Cflow: {reason}")
    return reason


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device checked: cuda, cuda:N, or cpu for a dry run")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest score difference allowed against the CPU")
    parser.add_argument("--work", default=None, help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    configure_device(args.device)  # CUDA's deterministic settings before anything starts CUDA
    roots = data_roots()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        table = checks(args.device, roots, work, args.tolerance)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")


def checks(device: str, roots: dict[str, str], work: Path, tolerance: float) -> str:
    """Every step; raises SystemExit(1) after the table when a score difference is above ``tolerance``."""
    dry = device == "cpu"
    common = dict(device=device, results_dir=str(work / "results"), cache_dir=str(work / "cache"), n_figure_images=0)
    found: list[tuple[str, int, float]] = []

    demo = dict(classes="0,1", max_test=200, epochs=2) if dry else {}
    run_and_rescore(make_config("demo", **common, **demo), "demo", found)

    small_cflow = dict(img_size=128, max_train_per_class=24, max_test=16, epochs=1, val_fraction=0.2) if dry else {}
    bottle = dict(data_root=roots["mvtec"], classes="bottle")
    lite0 = make_config("cflow_lite0", **common, **bottle, scoring="auto", **small_cflow)
    cflow = run_and_rescore(lite0, "CFLOW-AD bottle, scoring auto", found)["per_class"]["bottle"]

    images = predict.images_to_score(str(Path(roots["mvtec"], "bottle", "test")), work / "predict")
    images = sorted(images)[:12] if dry else sorted(images)
    checkpoint = results_folder(lite0) / "checkpoints" / "bottle.pt"
    on_device, predict_rate = predicted(checkpoint, device, images, work / "predict" / "device")
    on_cpu, _ = predicted(checkpoint, "cpu", images, work / "predict" / "cpu")
    found.append((f"predict.py bottle: on {device}, on cpu (backbone included)", len(on_device),
                  largest_difference(on_device, on_cpu)))

    cifar = dict(data_root=roots["cifar10"], classes="automobile,ship", max_train_per_class=300, max_test=1000)
    small_sanf = dict(img_size=128, max_train_per_class=30, max_test=60, epochs=1) if dry else {}
    sanf = run_and_rescore(make_config("sanf_cifar10_lite0", **common, **{**cifar, **small_sanf}), "SANF-AD CIFAR-10",
                           found)

    speed = dict(common, results_dir=str(work / "speed"))
    small_vit = dict(img_size=224, max_train_per_class=4, max_test=8) if dry else {}
    vit = run(make_config("sanf_cifar10", method="knn", weights="none", **speed, **{**cifar, **small_vit}))
    small_wrn = dict(img_size=128, max_train_per_class=8, max_test=4) if dry else {}
    wrn_config = make_config("cflow_mvtec", weights="none", epochs=1, **speed, **bottle, **small_wrn)
    wrn = run(wrn_config)["per_class"]["bottle"]
    _, wrn_predict_rate = predicted(results_folder(wrn_config) / "checkpoints" / "bottle.pt", device, images,
                                    work / "predict" / "wrn")
    anomalib = anomalib_epoch_seconds(lite0)

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    threads = torch.get_num_threads()
    lines = [f"Device {device} ({name}; {threads} CPU threads). Score differences against the CPU "
             f"(at most {tolerance:g}):", ""]
    lines += [f"- {label}: {count} scores, largest difference {difference:.3g}" for label, count, difference in found]
    lines += ["", f"| measure ({'dry run, small data' if dry else 'full data'}) | EfficientNet-Lite0 | "
                  "paper backbone, --weights none | anomalib Cflow (Lite0) |", "|---|---|---|---|",
              f"| extraction, SANF tokens, images/s | {extraction_rate(sanf):.1f} ({sanf['config']['img_size']} px) | "
              f"{extraction_rate(vit):.1f} (vit_base_patch16_384, {vit['config']['img_size']} px) | - |",
              f"| extraction, CFLOW stages, images/s | {extraction_rate({'per_class': {'b': cflow}}):.1f} "
              f"({lite0.img_size} px) | {extraction_rate({'per_class': {'b': wrn}}):.1f} (wide_resnet50_2, "
              f"{wrn_config.img_size} px) | - |",
              f"| CFLOW-AD training, seconds per epoch (bottle, {cflow['n_fit']} fit images) | "
              f"{cflow['seconds_per_epoch']:.2f} | {wrn['seconds_per_epoch']:.2f} ({wrn['n_fit']} fit images) | "
              f"{anomalib} |",
              f"| predict.py, images/s (bottle, {len(images)} images, maps written, no overlays) | "
              f"{predict_rate:.1f} | {wrn_predict_rate:.1f} | - |"]
    table = "\n".join(lines)
    failed = [label for label, _, difference in found if not difference <= (0.0 if dry else tolerance)]
    if failed:
        print(table)
        print(f"error: scores differ from the CPU's by more than {0.0 if dry else tolerance:g} in: {'; '.join(failed)}",
              file=sys.stderr)
        raise SystemExit(1)
    return table


if __name__ == "__main__":
    run_cli(main, EXPECTED_ERRORS)
