"""Small shared helpers: atomic files, torch set-up, seeding, the shrunk covariance and the command-line
error boundary."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from torch import Tensor


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write strict JSON (NaN and infinities become null) so that readers see the old file or the complete new
    one, never a half."""
    atomic_write_bytes(Path(path), json.dumps(_finite_or_null(payload), indent=1, allow_nan=False).encode())


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(Path(path), lambda stream: stream.write(data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(Path(path), lambda stream: torch.save(obj, stream))


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it, which threads would race


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` into a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync the
    folder: after a kill or a power cut, ``path`` is the old file or the complete new one. The file gets
    the mode a plain ``open`` would give it (mkstemp's own is 0600: owner only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(handle, 0o666 & ~_UMASK)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Make a file's data, or a folder's entries (creations, renames, removals), durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def configure_torch(config: Any) -> None:
    """Once per run: malloc's reuse of freed memory, threads, the device (:func:`configure_device`) and every seed.

    Seeding here makes a CPU run repeatable bit for bit (features, training curves, scores) on one
    machine with one thread count: torch's default generator starts from a random seed in every
    process, and the SANF flow's subnet weights are drawn from it. No op of the CPU pipeline is
    nondeterministic, so a CPU run sets no determinism switch. Another thread count (``--threads``)
    changes the order of parallel float sums: a few cached feature values in 10^4 move by one float16
    step, and scores by about 1e-5 relative.
    """
    keep_freed_memory()
    if config.threads:
        torch.set_num_threads(config.threads)
    configure_device(config.device)
    seed_everything(config.seed)


DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")
"""The CUBLAS_WORKSPACE_CONFIG values with which cuBLAS (CUDA >= 10.2) gives the same bits every run."""


def configure_device(device: str) -> None:
    """Check ``device`` (:func:`check_device`); for CUDA make every op deterministic and float32 exact.

    On CUDA: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (set before CUDA initialises, unless already one of
    ``DETERMINISTIC_CUBLAS``), cuDNN without benchmarking (which picks its convolution algorithm by timing)
    and restricted to deterministic algorithms, and ``torch.use_deterministic_algorithms(True)``, which
    raises on an op that has no deterministic CUDA kernel. None of the ops that lack one (the backward of
    adaptive average pooling and of bilinear upsampling, scatter-style accumulation, ...) is differentiated
    here: pooling runs in the frozen backbone, upsampling on the CPU maps. TF32 is off for convolutions
    (cuDNN's default) and matrix products, so that float32 is float32 and a GPU's features and scores
    agree with a CPU's up to float rounding. A CPU device changes nothing.
    """
    if device.split(":")[0] == "cuda":
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS[0])
        if workspace not in DETERMINISTIC_CUBLAS:
            from config import ConfigError

            raise ConfigError(f"CUBLAS_WORKSPACE_CONFIG={workspace} makes cuBLAS nondeterministic on --device "
                              f"{device}: unset it or set it to {' or '.join(DETERMINISTIC_CUBLAS)}")
    check_device(device)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.use_deterministic_algorithms(True)


def peak_memory_gb() -> float:
    """This process's peak resident memory (max RSS) in the unit of every table in BENCHMARKS.md: Linux's
    kilobytes / 1e6 (macOS reports bytes)."""
    import resource  # Unix only; nothing else here needs it

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak / 1e6


def check_device(device: str) -> None:
    """Stop with a ConfigError naming the fix when ``device`` is no torch device, or a CUDA device torch
    does not see."""
    from config import ConfigError

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: this code supports cpu and cuda only; use --device cpu")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s): "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every block above its mmap threshold (128 KB, rising to at most 32 MB) with a
    fresh ``mmap`` and unmaps it on ``free``; a backbone's activations are such blocks, so every batch
    touches tens of MB of new pages, each a page fault and a zeroed page. The full CIFAR-10 extraction
    took 350 million minor page faults and spent 31% of its CPU time in the kernel (BENCHMARKS.md). With
    mmap off and no trimming the blocks are reused; the process keeps its peak memory until it ends.
    Returns False where the C library is not glibc (other allocators need nothing or other switches).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in blocks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A tensor's values as a numpy array: detached and moved to the CPU first (``Tensor.numpy`` refuses a tensor
    on an accelerator). The one place where tensors become arrays."""
    return tensor.detach().cpu().numpy()


def shrunk_covariance(features: Tensor, shrinkage: float = 0.0) -> tuple[Tensor, np.ndarray, float]:
    """Mean (D,) float64, shrunk covariance (D, D) float64 and the shrinkage used, all on the CPU (statistics in
    float64 stay off the accelerator).

    ``shrinkage`` 0 picks the Ledoit-Wolf coefficient from the data; a value in (0, 1] blends the
    sample covariance with a scaled identity: (1 - s) S + s (tr S / D) I.
    """
    samples = features.detach().cpu().double()
    mean = samples.mean(dim=0)
    centred = to_numpy(samples - mean)
    if shrinkage > 0:
        covariance = centred.T @ centred / max(len(centred) - 1, 1)
        target = np.trace(covariance) / covariance.shape[0] * np.eye(covariance.shape[0])
        return mean, (1 - shrinkage) * covariance + shrinkage * target, shrinkage
    from sklearn.covariance import LedoitWolf

    estimator = LedoitWolf(assume_centered=True, store_precision=False).fit(centred)  # no inverse: not needed
    return mean, estimator.covariance_, float(estimator.shrinkage_)


def pop_option(argv: list[str], name: str, default: str | None = None) -> str | None:
    """Take ``name VALUE`` out of ``argv`` (a bench script's own flag, before the rest goes to
    ``config.parse_args``); VALUE, else ``default``."""
    if name not in argv:
        return default
    position = argv.index(name)
    value = argv.pop(position + 1)
    argv.pop(position)
    return value


def run_cli(main: Callable[[], None], expected_errors: tuple[type[BaseException], ...]) -> None:
    """Run a script's main; expected errors end with one line on stderr and exit code 2."""
    try:
        main()
    except expected_errors as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted; an unfinished feature cache resumes on the next run", file=sys.stderr)
        raise SystemExit(130) from None
