"""Training loops of the two flows, with the held-out guard that keeps the best epoch.

Both flows are trained by maximum likelihood on the *fit* images (the normal training images minus a
seeded held-out fraction, ``val_fraction``). Before the first epoch and after every epoch (SANF:
``held_out_checks`` times per epoch) the held-out images' negative log-likelihood per dimension is
measured, and the weights of the measurement with the lowest held-out NLL are kept, the untrained
start (epoch 0) included: training never ends worse on held-out normal images than where it started.
No test image is looked at.

- :func:`train_sanf`: SANF-AD, one Adam step per batch of ``batch_size`` images.
- :func:`train_cflow`: CFLOW-AD, per image batch and stage, all fibers shuffled and cut into chunks
  of ``fiber_batch``, one Adam step per chunk (official code: 256, anomalib: 64).

The loops take the models duck-typed (``SANFModel.nll_per_dim``; ``CFlowModel.fibers_of`` /
``fiber_log_likelihood_per_dim``), so this module does not import ``model.py``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from tqdm import tqdm

from config import Config
from utils import seed_everything


class TrainingError(RuntimeError):
    """Training that cannot go on (non-finite loss or features); the message names the fix."""


class StageBatches(Protocol):
    """Per-stage feature maps of a list of images, a batch at a time (``model.StageFeatures``)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[dict[str, Tensor]]: ...


def cflow_loss(log_likelihood_per_dim: Tensor) -> Tensor:
    """Mean of -logsigmoid(log p / C) over fibers (official ``-log_theta(log_prob)``, anomalib).

    Args:
        log_likelihood_per_dim: Tensor (M,), log p / C of each fiber.

    Returns:
        Scalar tensor.
    """
    return -F.logsigmoid(log_likelihood_per_dim).mean()


