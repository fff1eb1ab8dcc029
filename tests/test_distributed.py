"""torchrun with two CPU ranks (gloo) against one process: the same cache bytes, results and scores; a rank
that fails or is killed stops every rank with its number; a rerun resumes and ends as an uninterrupted run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from config import make_config
from datasets import load_tasks
from extractor import cache_folder, part_ranges, part_stem
from main import reusable_record

RUN = dict(classes="0,1,2", max_train_per_class=40, max_test=160, epochs=2, threads=1, extract_batch_size=8, hidden=128,
           caff_context="full")  # small and fast: the cost is process start-up
TIMING = ("_seconds", "_per_second")


def _flags(base: Path) -> list[str]:
    return ["--preset", "demo", *[f"--{name}={value}" for name, value in RUN.items()],
            f"--cache_dir={base / 'cache'}", f"--results_dir={base / 'results'}"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "ANOMALY_PROGRESS_SECONDS": "0", "PYTHONUNBUFFERED": "1"}


def _launch(base: Path, ranks: int) -> subprocess.Popen:
    """main.py in one process (``ranks`` 0) or under torchrun with ``ranks`` processes; output to base/log.txt."""
    prefix = [] if not ranks else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                   "--master_port", str(_free_port())]
    log = open(base / "log.txt", "w")
    return subprocess.Popen([sys.executable, *prefix, str(ROOT / "main.py"), *_flags(base)], cwd=ROOT, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def _finished(base: Path, ranks: int) -> str:
    process = _launch(base, ranks)
    code = process.wait(timeout=300)
    output = (base / "log.txt").read_text()
    assert code == 0, output[-3000:]
    return output


def _untimed(value):
    if isinstance(value, dict):
        return {key: _untimed(item) for key, item in value.items()
                if not key.endswith(TIMING) and key not in ("seconds", "wall_seconds")}
    if isinstance(value, list):
        return [_untimed(item) for item in value]
    return value


def _outcome(base: Path) -> dict:
    """What must not depend on the number of ranks: results.json without wall times, the bytes of scores.csv,
    results.md, config.json and the figures, and every cache unit's metadata and array bytes."""
    (folder,) = (base / "results").iterdir()
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*")
             if path.suffix in (".csv", ".md", ".png") or path.name == "config.json"}
    cache = {}
    for meta_path in (base / "cache").rglob("*.json"):
        unit = json.loads(meta_path.read_text())
        arrays = {name: (meta_path.parent / entry["file"]).read_bytes() for name, entry in unit["arrays"].items()}
        cache[meta_path.relative_to(base / "cache").as_posix()] = (unit["meta"], arrays)
    return {"results": _untimed(json.loads((folder / "results.json").read_text())), "files": files, "cache": cache,
            "left": sorted(path.name for path in base.rglob("parts"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    """One process, run in the folder the distributed runs use afterwards (same paths in results.json)."""
    base = tmp_path_factory.mktemp("distributed")
    _finished(base, 0)
    reference = _outcome(base)
    assert len(reference["cache"]) == 4 and len(reference["results"]["per_class"]) == 3
    return base, reference


def _fresh(base: Path) -> None:
    for name in ("cache", "results"):
        shutil.rmtree(base / name, ignore_errors=True)


def test_part_ranges_cut_only_between_the_batches_of_one_process():
    for count in (1, 7, 8, 9, 40, 41, 200):
        for batch in (1, 3, 8):
            for world in (1, 2, 3, 5):
                ranges = part_ranges(count, batch, world)
                starts = [start for start, _ in ranges]
                assert ranges[0][0] == 0 and ranges[-1][1] == count
                assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
                assert all(start % batch == 0 or start == count for start in starts)
                sizes = [-(-(stop - start) // batch) for start, stop in ranges]  # batches per rank
                assert max(sizes) - min(sizes) <= 1 and sum(sizes) == -(-count // batch)


def test_two_ranks_write_what_one_process_writes(single):
    base, reference = single
    _fresh(base)
    output = _finished(base, 2)
    assert "(rank 1)" in output  # both ranks extracted
    assert _outcome(base) == reference


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with RANK=<rank> in its environment)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if parent == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {launcher.pid}")


def _kill_when(base: Path, rank: int, ready) -> str:
    """Under torchrun with 2 ranks, SIGKILL the worker ``rank`` once ``ready()``; torchrun's output, once it ended
    (within a minute, else the wait raises)."""
    launcher = _launch(base, 2)
    worker = _worker(launcher, rank)
    deadline = time.monotonic() + 120
    while not ready():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the moment to kill"
        time.sleep(0.01)
    os.kill(worker, signal.SIGKILL)
    assert launcher.wait(timeout=60) != 0
    return (base / "log.txt").read_text()


KILLED_RANK_1 = r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9"
"""torchrun's summary naming rank 1, killed by SIGKILL, as the first failure."""


def test_a_killed_rank_stops_all_and_the_reruns_resume(single):
    """Rank 1 killed while extracting its part of the test split, then (rerun) while training its task after
    rank 0 recorded its own: each time torchrun ends within a minute naming rank 1; the third run resumes the
    cache parts and reuses task 0's record and checkpoint, and ends with the uninterrupted run's files."""
    base, reference = single
    _fresh(base)
    config = make_config("demo", cache_dir=str(base / "cache"), results_dir=str(base / "results"), **RUN)
    test_part = part_stem(cache_folder(config) / load_tasks(config)[0].test_key, 1, 2)
    progress = test_part.with_name(f"{test_part.name}.progress.json")

    def mid_extraction() -> bool:
        try:
            return json.loads(progress.read_text())["done"] > 0
        except (OSError, ValueError):
            return False

    output = _kill_when(base, 1, mid_extraction)
    assert re.search(KILLED_RANK_1, output, re.S), output[-3000:]
    assert progress.is_file() and not test_part.with_name(f"{test_part.name}.json").exists()

    records = base / "results"
    output = _kill_when(base, 1, lambda: any(records.rglob("parts/0.json")))
    assert re.search(KILLED_RANK_1, output, re.S), output[-3000:]
    resumed = re.search(r"0 test \(rank 1\):[^|]*\|[^|]*\| (\d+)/", output)  # its progress bar's first state
    assert resumed and int(resumed.group(1)) > 0, output[-3000:]
    task_1_done = any(records.rglob("parts/1.json"))

    output = _finished(base, 2)
    reused = {task for task in "012" if re.search(rf"(?<![\w.']){task}: image AUROC[^\n]*\[reused:", output)}
    assert reused == ({"0", "1"} if task_1_done else {"0"})
    assert _outcome(base) == reference


def test_a_rank_that_fails_stops_every_rank_with_its_message(tmp_path):
    """Rank 1 cannot lock its part (this test holds the lock): it prints its error with its rank, and the run ends."""
    config = make_config("demo", cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), **RUN)
    lock = part_stem(cache_folder(config) / load_tasks(config)[0].train_key, 1, 2)
    lock = lock.with_name(f"{lock.name}.lock")
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        launcher = _launch(tmp_path, 2)
        assert launcher.wait(timeout=120) != 0
    output = (tmp_path / "log.txt").read_text()
    assert re.search(r"rank 1: CacheError: cache unit \S+part1of2 is being written by another process", output), \
        output[-3000:]


PEER = """
import os, sys, time
sys.path.insert(0, {root!r})
from config import make_config
from distributed import session
with session(make_config("demo")) as ranks:
    if ranks.rank == 1:
        if {mode!r} == "vanish":
            os._exit(1)
        raise ValueError("no such image")
    started = time.monotonic()
    try:
        ranks.gather("meet")
    finally:
        print(f"waited {{time.monotonic() - started:.1f}} s", flush=True)
"""


def _peers(mode: str) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "ANOMALY_STALL_SECONDS": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return [subprocess.Popen([sys.executable, "-c", PEER.format(root=str(ROOT), mode=mode)], cwd=ROOT,
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]


def test_a_waiting_rank_stops_without_torchrun_ending_it():
    """Two pairs of ranks started without torchrun (nothing ends the survivor): rank 0 waits at a sync point for
    rank 1, which raises, or vanishes; rank 0 stops with rank 1's message, or after ANOMALY_STALL_SECONDS without
    its heartbeat, instead of waiting forever."""
    expected = {"raise": r"rank 0 stopped: rank 1: ValueError: no such image",
                "vanish": r"rank 0 stopped: rank 1 sent no heartbeat for 3 s"}
    pairs = {mode: _peers(mode) for mode in expected}  # both at once: the cost is start-up
    for mode, (first, second) in pairs.items():
        output = first.communicate(timeout=120)[0]
        second.communicate(timeout=60)
        assert first.returncode != 0 and re.search(expected[mode], output), output[-3000:]
        assert float(re.search(r"waited ([\d.]+) s", output).group(1)) < 15  # 3 s of silence, then a look a second


def test_a_task_record_is_reused_only_with_the_same_settings_and_checkpoint(tmp_path):
    config = make_config("demo", **RUN)
    checkpoint, path = tmp_path / "0.pt", tmp_path / "parts" / "0.json"
    checkpoint.write_bytes(b"weights")
    path.parent.mkdir()
    record = {"config": config.to_dict(), "checkpoint_sha256": hashlib.sha256(b"weights").hexdigest(),
              "metrics": {"held_out_nll": float("nan")}, "scores": [0.5], "seconds": 1.0}
    path.write_text(json.dumps(record))
    assert np.isnan(reusable_record(path, config, checkpoint)["metrics"]["held_out_nll"])
    assert reusable_record(path, make_config("demo", **{**RUN, "epochs": 3}), checkpoint) is None
    checkpoint.write_bytes(b"other weights")
    assert reusable_record(path, config, checkpoint) is None
