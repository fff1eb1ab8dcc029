"""Training loops of the two flows, with the held-out guard that keeps the best epoch.

Both flows are trained by maximum likelihood on the *fit* images (the normal training images minus a
seeded held-out fraction, ``val_fraction``). Before the first epoch and after every epoch (SANF:
``held_out_checks`` times per epoch) the held-out images' negative log-likelihood per dimension is
measured, and the weights of the measurement with the lowest held-out NLL are kept, the untrained
start (epoch 0) included: training never ends worse on held-out normal images than where it started.
No test image is looked at.

- :func:`train_sanf`: SANF-AD, one Adam step per batch of ``batch_size`` images.
- :func:`train_cflow`: CFLOW-AD, per image batch and stage, all fibers shuffled and cut into chunks
  of ``fiber_batch``, one Adam step per chunk (official code: 256, anomalib: 64), at a constant lr or
  the official code's warm-up and cosine schedule (:func:`official_cflow_lr`). The stages' decoders
  are independent; with ``stage_workers`` > 1 groups of them train side by side in worker processes
  (:class:`StageTrainer`), with the same weights as in one process.

The loops take the models duck-typed (``SANFModel.nll_per_dim``; ``CFlowModel.fibers_of`` /
``fiber_log_likelihood_per_dim`` / ``decoder`` / ``init_args``), so this module does not import
``model.py``.
"""

from __future__ import annotations

import copy
import itertools
import math
import multiprocessing
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from tqdm import tqdm

from config import Config
from utils import keep_freed_memory, peak_memory_gb, seed_everything


class TrainingError(RuntimeError):
    """Training that cannot go on (non-finite loss or features); the message names the fix."""


class StageBatches(Protocol):
    """Per-stage feature maps of a list of images, a batch at a time (``model.StageFeatures``)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[dict[str, Tensor]]: ...

    def only(self, stages: list[str]) -> StageBatches: ...


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


class KeptWeights(Protocol):
    """Where :func:`keep_best_epoch` keeps the best weights seen: ``remember`` the current ones, ``restore``
    the remembered ones."""

    def remember(self) -> None: ...

    def restore(self) -> None: ...


class ModuleWeights:
    """A module's weights, remembered as a deep copy of its state dict."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.state = module, None

    def remember(self) -> None:
        self.state = copy.deepcopy(self.module.state_dict())

    def restore(self) -> None:
        self.module.load_state_dict(self.state)


