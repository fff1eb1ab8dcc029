"""One job over several processes or machines: ``torchrun --nproc_per_node N main.py ...`` (or extractor.py).

torchrun starts the processes (ranks) and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A
process started without it (no WORLD_SIZE, or 1) runs alone exactly as before and initialises no process
group. With several, :func:`session` initialises torch.distributed (nccl with --device cuda, each rank on
cuda:LOCAL_RANK; gloo on CPUs) and the ranks share the work: the images of every feature cache unit and the
tasks of main.py. They meet only at the sync points of :meth:`Ranks.gather`, which go through the rendezvous
store instead of a collective: a rank may wait there as long as a slower one works (no collective timeout
allows that), and still stops within about STALL_SECONDS of a failure elsewhere:

- a rank whose code raises posts ``rank R: <error>`` before it exits, and every other rank stops with that
  message at its next sync point (on one machine torchrun also ends them as soon as one exits non-zero);
- a rank that vanishes (killed, its machine gone) stops counting its heartbeat, and a rank that waits for it
  stops once STALL_SECONDS passed without a beat.

Every rank must see the same --cache_dir and --results_dir (across machines: a shared file system).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from config import Config, ConfigError

# How long a rank may go without a heartbeat before the ranks waiting for it stop; ANOMALY_STALL_SECONDS sets it.
STALL_SECONDS = float(os.environ.get("ANOMALY_STALL_SECONDS", "60"))
POLL_SECONDS = 0.05  # how often a waiting rank looks at the store


class DistributedError(RuntimeError):
    """Another rank failed or stopped answering, or the ranks cannot meet; the message names the rank."""


@dataclass
class Ranks:
    """This process's place in the job; ``Ranks()`` is a process on its own."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: dist.Store | None = None
    syncs: int = 0  # sync points passed: the ranks' n-th gathers meet, whatever each calls them

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, count: int) -> range:
        """This rank's items of ``count``, round-robin: item i belongs to rank i % world."""
        return range(self.rank, count, self.world)

    def local_config(self, config: Config) -> Config:
        """``config`` as this rank computes with it: --device cuda becomes cuda:LOCAL_RANK."""
        kind, _, index = config.device.partition(":")
        if not self.distributed or kind != "cuda":
            return config
        if index:
            raise ConfigError(f"--device {config.device} under torchrun: pass --device cuda; each rank takes "
                              "cuda:LOCAL_RANK")
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ConfigError(f"rank {self.rank} (local rank {self.local_rank}) needs cuda:{self.local_rank}, but "
                              f"torch sees {count} CUDA device(s) on this machine: pass --nproc_per_node {count} or "
                              "fewer")
        return replace(config, device=f"cuda:{self.local_rank}")

    def gather(self, step: str, value: str = "") -> list[str]:
        """Every rank's ``value`` at this sync point, in rank order, once each rank has posted its own.

        Raises DistributedError when a rank failed, went STALL_SECONDS without a heartbeat, or is at
        another ``step`` (the ranks' code took different paths)."""
        if not self.distributed:
            return [value]
        self.syncs += 1
        keys = [f"sync/{self.syncs}/{rank}" for rank in range(self.world)]
        try:
            self.store.set(keys[self.rank], json.dumps([step, value]))
            self._wait_for(keys)
            posted = [json.loads(text) for text in self.store.multi_get(keys)]
        except dist.DistError as error:
            raise DistributedError(f"rank {self.rank} lost the rendezvous store at sync point {step!r} ({error}): "
                                   "its host (torchrun on the first machine, or rank 0 without torchrun) has ended") \
                from None
        for rank, (their_step, _) in enumerate(posted):
            if their_step != step:
                raise DistributedError(f"rank {self.rank} is at sync point {step!r} but rank {rank} at "
                                       f"{their_step!r}: the ranks disagree about the work (same flags and files?)")
        return [value for _, value in posted]

    def _wait_for(self, keys: list[str]) -> None:
        beats: dict[int, tuple[int, float]] = {}  # rank -> (last count seen, when it changed)
        looked = 0.0
        while not self.store.check(keys):
            if int(self.store.add("failures", 0)):
                failed = next(rank for rank in range(self.world) if self.store.check([f"failed/{rank}"]))
                raise DistributedError(f"rank {self.rank} stopped: {self.store.get(f'failed/{failed}').decode()}")
            now = time.monotonic()
            if now - looked < 1.0:  # heartbeats once a second: a store round trip per rank
                time.sleep(POLL_SECONDS)
                continue
            looked = now
            for rank in (other for other in range(self.world) if other != self.rank):
                count = int(self.store.add(f"beat/{rank}", 0))
                if rank not in beats or beats[rank][0] != count:
                    beats[rank] = (count, now)
                elif now - beats[rank][1] > STALL_SECONDS and not self.store.check([keys[rank]]):
                    raise DistributedError(f"rank {self.rank} stopped: rank {rank} sent no heartbeat for "
                                           f"{STALL_SECONDS:.0f} s (killed, or its machine is gone)")
            time.sleep(POLL_SECONDS)

    def post_failure(self, message: str) -> None:
        """Tell the other ranks that this one failed, with ``message``; they stop at their next sync point."""
        self.store.set(f"failed/{self.rank}", message)
        self.store.add("failures", 1)