def shuffled_fiber_chunks(
    fibers: Tensor, conditions: Tensor, chunk_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffle the fibers of a batch and yield them in contiguous chunks, with their conditions.

    Args:
        fibers: Tensor (M, C).
        conditions: Tensor (M, P), row i the condition of fiber i.
        chunk_size: fibers per chunk, > 0.
        generator: draws the permutation; the same generator state gives the same order.

    Yields:
        (fibers (m, C), conditions (m, P)) with m = chunk_size except possibly for the last chunk.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if fibers.shape[0] != conditions.shape[0]:
        raise ValueError(f"{fibers.shape[0]} fibers but {conditions.shape[0]} conditions")
    order = torch.randperm(fibers.shape[0], generator=generator, device=generator.device).to(fibers.device)
    for chunk in order.split(chunk_size):
        yield fibers[chunk], conditions[chunk]


def keep_best_epoch(module: nn.Module, epochs: int, run_epoch: Callable[[int], Iterator[float]],
                    held_out_nll: Callable[[], float] | None, desc: str, patience: int = 0,
                    checks_per_epoch: int = 1) -> dict[str, Any]:
    """Run up to ``epochs`` epochs; keep the weights with the lowest held-out NLL seen.

    ``run_epoch(epoch)`` trains epoch ``epoch`` (1-based) in ``checks_per_epoch`` parts and yields each
    part's mean training loss once the part is done; ``held_out_nll()`` measures the held-out images'
    NLL per dimension after every part (None: no held-out images, every epoch runs and the last weights
    are kept, as in the papers). Position 0 is the untrained start, so training never ends worse on the
    held-out images than it started. With ``patience`` > 0, training stops once that many measurements
    in a row have not improved on the best held-out NLL: what they would cost buys nothing the kept
    weights can use (with one measurement per epoch, that many epochs).

    Returns:
        ``curve`` (one record per measurement, the start first: the position in epochs, the part's training
        loss and seconds and the held-out NLL), ``kept_epoch`` (the position of the kept weights, an int
        with one measurement per epoch) and ``held_out_nll`` of the kept weights (NaN without held-out
        images).
    """
    curve: list[dict[str, float]] = []
    best_epoch, best_nll, best_state = epochs, math.nan, None
    if held_out_nll is not None:
        best_epoch, best_nll = 0, held_out_nll()
        best_state = copy.deepcopy(module.state_dict())
        curve.append({"epoch": 0, "held_out_nll": best_nll})
    since_best = 0
    with tqdm(range(1, epochs + 1), desc=desc, unit="epoch") as progress:
        started = time.perf_counter()
        for position, loss in _trained_parts(progress, run_epoch, checks_per_epoch):
            record = {"epoch": position, "train_loss": loss, "seconds": time.perf_counter() - started}
            curve.append(record)
            if held_out_nll is None:
                progress.set_postfix(loss=f"{loss:.4f}")
            else:
                record["held_out_nll"] = nll = held_out_nll()
                since_best += 1
                if math.isfinite(nll) and not nll >= best_nll:
                    best_epoch, best_nll, best_state = position, nll, copy.deepcopy(module.state_dict())
                    since_best = 0
                progress.set_postfix(loss=f"{loss:.4f}", held_out=f"{nll:.4f}", kept=best_epoch)
                if patience and since_best >= patience:
                    progress.set_description(f"{desc}: stopped at {position}, held-out NLL not lower in {since_best}")
                    break
            started = time.perf_counter()
    if best_state is not None:
        module.load_state_dict(best_state)
    return {"curve": curve, "kept_epoch": best_epoch, "held_out_nll": best_nll}


def _trained_parts(epochs: Iterable[int], run_epoch: Callable[[int], Iterator[float]],
                   checks_per_epoch: int) -> Iterator[tuple[float, float]]:
    """(position in epochs, mean training loss) after each part of each epoch, as ``run_epoch`` trains it."""
    for epoch in epochs:
        for part, loss in enumerate(run_epoch(epoch), start=1):
            yield (epoch if checks_per_epoch == 1 else round(epoch - 1 + part / checks_per_epoch, 6)), loss


def _adam(parameters: Any, config: Config) -> torch.optim.Adam:
    fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel per step: about half the step time
    return torch.optim.Adam(parameters, lr=config.lr, betas=(config.beta1, config.beta2),
                            weight_decay=config.weight_decay, fused=fused)


def _step(loss: Tensor, optimizer: torch.optim.Optimizer, parameters: Any, config: Config, where: str) -> float:
    """One optimizer step; the ``record_function`` labels name the parts in a profile (bench/profile_cflow.py)."""
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss at {where}; lower --lr (now {config.lr}) or set --grad_clip 1")
    with record_function("train.backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    with record_function("train.optimizer_step"):
        optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------- SANF


def train_sanf(model: nn.Module, fit: dict[str, Tensor], held_out: dict[str, Tensor] | None, config: Config,
               name: str) -> dict[str, Any]:
    """SANF-AD maximum-likelihood training (the whitening must already be fitted).

    Args:
        model: a ``SANFModel``.
        fit, held_out: normalised ``sem`` (M, D) and ``patches`` (M, N, C) texture tokens.
    """
    generator = seed_everything(config.seed)
    parameters = list(model.flow.parameters())
    optimizer = _adam(parameters, config)
    count = len(fit["sem"])
    checks = 1 if held_out is None else min(config.held_out_checks, math.ceil(count / config.batch_size))

    def run_epoch(epoch: int) -> Iterator[float]:
        batches = torch.randperm(count, generator=generator).split(config.batch_size)
        for part in torch.arange(len(batches)).tensor_split(checks):
            model.train()
            losses = []
            for batch in part.tolist():
                index = batches[batch]
                loss = model.nll_per_dim(fit["sem"][index], fit["patches"][index], config.train_noise).mean()
                where = f"epoch {epoch}, batch {batch + 1} of '{name}'"
                losses.append(_step(loss, optimizer, parameters, config, where))
            yield sum(losses) / len(losses)

    @torch.no_grad()
    def held_out_nll() -> float:
        model.eval()
        values = [model.nll_per_dim(sem, patches) for sem, patches in
                  zip(held_out["sem"].split(1024), held_out["patches"].split(1024))]
        return torch.cat(values).mean().item()

    started = time.perf_counter()
    result = keep_best_epoch(model, config.epochs, run_epoch, None if held_out is None else held_out_nll,
                             f"{name} sanf", config.patience, checks)
    model.eval()
    seconds = time.perf_counter() - started
    epochs_run = result["curve"][-1]["epoch"] if result["curve"] else 0
    return {**result, "train_seconds": seconds, "epochs_run": epochs_run,
            "train_images_per_second": count * epochs_run / max(seconds, 1e-9)}


# ----------------------------------------------------------------------------- CFLOW


def stage_loss_function(model: nn.Module, compile_it: bool) -> Callable[[str, Tensor, Tensor], Tensor]:
    """``loss(stage, fibers, conditions)``: the CFLOW loss of a chunk under its stage's flow, compiled by
    ``torch.compile`` (one graph per stage, forward and backward) when ``compile_it``."""

    def loss(stage: str, fibers: Tensor, conditions: Tensor) -> Tensor:
        return cflow_loss(model.fiber_log_likelihood_per_dim(stage, fibers, conditions))

    if not compile_it:
        return loss
    compiled = torch.compile(loss)

    def checked(stage: str, fibers: Tensor, conditions: Tensor) -> Tensor:
        try:
            return compiled(stage, fibers, conditions)
        except Exception as error:  # inductor's failures have many classes; all mean the same to a user
            raise TrainingError(f"--compile failed ({type(error).__name__}: {str(error)[:300]}); it needs a working "
                                "C++ compiler (g++) for torch.compile's CPU backend; install one or drop --compile") \
                from error

    return checked


def train_cflow(model: nn.Module, fit: StageBatches, held_out: StageBatches | None, config: Config,
                name: str) -> dict[str, Any]:
    """CFLOW-AD training; the stages' decoders share one Adam (a step only moves its chunk's decoder).

    Args:
        model: a ``CFlowModel``.
        fit, held_out: per-stage feature maps of the fit and held-out images.
    """
    generator = seed_everything(config.seed)
    optimizer = _adam(model.parameters(), config)
    stage_loss = stage_loss_function(model, config.compile)
    fibers_per_epoch = 0

    def run_epoch(epoch: int) -> Iterator[float]:
        nonlocal fibers_per_epoch
        model.train()
        loss_sum, count = 0.0, 0
        order = torch.randperm(len(fit), generator=generator)
        for batch, features in enumerate(fit.batches(config.batch_size, order)):
            for stage, feature_map in features.items():
                where = f"epoch {epoch}, image batch {batch + 1}, stage {stage} of '{name}'"
                with record_function("train.fibers"):
                    fibers, conditions = model.fibers_of(feature_map)
                for chunk in shuffled_fiber_chunks(fibers, conditions, config.fiber_batch, generator):
                    with record_function("train.forward"):
                        loss = stage_loss(stage, *chunk)
                    loss_sum += _step(loss, optimizer, model.decoder(stage).parameters(), config, where) * len(chunk[0])
                    count += len(chunk[0])
        fibers_per_epoch = count
        yield loss_sum / max(count, 1)

    @torch.no_grad()
    def held_out_nll() -> float:
        model.eval()
        totals: dict[str, list[float]] = {stage: [0.0, 0] for stage in model.stage_names}
        for features in held_out.batches(config.test_batch_size):
            for stage, log_likelihood in model.stage_log_likelihood_maps(features).items():
                totals[stage][0] -= log_likelihood.double().sum().item()
                totals[stage][1] += log_likelihood.numel()
        return sum(total / count for total, count in totals.values()) / len(totals)

    started = time.perf_counter()
    result = keep_best_epoch(model, config.epochs, run_epoch, None if held_out is None else held_out_nll,
                             f"{name} cflow", config.patience)
    model.eval()
    seconds = time.perf_counter() - started
    epochs_run = len(result["curve"]) - (held_out is not None)
    return {**result, "train_seconds": seconds, "epochs_run": epochs_run,
            "seconds_per_epoch": seconds / max(epochs_run, 1), "train_fibers_per_epoch": fibers_per_epoch,
            "train_fibers_per_second": fibers_per_epoch * epochs_run / max(seconds, 1e-9)}
