"""Kill the feature extractor at random moments; the resumed cache must be bit-identical.

    python bench/kill_resume.py [--kills 10] [--seed 0] [--progress_seconds 0.1] [--time_share 0.5]
                                [--data_root CIFAR10] [-- extra extractor flags]

Extracts the units of a small run uninterrupted into cache A: the digits demo's class 1 (its
training images and the test split, 64 px), or with ``--data_root`` 600 CIFAR-10 images (100
airplane training images and 500 test images, 224 px). Then extracts the same units into cache B in
subprocesses, SIGKILLing each at a seeded random moment and restarting, ``--kills`` times; each run
resumes from what the last one left (progress recorded every ``--progress_seconds``, passed as
ANOMALY_PROGRESS_SECONDS). Each unit gets kills in proportion to its rows: first in its extraction
loop, either instants (``--time_share`` of them; landing anywhere, in C code too: a batch write
through the memory map, an msync) or Python lines of the loop (between the arrays of one batch,
inside a progress save), spread over the work left; then about a third of them at Python lines of
its commit (the JSON write, its fsyncs and rename, the clean-up), in increasing order. Lines are
reached by a line tracer in the subprocess. After every kill, each unit that cache B would trust
must equal cache A's; after the last, one run completes B and every array must equal A's bit for
bit. Prints a markdown table, one row per kill; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import extractor  # noqa: E402
import utils  # noqa: E402
from config import parse_args  # noqa: E402
from datasets import load_tasks  # noqa: E402

DIGITS = ["--preset", "demo", "--classes", "1", "--extract_batch_size", "16"]


def cifar10(data_root: str) -> list[str]:
    return ["--preset", "sanf_cifar10_lite0", "--data_root", data_root, "--classes", "airplane",
            "--max_train_per_class", "100", "--max_test", "500", "--extract_batch_size", "16"]


# ----------------------------------------------------------------------------- the extractor subprocess

TARGETS = ("_extract_rows", "_commit")  # the functions whose lines a kill can be placed at


def _line_tracer(target: str, kill_call: int, kill_line: int, counts: dict[str, list[int]]) -> Callable:
    """A trace function counting the Python lines run inside each call of the TARGETS (with what they call in
    extractor.py and utils.py: batch writes, flushes, fsyncs, atomic writes) into ``counts``, and in
    ``counts["json"]`` the line of each commit that renames its JSON into place (a kill at that line or
    before leaves no JSON); SIGKILLs the process at line ``kill_line`` of call ``kill_call`` of ``target``."""
    watched = {extractor.__file__, utils.__file__}
    source, first = inspect.getsourcelines(utils.atomic_write)
    rename = (utils.atomic_write.__code__, first + next(i for i, text in enumerate(source) if "os.replace(" in text))
    current: str | None = None

    def local(frame: Any, event: str, _arg: Any) -> Callable | None:
        nonlocal current
        if current is None:
            return None
        if event == "line":
            counts[current][-1] += 1
            if current == "_commit" and (frame.f_code, frame.f_lineno) == rename:
                counts["json"].append(counts[current][-1])
            if current == target and len(counts[target]) == kill_call and counts[target][-1] == kill_line:
                os.kill(os.getpid(), signal.SIGKILL)
        elif event == "return" and frame.f_code.co_name == current:
            current = None
        return local

    def tracer(frame: Any, _event: str, _arg: Any) -> Callable | None:
        nonlocal current
        if frame.f_code.co_filename not in watched:
            return None
        if current is None and frame.f_code.co_name in TARGETS:
            current = frame.f_code.co_name
            counts[current].append(0)
        return local if current else None

    return tracer


def worker(config_args: list[str], ready: Path, target: str, kill_call: int, kill_line: int, warm_up: bool) -> None:
    """Extract every unit of the run, touching ``ready`` when the backbone is built (and with ``warm_up``, has
    run its first, slow TorchScript calls); with ``kill_line`` > 0, die at that line of call ``kill_call`` of
    ``target`` (one call per unit extracted). Prints the units in extraction order and the line counts."""
    config = parse_args(config_args)
    utils.configure_torch(config)
    features = extractor.FeatureExtractor(config)
    tasks = load_tasks(config)
    for size in ((1, config.extract_batch_size) * 2 if warm_up else ()):  # the probe's and the batches' shapes
        features(torch.zeros(size, 3, config.img_size, config.img_size, dtype=torch.uint8))
    folder = extractor.cache_folder(config, features.layers).relative_to(config.cache_dir)
    order = list(dict.fromkeys(str(folder / f"{key}.json") for task in tasks
                               for key in (task.train_key, task.test_key)))
    counts: dict[str, list[int]] = {name: [] for name in (*TARGETS, "json")}
    ready.touch()
    sys.settrace(_line_tracer(target, kill_call, kill_line, counts))
    for task in tasks:
        extractor.task_features(features, task, config)
    sys.settrace(None)
    print("REPORT", json.dumps({"order": order, "lines": counts}))


# ----------------------------------------------------------------------------- the driver


def _start(config_args: list[str], cache: Path, workdir: Path, progress_seconds: float, warm_up: bool,
           target: str = TARGETS[0], kill_call: int = 1, kill_line: int = 0) -> tuple[subprocess.Popen, Path, Path]:
    ready, log = workdir / "ready", workdir / "worker.log"
    ready.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", "--target", target, "--kill_call", str(kill_call),
               "--kill_line", str(kill_line),
               "--ready", str(ready), *(["--warm_up"] if warm_up else []), "--", *config_args,
               "--cache_dir", str(cache)]
    environment = {**os.environ, "ANOMALY_PROGRESS_SECONDS": str(progress_seconds)}
    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=environment, cwd=ROOT)
    return process, ready, log


def _wait_ready(process: subprocess.Popen, ready: Path, log: Path) -> None:
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the extractor subprocess ended before extracting:\n{log.read_text()[-2000:]}")
        time.sleep(0.01)


def _state(reference: Path, cache: Path, units: dict[str, dict]) -> tuple[dict[str, int | None], bool]:
    """(each unit of ``cache``: None when complete (its JSON trusted), else the rows its progress record holds;
    whether every unit that ``cache`` would trust equals the reference's bit for bit)."""
    rows: dict[str, int | None] = {}
    equal = True
    for relative, meta in units.items():
        stem = (cache / relative).with_suffix("")
        trusted = extractor.read_unit(stem, meta)
        progress = stem.with_name(f"{stem.name}.progress.json")
        if trusted is not None:
            rows[relative] = None
            wanted = extractor.read_unit((reference / relative).with_suffix(""), meta)
            equal &= all(np.array_equal(trusted[n].view(np.uint16), wanted[n].view(np.uint16)) for n in wanted)
        else:
            rows[relative] = json.loads(progress.read_text())["done"] if progress.exists() else 0
    return rows, equal


def _plan(kills: int, counts: list[int], time_share: float,
          rng: np.random.Generator) -> list[tuple[int, str, float]]:
    """(unit index, kind, where) of each kill, in extraction order. Each unit gets kills in proportion to its rows (the
    biggest what rounding leaves): first ones in its extraction loop, "time" (with probability
    ``time_share``) or "rows", each drawn over ``where`` = 2 / (loop kills left + 1) of the unit's work left,
    so that they spread over it; then a third of them in its commit (at least one, in the biggest unit), at
    increasing fractions ``where`` of the commit's lines up to its JSON's rename ("commit"), the last one
    of all its lines ("commit-end": it may complete the unit)."""
    per_unit = [round(kills * count / sum(counts)) for count in counts]
    biggest = int(np.argmax(counts))
    per_unit[biggest] = max(0, per_unit[biggest] + kills - sum(per_unit))
    plan: list[tuple[int, str, float]] = []
    for index, n in enumerate(per_unit):
        commits = max(n // 3, int(index == biggest and n > 0))
        loop = n - commits
        plan += [(index, "time" if rng.random() < time_share else "rows", 2 / (loop - j + 1)) for j in range(loop)]
        plan += [(index, "commit" if k < commits - 1 else "commit-end", float(where))
                 for k, where in enumerate(np.sort(rng.random(commits)))]
    return plan


def kill_and_resume(config_args: list[str], kills: int, seed: int, workdir: Path, progress_seconds: float,
                    time_share: float = 0.5, report: Callable[[str], None] = print) -> tuple[list[dict], bool]:
    """Run the experiment of the module docstring in ``workdir`` (kills placed by :func:`_plan`). Returns the
    kill rows and whether the completed cache B equals cache A bit for bit."""
    rng = np.random.default_rng(seed)
    reference, cache = workdir / "cache_a", workdir / "cache_b"
    warm_up = time_share > 0
    process, ready, log = _start(config_args, reference, workdir, progress_seconds, warm_up)
    _wait_ready(process, ready, log)
    started = time.monotonic()
    if process.wait() != 0:
        raise RuntimeError(f"the reference extraction failed:\n{log.read_text()[-2000:]}")
    extract_seconds = time.monotonic() - started
    facts = json.loads(log.read_text().split("REPORT", 1)[1].splitlines()[0])
    units = {relative: json.loads((reference / relative).read_text())["meta"] for relative in facts["order"]}
    total = sum(meta["count"] for meta in units.values())
    lines_per_row = sum(facts["lines"]["_extract_rows"]) / total
    commit_lines, json_line = min(facts["lines"]["_commit"]), min(facts["lines"]["json"])
    rows: list[dict] = []
    report("| kill | moment | killed | rows then (per unit) | next run resumes | trusted units = A |")
    report("| --- | --- | --- | --- | --- | --- |")
    plan = _plan(kills, [meta["count"] for meta in units.values()], time_share, rng)
    names = list(units)
    for number, (planned, kind, where) in enumerate(plan, start=1):
        state, _ = _state(reference, cache, units)
        unfinished = [unit for unit in names if state[unit] is not None]  # one extraction call each, in order
        if not unfinished:
            break
        unit = names[planned] if names[planned] in unfinished else unfinished[0]
        call, to_do = unfinished.index(unit) + 1, units[unit]["count"] - state[unit]
        target, line, delay = TARGETS[0], 0, None
        if kind == "time":
            before = sum(units[u]["count"] - state[u] for u in unfinished[:call - 1])
            delay = extract_seconds * (before + float(rng.uniform(0, to_do * where))) / total
            moment = f"t = {delay:.2f} s, in {Path(unit).stem} (~{extract_seconds * (before + to_do) / total:.2f} s)"
        elif kind.startswith("commit"):
            target, line = "_commit", 1 + int(where * (json_line if kind == "commit" else commit_lines))
            moment = f"{Path(unit).stem} commit, line {line} of {commit_lines} (JSON renamed at line {json_line})"
        else:
            span = max(1, int(lines_per_row * to_do))
            line = int(rng.integers(1, max(1, int(span * where)) + 1))
            moment = f"{Path(unit).stem} extraction loop, line {line} of ~{span}"
        process, ready, log = _start(config_args, cache, workdir, progress_seconds, warm_up, target, call, line)
        _wait_ready(process, ready, log)
        if delay is not None:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
        killed = process.wait() == -signal.SIGKILL
        left, equal = _state(reference, cache, units)
        resume = next(((unit, n) for unit, n in left.items() if n is not None), None)
        rows.append({"kill": number, "moment": moment, "killed": killed, "left": left, "equal": equal})
        counts = ", ".join(f"{Path(unit).stem} " + ("complete" if n is None else f"{n}/{units[unit]['count']} rows")
                           for unit, n in left.items())
        report(f"| {number} | {moment} | {'yes' if killed else 'no: it finished first'} | {counts} | "
               f"{f'{Path(resume[0]).stem} from row {resume[1]}' if resume else '(all complete)'} | "
               f"{'yes' if equal else 'NO'} |")
    process, ready, log = _start(config_args, cache, workdir, progress_seconds, False)
    if process.wait() != 0:
        raise RuntimeError(f"the completing extraction failed:\n{log.read_text()[-2000:]}")
    completed, identical = _state(reference, cache, units)
    identical &= all(rows_done is None for rows_done in completed.values())
    report(f"\ncompleted after {len(rows)} kills: every array of cache B equals cache A bit for bit: "
           f"{'yes' if identical else 'NO'}")
    return rows, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress_seconds", type=float, default=0.1)
    parser.add_argument("--data_root", default="", help="a CIFAR-10 folder: 600 of its images instead of digits")
    parser.add_argument("--workdir", default="", help="where caches A and B go (default: a temporary folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time_share", type=float, default=0.5, help="share of the non-commit kills drawn in time")
    parser.add_argument("--kill_call", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--kill_line", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--target", choices=TARGETS, default=TARGETS[0], help=argparse.SUPPRESS)
    parser.add_argument("--ready", default="", help=argparse.SUPPRESS)
    parser.add_argument("--warm_up", action="store_true", help=argparse.SUPPRESS)
    args, config_args = parser.parse_known_args()
    config_args = [a for a in config_args if a != "--"]
    if args.worker:
        worker(config_args, Path(args.ready), args.target, args.kill_call, args.kill_line, args.warm_up)
        return
    config_args = [*(cifar10(args.data_root) if args.data_root else DIGITS), *config_args]
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        rows, identical = kill_and_resume(config_args, args.kills, args.seed, workdir, args.progress_seconds,
                                          args.time_share)
    raise SystemExit(0 if identical and all(row["equal"] for row in rows) else 1)


if __name__ == "__main__":
    main()
