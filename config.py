"""Every setting of the project: one typed dataclass, named presets, ``--field value`` overrides.

Both scripts take the same command line::

    python extractor.py --preset sanf_cifar10_lite0 --data_root ~/data/cifar10
    python main.py      --preset sanf_cifar10_lite0 --data_root ~/data/cifar10 --fusion none

``--preset`` picks a named set of defaults (``demo`` when omitted); every other ``--field value``
overrides one field of :class:`Config`. Nothing here is mutated at run time: scripts build one
``Config`` with :func:`parse_args` and pass it down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

METHODS = ("sanf", "cflow", "knn", "gaussian")
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "fmnist", "mnist", "catsvsdogs", "mvtec", "folder")


def _opt(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True)
class Config:
    """Resolved settings of one run.

    Field defaults are SANF-AD's published setting (the ``sanf_cifar10`` preset); the ``demo`` preset,
    used when no ``--preset`` is given, overrides them for an offline CPU run of a few minutes.
    """

    # what to run
    method: str = _opt("sanf", "sanf: flow over the semantic token with CAFF; cflow: multi-scale "
                       "conditional flows with anomaly maps; knn / gaussian: baselines on the same cache",
                       METHODS)
    dataset: str = _opt("cifar10", "dataset and protocol (datasets.py)", DATASETS)
    data_root: str = _opt("", "dataset folder; env ANOMALY_DATA_ROOT when empty (not needed for digits)")
    classes: str = _opt("all", "'all' or a comma list of class / category names used as the normal class in turn")
    download: bool = _opt(False, "let torchvision download CIFAR/STL/MNIST into data_root (needs internet)")
    max_train_per_class: int = _opt(0, "quick subset: at most this many training images per normal class, "
                                    "drawn with the seed; 0 = full protocol")
    max_test: int = _opt(0, "quick subset: at most this many test images, stratified by label, drawn with "
                         "the seed; 0 = full protocol")

    # features
    backbone: str = _opt("vit_base_patch16_384.orig_in21k_ft_in1k", "timm model name (public SANF code: ViT-B/16 at 384 px, ImageNet-21k pretrained, fine-tuned on 1k)")
    weights: str = _opt("default", "'default': packaged weights (tf_efficientnet_lite0) or the hub when online; "
                        "a path: local state dict loaded strictly; 'none': random init, explicitly")
    img_size: int = _opt(384, "input resolution (square resize)")
    patch_grid: int = _opt(8, "SANF: patch tokens average-pooled to patch_grid x patch_grid (public code 8)")
    layers: str = _opt("blocks.2,blocks.4,blocks.6", "CFLOW: backbone stages (module names, comma-separated)")
    cache: bool = _opt(True, "cache features on disk (float16); false computes them on the fly (CFLOW)")
    cache_dir: str = _opt("cache", "feature cache folder")
    results_dir: str = _opt("results", "results folder")
    extract_batch_size: int = _opt(32, "images per backbone forward pass")
    num_workers: int = _opt(0, "image-decoding worker processes (0 = in the main process)")

    # SANF flow
    fusion: str = _opt("caff", "caff: class-attention feature fusion in every coupling; none: MLP-only ablation",
                       ("caff", "none"))
    caff_context: str = _opt("half", "half: keys/values from the patch-token channel half that follows the flow's "
                             "permutation (public code); full: all patch-token channels (paper's Eq. 6-11)",
                             ("half", "full"))
    n_flow_layers: int = _opt(4, "SANF: number of flow layers (FLL); CFLOW: AllInOneBlocks per stage")
    token_dim: int = _opt(0, "SANF: channels the flow works on; the tokens are projected on the first token_dim "
                          "principal axes of the normal training tokens (0 = all D channels, as the paper)")
    hidden: int = _opt(1024, "hidden width of every coupling subnet (paper 1024)")
    heads: int = _opt(4, "class-attention heads (public code 4)")
    clamp: float = _opt(3.0, "soft clamp of the log-scales: SANF alpha in (2a/pi)atan(s/a) (paper 3); "
                        "CFLOW AllInOneBlock affine_clamping (official 1.9)")
    token_norm: str = _opt("none", "sanf / knn / gaussian: per-token normalisation of the cached features before "
                           "any method: none (public code), l2 (unit length: the cosine geometry of the kNN "
                           "baseline), power (signed square root, then unit length)", ("none", "l2", "power"))
    score: str = _opt("nll", "sanf anomaly score: nll = |z|^2/2 - log|det J| per dimension; z2 = mean(z^2) "
                      "(public code, no log-det)", ("nll", "z2"))

    # optimisation
    epochs: int = _opt(10, "training epochs (fixed; nothing is selected on the test set)")
    batch_size: int = _opt(32, "training batch size in images (paper 32)")
    lr: float = _opt(5e-5, "Adam learning rate (SANF paper 5e-5; CFLOW official 2e-4, anomalib 1e-4)")
    beta1: float = _opt(0.8, "Adam beta1 (SANF paper 0.8; CFLOW 0.9)")
    beta2: float = _opt(0.8, "Adam beta2 (SANF paper 0.8; CFLOW 0.999)")
    weight_decay: float = _opt(1e-5, "Adam weight decay (SANF paper 1e-5)")
    grad_clip: float = _opt(0.0, "max gradient norm (0 = off, as the public code)")

    # CFLOW
    condition_dims: int = _opt(128, "CFLOW positional-encoding channels (official 128)")
    fiber_batch: int = _opt(4096, "CFLOW fibers per optimizer step (official 256, anomalib 64)")
    permute_soft: bool = _opt(False, "CFLOW AllInOneBlock soft permutation (official true, anomalib false)")
    map_norm: str = _opt("train", "CFLOW map normalisation: train statistics (scores independent of the test "
                         "set), test (official: max over the whole test set), batch (anomalib: per batch)",
                         ("train", "test", "batch"))
    test_batch_size: int = _opt(32, "images per scoring batch")
    n_figure_images: int = _opt(6, "CFLOW: test images drawn in each category's figure")

    # baselines
    knn_k: int = _opt(2, "kNN baseline: neighbours (cosine distance)")
    gaussian_shrinkage: float = _opt(0.0, "Gaussian baseline: covariance shrinkage in [0, 1]; 0 = Ledoit-Wolf")

    # run
    seed: int = _opt(0, "seed of subsets, permutations, initialisation and shuffling")
    device: str = _opt("cpu", "torch device: cpu, cuda, cuda:1, ...")
    threads: int = _opt(0, "torch CPU threads (0 = all cores)")
    eval_only: bool = _opt(False, "main.py: rescore from the saved checkpoints without training")
    refresh_cache: bool = _opt(False, "extractor.py: rebuild a cache whose metadata no longer matches")

    def class_list(self) -> list[str] | None:
        """The requested normal classes, or None for all of the dataset's classes."""
        if self.classes.strip() in ("", "all"):
            return None
        return [name.strip() for name in self.classes.split(",") if name.strip()]

    def layer_list(self) -> list[str]:
        return [name.strip() for name in self.layers.split(",") if name.strip()]

    def resolved_data_root(self) -> str:
        return os.path.expanduser(self.data_root or os.environ.get("ANOMALY_DATA_ROOT", ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Embedded offline default: sklearn digits at 64 px, packaged EfficientNet-Lite0 weights, all 10
    # digits in turn. lr and epochs were checked on a split of the digits *training* half
    # (bench/validate.py), never on the test half.
    "demo": dict(
        dataset="digits", backbone="tf_efficientnet_lite0", img_size=64, patch_grid=2, hidden=256,
        batch_size=64, lr=1e-4, beta1=0.9, beta2=0.999, epochs=10, grad_clip=1.0,
    ),
    # SANF-AD as published: the field defaults (ViT-B/16 at 384 px, 8x8 pooled patches, 4 FLL,
    # hidden 1024, alpha 3, Adam (0.8, 0.8), lr 5e-5, weight decay 1e-5, batch 32).
    "sanf_cifar10": {},
    # The measured CPU protocol of the README: EfficientNet-Lite0 at 224 px on the full CIFAR-10.
    # token_norm, lr, epochs and weight decay were chosen with bench/validate.py on halves of the
    # training split (airplane, cat, ship as normal classes; BENCHMARKS.md), never on the test split.
    "sanf_cifar10_lite0": dict(
        method="sanf", dataset="cifar10", backbone="tf_efficientnet_lite0", img_size=224, patch_grid=3,
        n_flow_layers=4, hidden=512, clamp=3.0, token_norm="power", lr=1e-4, weight_decay=1e-2, batch_size=128,
        epochs=4, score="nll",
    ),
    # CFLOW-AD as in the official code (WRN-50-2, layer2-4, PE 128, 8 blocks, clamp 1.9, N = 256).
    "cflow_mvtec": dict(
        method="cflow", dataset="mvtec", backbone="wide_resnet50_2.tv_in1k", layers="layer2,layer3,layer4",
        img_size=256, condition_dims=128, n_flow_layers=8, clamp=1.9, fiber_batch=256, lr=2e-4,
        permute_soft=False, epochs=25, batch_size=32, beta1=0.9, beta2=0.999, weight_decay=0.0, grad_clip=0.0,
    ),
    # CFLOW on the CPU: EfficientNet-Lite0 stages at strides 8/16/32, 256 px.
    "cflow_lite0": dict(
        method="cflow", dataset="mvtec", backbone="tf_efficientnet_lite0", layers="blocks.2,blocks.4,blocks.6",
        img_size=256, condition_dims=128, n_flow_layers=8, clamp=1.9, fiber_batch=1024, lr=2e-3,
        epochs=12, batch_size=32, beta1=0.9, beta2=0.999, weight_decay=0.0, grad_clip=0.0,
    ),
}


class ConfigError(ValueError):
    """A bad preset, field or value; the message names the valid ones."""


def _field_types() -> dict[str, type]:
    return get_type_hints(Config)


def _parse_value(name: str, raw: str, kind: type, choices: tuple[str, ...] | None) -> Any:
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value: Any = lowered in ("true", "1", "yes")
        elif kind is int:
            value = int(raw)
        elif kind is float:
            value = float(raw)
        else:
            value = raw
    except ValueError:
        raise ConfigError(f"--{name} expects {kind.__name__}, got {raw!r}") from None
    if choices and value not in choices:
        raise ConfigError(f"--{name} {raw!r} is not one of: {', '.join(choices)}")
    return value


def make_config(preset: str = "demo", **overrides: Any) -> Config:
    """A preset with overrides applied; raises ConfigError naming the valid presets / fields."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    valid = {f.name: f for f in fields(Config)}
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")
    values = {**PRESETS[preset], **overrides}
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Value checks the type system cannot express."""
    types = _field_types()
    for f in fields(Config):
        value = getattr(config, f.name)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{f.name}={value!r} is not one of: {', '.join(choices)}")
        if types[f.name] in (int, float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{f.name} must be >= 0, got {value}")
    for name in ("img_size", "n_flow_layers", "hidden", "heads", "batch_size", "fiber_batch", "test_batch_size",
                 "extract_batch_size", "knn_k", "condition_dims", "patch_grid"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.gaussian_shrinkage <= 1:
        raise ConfigError(f"gaussian_shrinkage must lie in [0, 1], got {config.gaussian_shrinkage}")
    if config.condition_dims % 4:
        raise ConfigError(f"condition_dims must be a multiple of 4, got {config.condition_dims}")
    if config.method == "cflow" and not config.layer_list():
        raise ConfigError("method=cflow needs --layers (backbone module names, comma-separated)")


def usage() -> str:
    lines = ["usage: --preset NAME --field value ...", f"presets: {', '.join(PRESETS)}", "fields:"]
    types = _field_types()
    for f in fields(Config):
        choices = f" {{{'|'.join(f.metadata['choices'])}}}" if f.metadata["choices"] else ""
        lines.append(f"  --{f.name} {types[f.name].__name__}{choices} (default {f.default!r}): {f.metadata['doc']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    """``--preset NAME`` then ``--field value`` pairs (``--field=value`` also works)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs: list[tuple[str, str]] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in ("-h", "--help"):
            print(usage())
            raise SystemExit(0)
        if not token.startswith("--"):
            raise ConfigError(f"expected --field value, got {token!r}; run with --help for the fields")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if index + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            index += 1
            value = argv[index]
        pairs.append((name, value))
        index += 1
    preset = "demo"
    overrides: dict[str, Any] = {}
    types = _field_types()
    valid = {f.name: f for f in fields(Config)}
    for name, value in pairs:
        if name == "preset":
            preset = value
        elif name not in valid:
            raise ConfigError(f"unknown field --{name}; valid fields: {', '.join(valid)}")
        else:
            overrides[name] = _parse_value(name, value, types[name], valid[name].metadata["choices"])
    return make_config(preset, **overrides)


def describe(config: Config) -> str:
    """The resolved configuration as printed at the start of every run."""
    return json.dumps(config.to_dict(), indent=1, sort_keys=False)