def launch_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; (0, 1, 0) without it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    try:
        rank, world, local_rank = (int(os.environ.get(name, "0")) for name in names)
    except ValueError:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (got "
                          f"{', '.join(f'{n}={os.environ.get(n)!r}' for n in names)}): start the job with torchrun") \
            from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is not in [0, WORLD_SIZE {world}): start the job with torchrun")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ConfigError("WORLD_SIZE > 1 without MASTER_ADDR and MASTER_PORT: start the job with torchrun")
    return rank, world, local_rank


def _store_client(prefix: str) -> dist.Store:
    """A connection of this process's own to the rendezvous store (torchrun's, or rank 0's), under ``prefix``."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=STALL_SECONDS))
    return dist.PrefixStore(prefix, store)


def _beat(store: dist.Store, key: str, stop: threading.Event) -> None:
    """Count ``key`` up every STALL_SECONDS / 6 until ``stop``; a store that went away ends the beats (the main
    thread reports it at its next sync point)."""
    try:
        while not stop.wait(STALL_SECONDS / 6):
            store.add(key, 1)
    except dist.DistError:
        return


@contextmanager
def session(config: Config) -> Iterator[Ranks]:
    """This process's :class:`Ranks` for the job: a process group and heartbeat for the length of the block when
    torchrun started several processes. An error inside the block is printed as ``rank R: <error>`` and posted
    for the other ranks before it propagates."""
    rank, world, local_rank = launch_env()
    if world == 1:
        yield Ranks()
        return
    ranks = Ranks(rank, world, local_rank)
    on_gpu = ranks.local_config(config).device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=STALL_SECONDS))
    attempt = os.environ.get("TORCHELASTIC_RUN_ID", "none"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"anomaly/{attempt[0]}/{attempt[1]}/"  # a restarted attempt meets in keys of its own
    ranks.store = _store_client(prefix)
    ranks.store.add(f"beat/{rank}", 1)
    stop = threading.Event()
    beats = threading.Thread(target=_beat, args=(_store_client(prefix), f"beat/{rank}", stop), daemon=True)
    beats.start()
    try:
        yield ranks
    except BaseException as error:
        if not isinstance(error, DistributedError):
            message = f"rank {rank}: {type(error).__name__}: {error}"
            print(message, file=sys.stderr, flush=True)
            try:
                ranks.post_failure(message)
            except dist.DistError:  # the store is gone: the other ranks learn it from the store, not from here
                pass
        raise
    finally:
        stop.set()
        beats.join()
        dist.destroy_process_group()
