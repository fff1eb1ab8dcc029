"""Feature extraction in several processes (torchrun, one share of every cache unit each) against one process.

    python bench/distributed_extract.py --preset demo --img_size 224 [--bench_processes 2] [extractor.py flags]

Extracts the cache that the flags describe into fresh folders, three ways, on this machine: one process with a
thread per core (the baseline), one process with one thread, and torchrun with --bench_processes processes of
cores / processes threads each. The time counted runs from a sync point after every process has built its
backbone to the last unit joined: extraction, not start-up. Prints a markdown table of images/s and the ratio
against the baseline, the load average (other processes on the cores skew every row), and whether the runs
with the same threads per process wrote the same array bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import parse_args  # noqa: E402
from datasets import load_tasks  # noqa: E402
from distributed import session  # noqa: E402
from extractor import FeatureExtractor, extract_tasks  # noqa: E402
from utils import configure_torch, pop_option  # noqa: E402



def worker(argv: list[str], out: Path) -> None:
    """One process of a measurement: extract, timed between two sync points; rank 0 writes images and seconds."""
    config = parse_args(argv)
    with session(config) as ranks:
        local = ranks.local_config(config)
        configure_torch(local)
        extractor = FeatureExtractor(local)
        tasks = load_tasks(config)
        ranks.gather("built")
        started = time.perf_counter()
        extract_tasks(extractor, tasks, local, ranks)
        ranks.gather("extracted")
        seconds = time.perf_counter() - started
        if ranks.rank == 0:
            units = {key: len(images) for task in tasks for key, images in
                     ((task.train_key, task.train), (task.test_key, task.test))}
            out.write_text(json.dumps({"images": sum(units.values()), "seconds": seconds}))


def measure(argv: list[str], folder: Path, processes: int, threads: int) -> dict:
    """One way of extracting into ``folder``/cache: its images, seconds and images/s."""
    out = folder / "timing.json"
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_port", str(free_port())]
    command = [sys.executable, *launcher, __file__, *argv, "--threads", str(threads),
               "--cache_dir", str(folder / "cache"), "--bench_worker", str(out)]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    timing = json.loads(out.read_text())
    return {**timing, "processes": processes, "threads": threads, "rate": timing["images"] / timing["seconds"]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cache_arrays(cache: Path) -> dict[str, bytes]:
    """Every array of every unit, as bytes, by unit and name (read through the units' JSON)."""
    arrays = {}
    for meta_path in cache.rglob("*.json"):
        if not meta_path.name.endswith(".progress.json"):
            for name, entry in json.loads(meta_path.read_text())["arrays"].items():
                arrays[f"{meta_path.relative_to(cache)}:{name}"] = np.load(meta_path.parent / entry["file"]).tobytes()
    return arrays


def main() -> None:
    argv = sys.argv[1:]
    out = pop_option(argv, "--bench_worker")
    if out is not None:
        worker(argv, Path(out))
        return
    processes = int(pop_option(argv, "--bench_processes") or 2)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    ways = [(1, cores), (1, 1), (processes, max(1, cores // processes))]
    with tempfile.TemporaryDirectory() as scratch:
        folders = [Path(scratch) / f"way{index}" for index in range(len(ways))]
        rows = [measure(argv, folder, count, threads) for folder, (count, threads) in zip(folders, ways)]
        same = {index: cache_arrays(folders[index] / "cache") for index in (1, 2) if rows[index]["threads"] == 1}
    print(f"\n{rows[0]['images']} images; {cores} cores; load average {load:.1f} before, {os.getloadavg()[0]:.1f} "
          "after (other processes share the cores)\n")
    print("| processes | threads each | seconds | images/s | vs 1 process |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['threads']} | {row['seconds']:.1f} | {row['rate']:.1f} | "
              f"{row['rate'] / rows[0]['rate']:.2f}x |")
    if len(same) == 2:
        print(f"\none thread per process: 1 process and {processes} wrote "
              f"{'the same' if same[1] == same[2] else 'DIFFERENT'} array bytes ({len(same[1])} arrays)")


if __name__ == "__main__":
    main()