def keep_best_epoch(weights: KeptWeights, epochs: int, run_epoch: Callable[[int], Iterator[float]],
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
    best_epoch, best_nll = epochs, math.nan
    if held_out_nll is not None:
        best_epoch, best_nll = 0, held_out_nll()
        weights.remember()
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
                    best_epoch, best_nll = position, nll
                    weights.remember()
                    since_best = 0
                progress.set_postfix(loss=f"{loss:.4f}", held_out=f"{nll:.4f}", kept=best_epoch)
                if patience and since_best >= patience:
                    progress.set_description(f"{desc}: stopped at {position}, held-out NLL not lower in {since_best}")
                    break
            started = time.perf_counter()
    if held_out_nll is not None:
        weights.restore()
    return {"curve": curve, "kept_epoch": best_epoch, "held_out_nll": best_nll}


def _trained_parts(epochs: Iterable[int], run_epoch: Callable[[int], Iterator[float]],
                   checks_per_epoch: int) -> Iterator[tuple[float, float]]:
    """(position in epochs, mean training loss) after each part of each epoch, as ``run_epoch`` trains it."""
    for epoch in epochs:
        for part, loss in enumerate(run_epoch(epoch), start=1):
            yield (epoch if checks_per_epoch == 1 else round(epoch - 1 + part / checks_per_epoch, 6)), loss


def _adam(parameters: Any, config: Config) -> torch.optim.Adam:
    fused = torch.device(config.device).type in ("cpu", "cuda")  # one kernel per step: about half the step time
    return torch.optim.Adam(parameters, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
                            weight_decay=config.weight_decay, fused=fused)


def _step(loss: Tensor, optimizer: torch.optim.Optimizer, parameters: Any, config: Config) -> Tensor:
    """One optimizer step; returns the loss, detached, where it lives: reading it (``.item()``, a finiteness test)
    would make the host wait for the device at every step, so the loops read their steps' losses together
    (:func:`read_losses`). The ``record_function`` labels name the parts in a profile (bench/profile_cflow.py)."""
    with record_function("train.backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    with record_function("train.optimizer_step"):
        optimizer.step()
    return loss.detach()


def read_losses(losses: list[Tensor], config: Config, where: Callable[[int], str]) -> list[float]:
    """The losses of a run of steps as floats, read from the device at once; a non-finite one stops with a
    TrainingError naming the first such step (``where(index)``). The steps after it have run on non-finite
    weights, which no result keeps: training stops here."""
    values = torch.stack(losses).tolist()
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingError(f"non-finite loss at {where(index)}; lower --lr (now {config.lr}) or set --grad_clip 1")
    return values


# ----------------------------------------------------------------------------- SANF


def train_sanf(model: nn.Module, fit: dict[str, Tensor], held_out: dict[str, Tensor] | None, config: Config,
               name: str) -> dict[str, Any]:
    """SANF-AD maximum-likelihood training (the whitening must already be fitted).

    Args:
        model: a ``SANFModel``.
        fit, held_out: normalised ``sem`` (M, D) and ``patches`` (M, N, C) texture tokens; with per-view
            statistics also ``view`` (M,), each token's view index.
    """
    generator = seed_everything(config.seed)
    parameters = list(model.flow.parameters())
    optimizer = _adam(parameters, config)
    count = len(fit["sem"])
    checks = 1 if held_out is None else min(config.held_out_checks, math.ceil(count / config.batch_size))

    def run_epoch(epoch: int) -> Iterator[float]:
        # drawn on the CPU (the same order on every device), moved to the features' device once per epoch
        batches = torch.randperm(count, generator=generator).to(fit["sem"].device).split(config.batch_size)
        for part in torch.arange(len(batches)).tensor_split(checks):
            model.train()
            losses, numbers = [], part.tolist()
            for batch in numbers:
                index = batches[batch]
                view = fit["view"][index] if "view" in fit else None
                loss = model.nll_per_dim(fit["sem"][index], fit["patches"][index], config.train_noise, view).mean()
                losses.append(_step(loss, optimizer, parameters, config))
            values = read_losses(losses, config, lambda step: f"epoch {epoch}, batch {numbers[step] + 1} of '{name}'")
            yield sum(values) / len(values)

    @torch.no_grad()
    def held_out_nll() -> float:
        model.eval()
        views = held_out["view"].split(1024) if "view" in held_out else itertools.repeat(None)
        values = [model.nll_per_dim(sem, patches, view=view) for sem, patches, view in
                  zip(held_out["sem"].split(1024), held_out["patches"].split(1024), views)]
        return torch.cat(values).mean().item()

    started = time.perf_counter()
    result = keep_best_epoch(ModuleWeights(model), config.epochs, run_epoch,
                             None if held_out is None else held_out_nll, f"{name} sanf", config.patience, checks)
    model.eval()
    seconds = time.perf_counter() - started
    epochs_run = result["curve"][-1]["epoch"] if result["curve"] else 0
    return {**result, "train_seconds": seconds, "epochs_run": epochs_run,
            "train_images_per_second": count * epochs_run / max(seconds, 1e-9)}


# ----------------------------------------------------------------------------- CFLOW


WARM_UP_META_EPOCHS = 2
"""Meta-epochs of CFLOW-AD's official learning-rate warm-up (``lr_warm_epochs``)."""


def official_cflow_lr(config: Config, epoch: int, batch: int, batches: int) -> float:
    """CFLOW-AD's official learning rate at image batch ``batch`` (0-based) of the ``batches`` of ``epoch``
    (1-based), ``--lr_schedule official``.

    The official code trains ``meta_epochs`` x ``sub_epochs`` epochs (25 x 8); here ``epochs`` /
    ``sub_epochs`` meta-epochs. At the start of every meta-epoch ``m`` (0-based) the lr is set to the cosine
    value ``eta_min + (lr - eta_min)(1 + cos(pi m / meta_epochs)) / 2`` with ``eta_min = lr * 0.1^3``
    (``adjust_learning_rate``); during the first 2 meta-epochs a linear warm-up over their image batches,
    from ``lr / 10`` to the cosine value of meta-epoch 2, replaces it (``warmup_learning_rate``).
    """
    meta_epochs = config.epochs // config.sub_epochs
    meta_epoch, sub_epoch = divmod(epoch - 1, config.sub_epochs)
    eta_min = config.lr * 0.1 ** 3

    def cosine(at_meta_epoch: int) -> float:
        return eta_min + (config.lr - eta_min) * (1 + math.cos(math.pi * at_meta_epoch / meta_epochs)) / 2

    if meta_epoch >= WARM_UP_META_EPOCHS:
        return cosine(meta_epoch)
    batches_per_meta_epoch = batches * config.sub_epochs
    done = meta_epoch * batches_per_meta_epoch + sub_epoch * batches + batch
    warm_up_from = config.lr / 10
    return warm_up_from + done / (WARM_UP_META_EPOCHS * batches_per_meta_epoch) * (cosine(WARM_UP_META_EPOCHS)
                                                                                   - warm_up_from)


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
                                "C++ compiler (g++) for torch.compile's CPU backend (and Triton for its CUDA one); "
                                "install one or drop --compile") \
                from error

    return checked


class StageTrainer:
    """Trains a group of a ``CFlowModel``'s stage decoders on the group's feature maps.

    One Adam over the group's decoders (a step moves only its chunk's decoder: the others have no
    gradient) and one shuffling generator per stage, seeded by the stage's position in the model, so a
    stage's training does not depend on which group it is in or on what the other groups do.
    """

    def __init__(self, model: nn.Module, stages: list[str], fit: StageBatches, held_out: StageBatches | None,
                 config: Config, name: str) -> None:
        self.model, self.stages, self.config, self.name = model, stages, config, name
        every_stage = list(stages) == list(model.stage_names)
        self.fit = fit if every_stage else fit.only(stages)
        self.held_out = held_out if every_stage or held_out is None else held_out.only(stages)
        self.optimizer = _adam([p for stage in stages for p in model.decoder(stage).parameters()], config)
        # on the features' device: the fiber order is drawn where the fibers are, with no copy per image batch
        self.generators = {stage: torch.Generator(device=config.device).manual_seed(
            stage_seed(config.seed, model.stage_names.index(stage))) for stage in stages}
        self.stage_loss = stage_loss_function(model, config.compile)
        self.kept_weights = [ModuleWeights(model.decoder(stage)) for stage in stages]

    def train_epoch(self, epoch: int, order: list[int]) -> dict[str, tuple[float, int]]:
        """One epoch over the fit images in ``order``; per stage, the loss summed over fibers and their count.

        The device is read once per image batch (every stage's step losses together, :func:`read_losses`), not
        at every step."""
        self.model.train()
        totals = {stage: (0.0, 0) for stage in self.stages}
        batches = math.ceil(len(order) / self.config.batch_size)
        for batch, features in enumerate(self.fit.batches(self.config.batch_size, torch.tensor(order))):
            if self.config.lr_schedule == "official":
                for group in self.optimizer.param_groups:
                    group["lr"] = official_cflow_lr(self.config, epoch, batch, batches)
            losses, steps = [], []  # steps: (stage, fibers) of each loss
            for stage, feature_map in features.items():
                with record_function("train.fibers"):
                    fibers, conditions = self.model.fibers_of(feature_map)
                for chunk in shuffled_fiber_chunks(fibers, conditions, self.config.fiber_batch,
                                                   self.generators[stage]):
                    with record_function("train.forward"):
                        loss = self.stage_loss(stage, *chunk)
                    losses.append(_step(loss, self.optimizer, self.model.decoder(stage).parameters(), self.config))
                    steps.append((stage, len(chunk[0])))
            values = read_losses(losses, self.config, lambda step: f"epoch {epoch}, image batch {batch + 1}, stage "
                                                                   f"{steps[step][0]} of '{self.name}'")
            for (stage, count), value in zip(steps, values):
                loss_sum, total_count = totals[stage]
                totals[stage] = (loss_sum + value * count, total_count + count)
        return totals

    @torch.no_grad()
    def held_out_totals(self) -> dict[str, tuple[float, int]]:
        """Per stage: the held-out fibers' NLL per dimension, summed, and their count. Each batch's sum stays on the
        device (a float64 accumulator of a float32 reduction) until all are read at once."""
        self.model.eval()
        sums: list[tuple[str, Tensor, int]] = []
        for features in self.held_out.batches(self.config.test_batch_size):
            for stage, log_likelihood in self.model.stage_log_likelihood_maps(features).items():
                sums.append((stage, log_likelihood.sum(dtype=torch.float64), log_likelihood.numel()))
        totals = {stage: (0.0, 0) for stage in self.stages}
        for (stage, _, count), value in zip(sums, torch.stack([value for _, value, _ in sums]).tolist()):
            total, total_count = totals[stage]
            totals[stage] = (total - value, total_count + count)
        return totals

    def remember(self) -> None:
        for weights in self.kept_weights:
            weights.remember()

    def restore(self) -> None:
        for weights in self.kept_weights:
            weights.restore()

    def peak_memory_gb(self) -> float:
        """This process's peak resident memory (the stage workers report theirs into results.json)."""
        return peak_memory_gb()


def stage_seed(seed: int, position: int) -> int:
    """Seed of the fiber shuffling of the stage at ``position``."""
    return seed + 1_000_003 * (position + 1)


def stage_groups(costs: dict[str, float], workers: int) -> list[list[str]]:
    """The stages in at most ``workers`` groups of similar total cost, each group in the stages' own order.

    Longest first, each stage to the group with the least cost so far. Lite0's stages cost 461 / 223 /
    179 (fibers per image x decoder parameters, in millions) and go to two workers as {blocks.2} and
    {blocks.4, blocks.6}.
    """
    groups: list[list[str]] = [[] for _ in range(min(workers, len(costs)))]
    loads = [0.0] * len(groups)
    for stage in sorted(costs, key=lambda stage: -costs[stage]):
        lightest = loads.index(min(loads))
        groups[lightest].append(stage)
        loads[lightest] += costs[stage]
    order = list(costs)
    return [sorted(group, key=order.index) for group in groups]


class _InProcess:
    """A :class:`StageTrainer` in this process, behind the interface of :class:`_WorkerProcess`."""

    def __init__(self, *trainer_args: Any) -> None:
        self.trainer = StageTrainer(*trainer_args)
        self.stages = self.trainer.stages
        self.reply: Any = None

    def start(self, command: str, *args: Any) -> None:
        self.reply = getattr(self.trainer, command)(*args)

    def result(self) -> Any:
        return self.reply

    def close(self, wait: bool = True) -> None:
        pass


def _shared_model(model_class: type, init_args: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    """A model built from ``init_args`` whose parameters and buffers are the tensors of ``state`` (shared
    memory), not copies of them. (FrEIA's blocks hold lambdas: a model cannot be pickled whole.) The soft
    permutations' slow random draws are skipped: the shared tensors replace them."""
    model = model_class(**{**init_args, "permute_soft": False})
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    if set(state) != set(tensors):
        differing = sorted(set(state) ^ set(tensors))
        raise RuntimeError(f"the rebuilt model's tensors differ from the shared ones: {differing}")
    for name, tensor in tensors.items():
        tensor.data = state[name]
    return model


def _serve(connection: Any, model_parts: tuple, trainer_args: tuple, threads: int) -> None:
    """A worker process: build a :class:`StageTrainer` over the shared model, then run the commands that
    arrive, replying to each. Ctrl-C is the parent's to handle: it stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    torch.set_num_threads(threads)
    try:
        trainer = StageTrainer(_shared_model(*model_parts), *trainer_args)
    except Exception as error:  # reported to the parent, which raises it
        connection.send(_error_reply(error))
        return
    connection.send(("ok", None))
    while True:
        command, args = connection.recv()
        if command == "stop":
            return
        try:
            connection.send(("ok", getattr(trainer, command)(*args)))
        except Exception as error:
            connection.send(_error_reply(error))


def _error_reply(error: Exception) -> tuple[str, str, str]:
    """A TrainingError's own message (it names the fix); any other error's traceback."""
    if isinstance(error, TrainingError):
        return "error", "TrainingError", str(error)
    return "error", type(error).__name__, traceback.format_exc()


class _WorkerProcess:
    """A :class:`StageTrainer` in a process of its own (``spawn``). The model's parameters and the feature
    maps are in shared memory, so its training updates this process's model in place and nothing is copied
    back."""

    def __init__(self, context: Any, model: nn.Module, trainer_args: tuple, threads: int) -> None:
        self.stages = trainer_args[0]
        self.connection, child = context.Pipe()
        model_parts = (type(model), model.init_args, model.state_dict())
        self.process = context.Process(target=_serve, args=(child, model_parts, trainer_args, threads), daemon=True)
        try:
            self.process.start()  # sends the shared-memory handles of the weights and feature maps
        except OSError as error:
            raise _shared_memory_error(error) from error
        finally:
            child.close()

    def start(self, command: str, *args: Any) -> None:
        try:
            self.connection.send((command, args))
        except OSError:  # the process has ended; result() says how
            pass

    def result(self) -> Any:
        try:
            reply = self.connection.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            why = "it was killed (out of memory?)" if code == -signal.SIGKILL else "its error is printed above"
            raise TrainingError(f"the process training stages {', '.join(self.stages)} ended without a reply (exit "
                                f"code {code}: {why}); rerun with --stage_workers 1") from None
        if reply[0] == "error":
            _, kind, message = reply
            raise TrainingError(message if kind == "TrainingError" else
                                f"the process training stages {', '.join(self.stages)} failed:\n{message}")
        return reply[1]

    def close(self, wait: bool = True) -> None:
        """Stop the process: asked to (``wait``: up to 10 s for it to finish its command) or at once."""
        if wait and self.process.is_alive():
            self.start("stop")
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.connection.close()


def _shared_memory_error(error: OSError) -> TrainingError:
    return TrainingError(f"could not share the weights and feature maps with the stage workers ({error}); they go "
                         "through shared memory (/dev/shm; in a container, --shm-size): free some or rerun with "
                         "--stage_workers 1")


def _close_all(trainers: list[Any], wait: bool = True) -> None:
    for trainer in trainers:
        trainer.close(wait)


def _on_all(trainers: list[Any], command: str, *args: Any) -> list[Any]:
    """Run ``command`` on every trainer, side by side where they are processes; their replies in order."""
    for trainer in trainers:
        trainer.start(command, *args)
    return [trainer.result() for trainer in trainers]


class _GroupWeights:
    """:class:`KeptWeights` of every group: each trainer remembers and restores its own decoders."""

    def __init__(self, trainers: list[Any]) -> None:
        self.trainers = trainers

    def remember(self) -> None:
        _on_all(self.trainers, "remember")

    def restore(self) -> None:
        _on_all(self.trainers, "restore")


def _stage_trainers(model: nn.Module, fit: StageBatches, held_out: StageBatches | None, config: Config,
                    name: str) -> list[Any]:
    """One in-process trainer of every stage, or ``stage_workers`` processes with a group of stages each."""
    if config.stage_workers == 1:
        return [_InProcess(model, list(model.stage_names), fit, held_out, config, name)]
    if multiprocessing.current_process().daemon:
        raise TrainingError("--stage_workers starts processes, which a daemonic process (a multiprocessing Pool "
                            "worker) may not do: rerun with --stage_workers 1")
    shapes = {stage: feature_map.shape for stage, feature_map in next(fit.batches(1)).items()}
    costs = {stage: shapes[stage][2] * shapes[stage][3] * sum(p.numel() for p in model.decoder(stage).parameters())
             for stage in model.stage_names}
    groups = stage_groups(costs, config.stage_workers)
    threads = max(1, torch.get_num_threads() // len(groups))
    context = torch.multiprocessing.get_context("spawn")
    try:
        model.share_memory()
    except (OSError, RuntimeError) as error:
        raise _shared_memory_error(error) from error
    trainers: list[Any] = []
    try:
        for group in groups:
            trainers.append(_WorkerProcess(context, model, (group, fit, held_out, config, name), threads))
        for trainer in trainers:
            trainer.result()
    except BaseException:
        _close_all(trainers, wait=False)
        raise
    return trainers


def train_cflow(model: nn.Module, fit: StageBatches, held_out: StageBatches | None, config: Config,
                name: str) -> dict[str, Any]:
    """CFLOW-AD training: per image batch and stage, the fibers shuffled and cut into ``fiber_batch`` chunks,
    one Adam step per chunk.

    The stages' decoders are independent, so with ``stage_workers`` > 1 they train side by side in worker
    processes (:func:`stage_groups`), with the same numbers as in this process up to float rounding.

    Args:
        model: a ``CFlowModel``.
        fit, held_out: per-stage feature maps of the fit and held-out images.
    """
    generator = seed_everything(config.seed)  # draws each epoch's image order
    started = time.perf_counter()
    trainers = _stage_trainers(model, fit, held_out, config, name)
    fibers_per_epoch = 0

    def run_epoch(epoch: int) -> Iterator[float]:
        nonlocal fibers_per_epoch
        order = torch.randperm(len(fit), generator=generator).tolist()
        totals = {stage: total for reply in _on_all(trainers, "train_epoch", epoch, order)
                  for stage, total in reply.items()}
        fibers_per_epoch = sum(totals[stage][1] for stage in model.stage_names)
        yield sum(totals[stage][0] for stage in model.stage_names) / max(fibers_per_epoch, 1)

    def held_out_nll() -> float:
        totals = {stage: total for reply in _on_all(trainers, "held_out_totals") for stage, total in reply.items()}
        return sum(totals[stage][0] / totals[stage][1] for stage in model.stage_names) / len(totals)

    try:
        result = keep_best_epoch(_GroupWeights(trainers), config.epochs, run_epoch,
                                 None if held_out is None else held_out_nll, f"{name} cflow", config.patience)
        workers = [trainer for trainer in trainers if isinstance(trainer, _WorkerProcess)]
        worker_peaks = _on_all(workers, "peak_memory_gb")
    except BaseException:
        _close_all(trainers, wait=False)
        raise
    _close_all(trainers)
    model.eval()
    seconds = time.perf_counter() - started
    epochs_run = len(result["curve"]) - (held_out is not None)
    return {**result, "train_seconds": seconds, "epochs_run": epochs_run,
            "stage_groups": [trainer.stages for trainer in trainers], "worker_peak_memory_gb": worker_peaks,
            "seconds_per_epoch": seconds / max(epochs_run, 1), "train_fibers_per_epoch": fibers_per_epoch,
            "train_fibers_per_second": fibers_per_epoch * epochs_run / max(seconds, 1e-9)}
