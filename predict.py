"""Score new images with a trained detector.

    python predict.py --checkpoint results/<run>/checkpoints/bottle.pt --images DIR_OR_GLOB --out OUT

Writes ``OUT/predictions.csv`` (``path,score,anomalous``: ``anomalous`` is 1 when the score is above
the threshold stored in the checkpoint, which was set on held-out normal *training* images; a
``sanf_cflow`` detector adds each head's score, ``score_sanf,score_cflow``) and, for a detector with
maps (CFLOW, ``sanf_cflow``), ``OUT/maps/<name>.npy`` (float16, img_size x img_size) and
``OUT/overlays/<name>.png`` per image. The outputs are written into ``OUT/.predict-partial`` and moved
into place once every image is scored, replacing an earlier run's: a run that stops leaves the earlier
outputs as they were. The checkpoint is read with ``torch.load(weights_only=True)``: no pickled code
runs. The backbone comes from its recorded weights (``--weights FILE`` where that file lives elsewhere
now; its hash must match). A CFLOW detector trained with ``--map_norm test`` or ``batch`` is refused: its
maps are normalised over the images scored together, so an image's score would depend on its batch
(``--map_norm train`` makes it its own).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function
from tqdm import tqdm

from config import ConfigError
from datasets import DataError, image_list_from_files, list_image_files
from extractor import CacheError, WeightsError, image_batches
from model import Detector, DetectorError, load_detector
from report import csv_field, save_overlay
from utils import atomic_write_bytes, configure_device, configure_torch, run_cli, to_numpy


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="detector file written by main.py (checkpoints/<task>.pt)")
    parser.add_argument("--images", required=True, help="a folder (searched recursively) or a glob pattern")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights file, where the one the detector was trained with has moved")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the overlay PNGs")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


def output_names(paths: list[str]) -> list[str]:
    """Unique file names for per-image outputs: the path below the images' common folder, '/' → '__'.

    The extension is dropped unless two images would then share a name (``a.png``, ``a.jpg``); a name
    that still repeats (``x__y/z`` and ``x/y__z``) gets ``-2``, ``-3``, ... in the order of ``paths``.
    predictions.csv holds each image's full path, so the names only have to be distinct.
    """
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    relative = [os.path.relpath(p, common).replace(os.sep, "__") for p in paths]
    stems = [os.path.splitext(name)[0] for name in relative]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    names, taken = [], set()
    for stem, name in zip(stems, relative):
        candidate = name if stem in repeated else stem
        unique, suffix = candidate, 1
        while unique in taken:
            suffix += 1
            unique = f"{candidate}-{suffix}"
        taken.add(unique)
        names.append(unique)
    return names


OUTPUTS = ("predictions.csv", "maps", "overlays")


def predict(detector: Detector, images: list[str], out: Path, batch_size: int, overlays: bool) -> dict[str, float]:
    """Score ``images``; write predictions.csv and, for maps, .npy and overlays, replacing ``OUTPUTS`` of an
    earlier run only once every image is scored. Returns counts and throughput."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a folder")
    staging = out / ".predict-partial"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
    try:
        figures = _predict_into(detector, images, staging, batch_size, overlays)
        for name in OUTPUTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            elif (out / name).exists():
                (out / name).unlink()
            if (staging / name).exists():
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return figures


def _predict_into(detector: Detector, images: list[str], out: Path, batch_size: int,
                  overlays: bool) -> dict[str, float]:
    image_list = image_list_from_files([Path(p) for p in images])
    config = detector.config
    names = output_names(list(image_list.ids))
    rows, started, position, flagged, header = [], time.perf_counter(), 0, 0, "path,score,anomalous"
    batches = image_batches(image_list, config, batch_size=batch_size)
    for batch in tqdm(batches, total=math.ceil(len(image_list) / batch_size), desc="predict", unit="batch"):
        scores, maps, head_scores = detector.score_images_by_head(batch)
        header = ",".join(["path,score,anomalous", *(f"score_{head}" for head in head_scores)])
        for offset, score in enumerate(scores):
            anomalous = int(detector.flagged(score))
            flagged += anomalous
            rows.append(",".join([csv_field(image_list.ids[position + offset]), repr(float(score)), str(anomalous),
                                  *(repr(float(values[offset])) for values in head_scores.values())]))
        if maps is not None:
            with record_function("predict.outputs"):
                _write_maps(out, names[position:position + len(scores)], maps, batch, detector.map_threshold,
                            overlays)
        position += len(scores)
    seconds = time.perf_counter() - started
    atomic_write_bytes(out / "predictions.csv", ("\n".join([header, *rows]) + "\n").encode())
    return {"images": len(rows), "flagged": flagged, "seconds": seconds,
            "images_per_second": len(rows) / max(seconds, 1e-9)}


def _write_maps(out: Path, names: list[str], maps: np.ndarray, images: torch.Tensor, map_threshold: float,
                overlays: bool) -> None:
    """A batch's .npy maps (and overlays), written on as many threads as torch uses: zlib and file writes
    release the GIL, and torch's threads are idle meanwhile."""
    (out / "maps").mkdir(parents=True, exist_ok=True)

    def write(offset: int) -> None:
        np.save(out / "maps" / f"{names[offset]}.npy", maps[offset].astype(np.float16))
        if overlays:  # one colour scale for every image: 0 to twice the maps' threshold (green = threshold)
            save_overlay(to_numpy(images[offset].permute(1, 2, 0)), maps[offset], 0.0, 2 * map_threshold,
                         out / "overlays" / f"{names[offset]}.png")

    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(names)))) as pool:
        list(pool.map(write, range(len(names))))


def images_to_score(pattern: str, out: Path) -> list[str]:
    """The image files of ``pattern`` (a folder or a glob), less those under ``out``: an output folder inside the
    images' folder holds an earlier run's overlays, which are not images to score."""
    if not any(char in pattern for char in "*?[") and not Path(pattern).expanduser().exists():
        raise DataError(f"--images {pattern}: no such folder or file")
    out_folder = out.resolve()
    files = list_image_files(pattern)
    kept = [str(path) for path in files if not path.resolve().is_relative_to(out_folder)]
    if not kept:
        raise DataError(f"--images {pattern} holds no image outside --out {out}")
    if len(kept) < len(files):
        print(f"note: {len(files) - len(kept)} image(s) under --out {out} left out")
    return kept


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # decoding runs on torch's threads here (image_batches); worker processes would turn an error into a traceback
    run_settings = {"device": args.device, "test_batch_size": args.batch_size, "num_workers": 0}
    if args.weights:
        run_settings["weights"] = args.weights
    configure_device(args.device)  # before load_detector puts the detector there: CUDA's settings come first
    detector = load_detector(args.checkpoint, **run_settings)
    detector.check_per_image_scores()
    configure_torch(detector.config)
    backbone = detector.extractor  # built, and its weights checked, before any image is read
    images = images_to_score(args.images, Path(args.out))
    print(f"{detector.method} detector {args.checkpoint} on {detector.config.backbone} ({backbone.weights_source}): "
          f"{len(images)} images; threshold {detector.threshold:.6g} ({detector.threshold_rule})")
    figures = predict(detector, images, Path(args.out), args.batch_size, args.overlays)
    print(f"{figures['flagged']} of {figures['images']} images above the threshold; {figures['images_per_second']:.1f} images/s; "
          f"{Path(args.out) / 'predictions.csv'}")


if __name__ == "__main__":
    run_cli(main, (ConfigError, DataError, WeightsError, CacheError, DetectorError))
