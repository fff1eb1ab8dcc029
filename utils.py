"""Small shared helpers: atomic files, torch set-up, seeding and the command-line error boundary."""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a half."""
    atomic_write_bytes(Path(path), json.dumps(payload, indent=1).encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def configure_torch(config: Any) -> None:
    """Threads and the device check, once per run."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        from config import ConfigError

        raise ConfigError(f"--device {config.device} asked for, but torch sees no CUDA device; use --device cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
