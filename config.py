"""Every setting of the project: one typed dataclass, per-method training defaults, data/feature presets.

Both scripts take the same command line::

    python extractor.py --preset sanf_cifar10_lite0 --data_root ~/data/cifar10
    python main.py      --preset sanf_cifar10_lite0 --data_root ~/data/cifar10 --fusion none
    python main.py      --config results/<run>/results.json --eval_only

Each setting is resolved from, lowest to highest: the field defaults (SANF-AD's published setting), the
training defaults of --method, the --preset (data and features only; demo when omitted), the values of a
--config JSON file, then explicit flags. --method itself comes from the highest layer that sets it
(flag, file, preset, else sanf). --help shows the main settings and --help-all every one, with the defaults in
force for the given --preset and --method.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

METHODS = ("sanf", "cflow", "sanf_cflow", "knn", "gaussian")
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "fmnist", "mnist", "catsvsdogs", "mvtec", "folder")
GROUPS = {  # field group -> --help section title
    "data": "data (method, dataset, images)",
    "features": "features (backbone, resolution, feature cache)",
    "sanf": "SANF-AD flow",
    "flow": "both flows (SANF-AD and CFLOW-AD)",
    "cflow": "CFLOW-AD",
    "training": "training (defaults per --method)",
    "baselines": "kNN and Gaussian baselines",
    "run": "run",
}
PRESET_GROUPS = ("data", "features")  # the only groups a preset may set
HELP_FIELDS: dict[str, str] = {  # field -> its line in --help; --help-all shows every field's full text
    "method": "sanf, cflow, sanf_cflow (both heads), knn / gaussian",
    "dataset": "dataset and its protocol",
    "data_root": "dataset folder (empty: env ANOMALY_DATA_ROOT)",
    "classes": "normal classes, each in turn: all or a comma list",
    "backbone": "timm model name",
    "weights": "default, a state-dict path, or none (random init)",
    "img_size": "input resolution in pixels",
    "layers": "CFLOW: backbone stages, comma-separated, or auto",
    "train_views": "views fitted per training image (1 = the image)",
    "test_views": "views averaged per scored image (1 = the image)",
    "scales": "sanf / knn / gaussian: image scales, fractions of img_size",
    "cache_dir": "feature cache folder",
    "fusion": "SANF: caff, or none (the MLP-only ablation)",
    "map_norm": "CFLOW: map normalisation by train, test or batch statistics",
    "scoring": "CFLOW image score: merge/score[@stage+stage], or auto",
    "epochs": "training epochs at most",
    "batch_size": "training images per batch",
    "lr": "Adam learning rate",
    "val_fraction": "fraction of the normal training images held out",
    "seed": "seed of subsets, split, initialisation and shuffling",
    "device": "torch device: cpu, cuda, cuda:N",
    "results_dir": "folder that holds one folder per run",
    "eval_only": "rescore the saved checkpoints without training",
}
_SHORT_DESCRIPTION = """The main settings, each with the default in force for the given --preset and
--method; --help-all lists every setting, grouped, and how they are resolved."""


def _opt(group: str, default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"group": group, "doc": doc, "choices": choices})


@dataclass(frozen=True)
class Config:
    """Resolved settings of one run; field defaults are SANF-AD's published setting (``sanf_cifar10``)."""

    # data
    method: str = _opt("data", "sanf", "sanf: flow over the semantic token with CAFF; cflow: multi-scale conditional "
                       "flows with anomaly maps; sanf_cflow: both as heads on one backbone pass, CFLOW's maps and "
                       "the larger of the heads' z scores on held-out normal images (a training field at its default "
                       "takes each head's method default, another value applies to both heads); knn / gaussian: "
                       "baselines", METHODS)
    dataset: str = _opt("data", "cifar10", "dataset and protocol (datasets.py)", DATASETS)
    data_root: str = _opt("data", "", "dataset folder; env ANOMALY_DATA_ROOT when empty (not needed for digits)")
    classes: str = _opt("data", "all", "normal classes, each in turn: 'all' or a comma list of class / category "
                        "names")
    download: bool = _opt("data", False, "let torchvision download CIFAR/STL/MNIST into data_root (needs internet)")
    max_train_per_class: int = _opt("data", 0, "quick subset: at most this many training images per normal class, "
                                    "drawn with the seed; 0 = full protocol")
    max_test: int = _opt("data", 0, "quick subset: at most this many test images, stratified by label, drawn with "
                         "the seed; 0 = full protocol")

    # features
    backbone: str = _opt("features", "vit_base_patch16_384.orig_in21k_ft_in1k", "timm model name (the public SANF "
                         "code's: ViT-B/16 at 384 px, ImageNet-21k, fine-tuned on 1k)")
    weights: str = _opt("features", "default", "default (packaged for tf_efficientnet_lite0, else the hub), a "
                        "state-dict path (loaded strictly) or none (random init)")
    img_size: int = _opt("features", 384, "input resolution in pixels (square resize)")
    patch_grid: int = _opt("features", 8, "SANF: texture tokens average-pooled to patch_grid x patch_grid (public "
                           "code 8)")
    texture_layers: str = _opt("features", "auto", "SANF: where the texture tokens come from. auto: a ViT's final "
                               "normalised patch tokens (the paper), a CNN's stride-16 stage; last: the final feature "
                               "map (what the semantic token pools); or backbone module names, comma-separated, each "
                               "pooled to the grid and concatenated along channels")
    layers: str = _opt("features", "auto", "CFLOW: backbone stages, module names comma-separated, or auto (a CNN's "
                       "strides 8, 16, 32; a ViT's blocks at 1/3, 2/3 and the end)")
    token_norm: str = _opt("features", "none", "sanf / knn / gaussian: per-token normalisation of the cached "
                           "features: none (public code), l2 (unit length: the cosine geometry of the kNN baseline), "
                           "power (signed square root, then unit length)", ("none", "l2", "power"))
    view_set: str = _opt("features", "rot90", "transforms that make the views of an image (views.py): rot90 (the 8 "
                         "right-angle turns and mirrorings, exact), flip (4 mirrorings), rotate (any angle, a fixed "
                         "seeded sequence, as DifferNet's RandomRotation(180)); view 0 is always the image itself",
                         ("rot90", "flip", "rotate"))
    train_views: int = _opt("features", 1, "views of each training image that the method fits (1 = the image only); "
                            "extracted once into the feature cache")
    test_views: int = _opt("features", 1, "views of each scored image (held-out, test, predict.py); its score is the "
                           "mean of its views' scores (DifferNet); CFLOW turns each view's map back before averaging")
    scales: str = _opt("features", "1", "sanf / knn / gaussian: image scales, comma-separated fractions of img_size "
                       "(e.g. 1,0.5,0.25): the semantic token is the pooled final map of the image at each scale, "
                       "concatenated (DifferNet, CS-Flow); the texture tokens come from scale 1; unused by cflow, "
                       "whose stages are its scales")
    cache: bool = _opt("features", True, "cache features on disk (float16); --no-cache computes them on the fly "
                       "(CFLOW)")
    cache_dir: str = _opt("features", "cache", "feature cache folder")
    refresh_cache: bool = _opt("features", False, "rebuild a cache unit whose metadata no longer matches "
                               "(extractor.py and main.py)")
    extract_batch_size: int = _opt("features", 32, "images per backbone forward pass")
    num_workers: int = _opt("features", 0, "image-decoding worker processes (0 = in the main process)")

    # SANF flow
    fusion: str = _opt("sanf", "caff", "caff: class-attention feature fusion in every coupling; none: MLP-only "
                       "ablation", ("caff", "none"))
    caff_context: str = _opt("sanf", "auto", "CAFF keys/values. full: all texture-token channels through a context "
                             "projection (the paper's Eq. 6-11); half: the texture-token channel half that follows "
                             "the flow's permutation (public code; texture tokens as wide as the semantic token); "
                             "auto: where half applies and images are held out, train both and keep the lower "
                             "held-out NLL (a tie keeps full), otherwise full; unused with --fusion none",
                             ("full", "half", "auto"))
    token_dim: int = _opt("sanf", 0, "channels the flow works on; the tokens are projected on the first token_dim "
                          "principal axes of the normal training tokens (0 = all D channels, as the paper)")
    flow_channels: int = _opt("sanf", 0, "the flow transforms the first flow_channels principal axes of the whitened "
                              "semantic token and leaves the others as the whitened Gaussian (0 = all, as the paper)")
    view_statistics: str = _opt("sanf", "pooled", "sanf / gaussian with views: pooled: one mean and shrunk "
                                "covariance of all fitted views (SANF-AD's whitened start; the Gaussian baseline); "
                                "per_view: one per view index, each view being one fixed transform, so the start is a "
                                "Gaussian of the token given its view; needs test_views <= train_views",
                                ("pooled", "per_view"))
    train_noise: float = _opt("sanf", 0.0, "std of Gaussian noise added to the whitened semantic tokens while training "
                              "(0 = none, as the paper)")
    hidden: int = _opt("sanf", 1024, "hidden width of every coupling subnet (paper 1024)")
    heads: int = _opt("sanf", 4, "class-attention heads (public code 4)")
    score: str = _opt("sanf", "nll", "anomaly score: nll = |z|^2/2 - log|det J| per dimension; z2 = mean(z^2) "
                      "(public code, no log-det)", ("nll", "z2"))

    # both flows
    n_flow_layers: int = _opt("flow", 4, "coupling blocks per flow: SANF-AD FLLs (paper 4), CFLOW-AD "
                              "AllInOneBlocks per stage (official 8)")
    clamp: float = _opt("flow", 3.0, "bound on the affine log-scales |s| < clamp: SANF (2c/pi)atan(s/c) (paper 3), "
                        "CFLOW FrEIA AllInOneBlock affine_clamping (official 1.9)")

    # CFLOW
    condition_dims: int = _opt("cflow", 128, "positional-encoding channels (official 128)")
    fiber_batch: int = _opt("cflow", 256, "fibers per optimizer step (official 256, anomalib 64)")
    permute_soft: bool = _opt("cflow", False, "AllInOneBlock soft permutation (official on, anomalib off)")
    map_norm: str = _opt("cflow", "train", "map normalisation: train statistics (scores independent of the test "
                         "set), test (official: max over the whole test set), batch (anomalib: per batch)",
                         ("train", "test", "batch"))
    scoring: str = _opt("cflow", "exp/max", "CFLOW image score from the stage maps, merge/score[@stage+stage] "
                        "(anomaly_map.py): merge exp (the paper) or z; score max (the paper), top1 or top10 (mean of "
                        "the 1% / 10% highest pixels); auto: chosen on held-out normal and synthetic defect images, "
                        "never on the test split. The map itself is always the paper's")
    test_batch_size: int = _opt("cflow", 32, "images per scoring batch")
    n_figure_images: int = _opt("cflow", 6, "test images drawn in each category's figure")
    save_maps: bool = _opt("cflow", False, "write every test image's anomaly map (.npy, float16) under the results "
                           "folder")

    # training
    epochs: int = _opt("training", 10, "training epochs at most; with val_fraction > 0 the epoch with the lowest "
                       "held-out NLL is kept")
    batch_size: int = _opt("training", 32, "training images per batch (SANF: per Adam step; CFLOW: images whose "
                           "fibers are shuffled together)")
    lr: float = _opt("training", 5e-5, "Adam learning rate (SANF paper 5e-5; CFLOW official 2e-4)")
    beta1: float = _opt("training", 0.8, "Adam beta1 (SANF paper 0.8; CFLOW 0.9)")
    beta2: float = _opt("training", 0.8, "Adam beta2 (SANF paper 0.8; CFLOW 0.999)")
    adam_eps: float = _opt("training", 1e-4, "Adam epsilon (SANF public code 1e-4, DifferNet's; the paper gives none; "
                           "CFLOW 1e-8, torch's default as in its official code)")
    weight_decay: float = _opt("training", 1e-5, "Adam weight decay (SANF paper 1e-5; CFLOW 0)")
    grad_clip: float = _opt("training", 0.0, "max gradient norm (0 = off, as the public code)")
    lr_schedule: str = _opt("training", "constant", "CFLOW: constant (lr throughout, as anomalib) or official "
                            "(CFLOW-AD's code: meta-epochs of sub_epochs epochs; a warm-up from lr/10 over the first "
                            "2, then a cosine from lr to lr*1e-3, stepped per meta-epoch; the official run is "
                            "--epochs 200)", ("constant", "official"))
    sub_epochs: int = _opt("training", 8, "CFLOW with --lr_schedule official: epochs per meta-epoch (official 8); "
                           "epochs must be a multiple of it, at least 3 meta-epochs")
    rotate_degrees: float = _opt("training", 0.0, "CFLOW with --no-cache: rotate each fit image about its centre by "
                                 "an angle in degrees drawn uniformly from [-rotate_degrees, rotate_degrees] every "
                                 "time it is trained on (the official code's RandomRotation(5)); 0 = none")
    val_fraction: float = _opt("training", 0.1, "seeded fraction of the normal training images held out of the fit: "
                               "their NLL picks the kept epoch (epoch 0 included) and their scores set the decision "
                               "threshold; 0 = the papers' fixed-epoch training on all images")
    patience: int = _opt("training", 1, "with held-out images: stop once this many epochs in a row have not lowered "
                         "the held-out NLL (the kept weights are the best epoch's either way); 0 = run every epoch")
    held_out_checks: int = _opt("training", 1, "SANF: held-out NLL measurements per epoch, each after an equal share "
                                "of its batches (1 = after every epoch); with more, the kept weights may come from "
                                "within an epoch and patience counts measurements")
    threshold_fpr: float = _opt("training", 0.01, "decision threshold = the (1 - threshold_fpr) quantile of the "
                                "held-out normal images' scores (no test image is used)")

    # baselines
    knn_k: int = _opt("baselines", 2, "kNN baseline: neighbours (cosine distance)")
    gaussian_shrinkage: float = _opt("baselines", 0.0, "Gaussian baseline: covariance shrinkage in [0, 1]; "
                                     "0 = Ledoit-Wolf")

    # run
    seed: int = _opt("run", 0, "seed of subsets, held-out split, permutations, initialisation and shuffling")
    device: str = _opt("run", "cpu", "torch device: cpu, cuda, cuda:1, ...")
    threads: int = _opt("run", 0, "torch CPU threads (0 = all cores)")
    compile: bool = _opt("run", False, "CFLOW: torch.compile the training step's flow and loss (needs a C++ "
                         "compiler; compiles each stage in the first epoch); same numbers up to float rounding")
    stage_workers: int = _opt("run", 1, "CFLOW on CPU with cached features: processes that train the stages' "
                              "decoders side by side, sharing --threads among them; 1 = one "
                              "stage after the other in this process; same numbers up to float rounding")
    results_dir: str = _opt("run", "results", "folder that holds one folder per run")
    eval_only: bool = _opt("run", False, "main.py: rescore the run's saved checkpoints, without training, into "
                           "<run folder>/eval_only/")

    def class_list(self) -> list[str] | None:
        """The requested normal classes, or None for all of the dataset's classes."""
        if self.classes.strip() in ("", "all"):
            return None
        return [name.strip() for name in self.classes.split(",") if name.strip()]

    def layers_auto(self) -> bool:
        """Whether CFLOW's stages are left to the feature extractor (``--layers auto``)."""
        return self.layers.strip() == "auto"

    def layer_list(self) -> list[str]:
        """The CFLOW backbone stages as named; [] for ``auto``, which the feature extractor resolves from the
        backbone (``FeatureExtractor.layers``)."""
        if self.layers_auto():
            return []
        return [name.strip() for name in self.layers.split(",") if name.strip()]

    def uses_stages(self) -> bool:
        """Whether the method reads CFLOW's stage maps (``layers``): cflow and sanf_cflow."""
        return self.method in ("cflow", "sanf_cflow")

    def uses_tokens(self) -> bool:
        """Whether the method reads the semantic and texture tokens: every method but cflow."""
        return self.method != "cflow"

    def scale_list(self) -> tuple[float, ...]:
        """The image scales of the semantic token, as numbers (ValueError when one is not a number)."""
        return tuple(float(part) for part in self.scales.split(",") if part.strip())

    def cached_views(self, split: str) -> int:
        """Views stored per image in a cache unit: a training unit also holds the held-out images' views."""
        return max(self.train_views, self.test_views) if split == "train" else self.test_views

    def resolved_data_root(self) -> str:
        return os.path.expanduser(self.data_root or os.environ.get("ANOMALY_DATA_ROOT", ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}
_TYPES: dict[str, type] = get_type_hints(Config)
_DEFAULTS = {name: f.default for name, f in _FIELDS.items()}

# Training and head settings each method owns; knn and gaussian train nothing.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # SANF-AD paper §3.2 (the field defaults); the paper gives no epoch count.
    # Adam's eps is the public code's (the paper gives none).
    "sanf": dict(n_flow_layers=4, clamp=3.0, hidden=1024, heads=4, lr=5e-5, beta1=0.8, beta2=0.8, adam_eps=1e-4,
                 weight_decay=1e-5, batch_size=32, epochs=10, grad_clip=0.0),
    # CFLOW-AD official code, except permute_soft off as anomalib (soft permutations are drawn from SO(C), very
    # slow above 512 channels) and the epochs: the official 25 x 8 epochs with warm-up and cosine decay
    # (--lr_schedule official --epochs 200) are more than a CPU can afford, so 10 at a constant lr.
    "cflow": dict(n_flow_layers=8, clamp=1.9, condition_dims=128, fiber_batch=256, lr=2e-4, beta1=0.9, beta2=0.999,
                  adam_eps=1e-8, weight_decay=0.0, batch_size=32, epochs=10, grad_clip=0.0, permute_soft=False,
                  patience=2),
    # the two heads' own (head_config)
    "sanf_cflow": {},
    "knn": {},
    "gaussian": {},
}

# A preset picks data and features (fields of PRESET_GROUPS), never training settings.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(method="sanf", dataset="digits", backbone="tf_efficientnet_lite0", img_size=64, patch_grid=2,
                 token_norm="power"),
    "sanf_cifar10": dict(method="sanf", dataset="cifar10"),
    "sanf_cifar10_lite0": dict(method="sanf", dataset="cifar10", backbone="tf_efficientnet_lite0", img_size=224,
                               patch_grid=3, token_norm="power"),
    # CFLOW's stages follow the backbone (--layers auto): layer2-4 of the WideResNet, blocks.2/4/6 of Lite0
    "cflow_mvtec": dict(method="cflow", dataset="mvtec", backbone="wide_resnet50_2.tv_in1k", img_size=256),
    "cflow_lite0": dict(method="cflow", dataset="mvtec", backbone="tf_efficientnet_lite0", img_size=256),
    # DifferNet's recipe on Magnetic Tile Defects (an MVTec-style folder): 448 px, three scales, right-angle views
    "mtd_lite0": dict(dataset="folder", backbone="tf_efficientnet_lite0", img_size=448, patch_grid=3,
                      token_norm="power", scales="1,0.5,0.25", view_set="rot90", train_views=8, test_views=8),
}
PRESET_NOTES: dict[str, str] = {
    "demo": "offline CPU demo: sklearn digits at 64 px, packaged EfficientNet-Lite0 weights, every digit in turn",
    "sanf_cifar10": "SANF-AD as published: CIFAR-10, ViT-B/16 at 384 px, 8x8 pooled patches",
    "sanf_cifar10_lite0": "SANF on a CPU: CIFAR-10, EfficientNet-Lite0 at 224 px, 3x3 pooled patches, power norm",
    "cflow_mvtec": "CFLOW-AD as in the official code: MVTec AD, WideResNet-50-2 layer2-4 at 256 px",
    "cflow_lite0": "CFLOW on a CPU: MVTec AD, EfficientNet-Lite0 stages at strides 8/16/32, 256 px",
    "mtd_lite0": "Magnetic Tile Defects (a defect folder): EfficientNet-Lite0 at 448 px, tokens at scales 1, 1/2 and "
                 "1/4, 8 right-angle views of every training and test image",
}


class ConfigError(ValueError):
    """A bad preset, field, file or value; the message names the valid ones."""


def _check_names(names: Any, where: str) -> None:
    unknown = sorted(set(names) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(_FIELDS)}")


def _check_tables() -> None:
    """Presets set data and features only; method defaults set neither; every preset has a note."""
    for name, values in PRESETS.items():
        _check_names(values, f"preset {name}")
        outside = sorted(key for key in values if _FIELDS[key].metadata["group"] not in PRESET_GROUPS)
        if outside:
            raise ConfigError(f"preset {name} sets {', '.join(outside)}: a preset may only set fields of the groups "
                              f"{', '.join(PRESET_GROUPS)}")
    for method, values in METHOD_DEFAULTS.items():
        _check_names(values, f"METHOD_DEFAULTS[{method}]")
        inside = sorted(key for key in values if _FIELDS[key].metadata["group"] in PRESET_GROUPS)
        if inside:
            raise ConfigError(f"METHOD_DEFAULTS[{method}] sets {', '.join(inside)}, which presets own")
    if set(METHOD_DEFAULTS) != set(METHODS) or set(PRESET_NOTES) != set(PRESETS):
        raise ConfigError("METHOD_DEFAULTS must cover METHODS and PRESET_NOTES must cover PRESETS")
    _check_names(HELP_FIELDS, "HELP_FIELDS")


_check_tables()


def _has_type(name: str, value: Any) -> bool:
    """value is of the field's type (an int also passes as a float, a bool never as an int)."""
    kind = _TYPES[name]
    return type(value) is kind or (kind is float and type(value) is int)


def _resolve(preset: str, top: dict[str, Any]) -> dict[str, Any]:
    """Field defaults < METHOD_DEFAULTS[method] < PRESETS[preset] < top; method from the highest layer setting it."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    _check_names(top, "overrides")
    method = top.get("method", PRESETS[preset].get("method", _DEFAULTS["method"]))
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return {**_DEFAULTS, **METHOD_DEFAULTS[method], **PRESETS[preset], **top}


def _build(values: dict[str, Any]) -> Config:
    """A validated Config; integers given for float fields (JSON files) become floats."""
    values = {name: float(value) if _TYPES[name] is float and type(value) is int else value
              for name, value in values.items()}
    config = Config(**values)
    validate(config)
    return config


def head_config(config: Config, head: str) -> Config:
    """The settings of one head (``sanf`` or ``cflow``) of ``--method sanf_cflow``: the run's, as ``--method
    head``, with the head method's training default for every field that method owns and the run left at the
    field's default (so CFLOW's head trains at CFLOW's lr and SANF's at SANF's; ``--epochs 5`` applies to both)."""
    owned = {name: value for name, value in METHOD_DEFAULTS[head].items() if getattr(config, name) == _DEFAULTS[name]}
    return replace(config, method=head, **owned)


def make_config(preset: str = "demo", **overrides: Any) -> Config:
    """A preset with overrides applied (the top layer); raises ConfigError naming the valid presets / fields."""
    return _build(_resolve(preset, overrides))


def validate(config: Config) -> None:
    """Types and the value checks argparse cannot express; raises ConfigError."""
    for name, f in _FIELDS.items():
        value = getattr(config, name)
        if not _has_type(name, value):
            raise ConfigError(f"{name} must be {_TYPES[name].__name__}, got {value!r}")
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise ConfigError(f"{name}={value!r} is not one of: {', '.join(f.metadata['choices'])}")
        if _TYPES[name] in (int, float) and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    for name in ("img_size", "stage_workers", "n_flow_layers", "hidden", "heads", "batch_size", "fiber_batch",
                 "test_batch_size", "extract_batch_size", "knn_k", "condition_dims", "patch_grid", "held_out_checks",
                 "sub_epochs"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.adam_eps > 0:
        raise ConfigError(f"adam_eps must be > 0 (it keeps Adam's step finite), got {config.adam_eps}")
    if not config.gaussian_shrinkage <= 1:
        raise ConfigError(f"gaussian_shrinkage must lie in [0, 1], got {config.gaussian_shrinkage}")
    if not config.val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must lie in [0, 0.5], got {config.val_fraction}")
    if not 0 < config.threshold_fpr < 1:
        raise ConfigError(f"threshold_fpr must lie in (0, 1), got {config.threshold_fpr}")
    check_lr_schedule(config)
    check_views_and_scales(config)
    if config.condition_dims % 4:
        raise ConfigError(f"condition_dims must be a multiple of 4, got {config.condition_dims}")
    if not config.cache and config.method != "cflow":
        raise ConfigError(f"--no-cache computes CFLOW's features on every batch; method {config.method} reads its "
                          "features from the cache: drop --no-cache")
    if config.rotate_degrees and (config.method != "cflow" or config.cache):
        raise ConfigError("--rotate_degrees rotates the images CFLOW trains on, so their features are computed anew "
                          "every epoch: use it with --method cflow and --no-cache, or drop it")
    if not config.rotate_degrees <= 180:
        raise ConfigError(f"rotate_degrees must lie in [0, 180], got {config.rotate_degrees}")
    on_cpu = config.device.split(":")[0] == "cpu"
    if config.stage_workers > 1 and (not config.uses_stages() or not config.cache or not on_cpu):
        raise ConfigError("--stage_workers > 1 trains CFLOW's decoders in CPU processes over cached features: use it "
                          "with --method cflow (or sanf_cflow), --cache and --device cpu, or drop it")
    if config.uses_stages() and not config.layer_list() and not config.layers_auto():
        raise ConfigError(f"method={config.method} needs --layers: backbone module names, comma-separated, or auto")
    if config.uses_stages() and config.layer_list():  # --layers auto: checked once the extractor resolves it
        check_scoring_stages(config.scoring, config.layer_list())
    else:
        check_scoring_stages(config.scoring, None)


def check_views_and_scales(config: Config) -> None:
    """Views the view set has; scales that are numbers in (0, 2] leaving at least 16 px, the first 1; raises
    ConfigError."""
    from views import check_views  # torch is imported there; the check itself is torch-free

    for name in ("train_views", "test_views"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1 (1 = the image itself), got {getattr(config, name)}")
        try:
            check_views(config.view_set, getattr(config, name))
        except ValueError as error:
            raise ConfigError(f"--{name}: {error}") from None
    try:
        scales = config.scale_list()
    except ValueError:
        raise ConfigError(f"--scales takes numbers, comma-separated (e.g. 1,0.5,0.25), got {config.scales!r}") from None
    if not scales or scales[0] != 1 or any(not 0 < s <= 2 or round(config.img_size * s) < 16 for s in scales[1:]):
        raise ConfigError(f"--scales {config.scales}: the first scale must be 1 (the texture tokens' scale), the "
                          f"others in (0, 2] and at least 16 px at --img_size {config.img_size}")
    if config.view_statistics == "per_view":
        if config.method not in ("sanf", "gaussian", "sanf_cflow") or config.train_views < 2:
            raise ConfigError("--view_statistics per_view fits one Gaussian per view index: use it with --method sanf, "
                              "gaussian or sanf_cflow and --train_views 2 or more, or drop it")
        if config.test_views > config.train_views:
            raise ConfigError(f"--view_statistics per_view scores view v with view v's statistics, so --test_views "
                              f"({config.test_views}) cannot exceed --train_views ({config.train_views})")
        if config.token_dim or config.flow_channels:
            raise ConfigError("--view_statistics per_view whitens every channel: use it with --token_dim 0 and "
                              "--flow_channels 0")
    if max(config.train_views, config.test_views) > 1 and not config.cache:
        raise ConfigError("views are extracted once into the feature cache: drop --no-cache, or use --train_views 1 "
                          "--test_views 1 (--rotate_degrees rotates images on the fly)")


def check_lr_schedule(config: Config) -> None:
    """--lr_schedule official: CFLOW only, a whole number of meta-epochs, more than the 2 of the warm-up."""
    if config.lr_schedule == "constant":
        return
    if config.method != "cflow":
        raise ConfigError(f"--lr_schedule {config.lr_schedule} is CFLOW-AD's official schedule; method "
                          f"{config.method} trains at a constant lr: drop it")
    if config.epochs % config.sub_epochs or config.epochs // config.sub_epochs < 3:
        raise ConfigError(f"--lr_schedule official runs whole meta-epochs of --sub_epochs {config.sub_epochs} epochs, "
                          f"at least 3 (2 of them warm up); --epochs {config.epochs} is not a multiple of "
                          f"{config.sub_epochs} of at least {3 * config.sub_epochs}: pass --epochs 200 (the official "
                          "25 x 8) or another such multiple")


def check_scoring_stages(scoring: str, layers: list[str] | None, resolved_from_auto: bool = False) -> None:
    """--scoring parses and names only stages that ``layers`` extracts (None: any); raises ConfigError.

    ``resolved_from_auto``: ``layers`` are the stages ``--layers auto`` resolved to (the message says so)."""
    if scoring == "auto":
        return
    from anomaly_map import ScoringRule  # torch-free parsing would duplicate the rule's grammar

    try:
        rule = ScoringRule.parse(scoring)
    except ValueError as error:
        raise ConfigError(f"--scoring: {error}") from None
    extra = [stage for stage in rule.stages if layers is not None and stage not in layers]
    if extra:
        asked = f"auto (here {','.join(layers)})" if resolved_from_auto else f"({','.join(layers)})"
        raise ConfigError(f"--scoring names stages {extra} that --layers {asked} does not extract")


def _read_config_file(path: str) -> dict[str, Any]:
    """The field values of a JSON file: a config dict, or a results.json whose "config" key holds one."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds no JSON object of fields")
    _check_names(data, f"config file {path}")
    for name, value in data.items():
        if not _has_type(name, value):
            raise ConfigError(f"config file {path}: {name} must be {_TYPES[name].__name__}, got {value!r}")
    missing = set(_FIELDS) - set(data)
    if missing and missing <= set(FIELDS_ADDED_LATER):  # every field but some added later: a saved run
        data = as_trained_before(data)
    return data


FIELDS_ADDED_LATER: dict[str, Any] = {"adam_eps": 1e-8, "lr_schedule": "constant", "sub_epochs": 8,
                                      "rotate_degrees": 0.0, "view_set": "rot90", "train_views": 1, "test_views": 1,
                                      "scales": "1", "view_statistics": "pooled"}
"""Fields added after runs had been saved, with the value every run saved before them trained with (Adam's eps
was torch's default; the learning rate was constant; no image was rotated; each image was one view at one scale,
with one set of statistics for all views)."""


def as_trained_before(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved settings (a checkpoint's, or a results.json's) with the fields added since, as they trained."""
    return {**FIELDS_ADDED_LATER, **saved}


_USAGE = "%(prog)s [--preset NAME] [--method METHOD] [--config FILE]\n       [--FIELD VALUE ...] [-h] [--help-all]"


def _parser(prog: str | None, **kwargs: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, usage=_USAGE, allow_abbrev=False, **kwargs)


def _field_help(name: str, every_field: bool) -> str:
    """The help text of a field: its full doc for --help-all, its HELP_FIELDS line or nothing for --help."""
    if not every_field and name not in HELP_FIELDS:
        return argparse.SUPPRESS
    text = _FIELDS[name].metadata["doc"] if every_field else HELP_FIELDS[name]
    return text.replace("%", "%%") + " (default: %(default)s)"


def _full_parser(prog: str | None, preset: str, defaults: dict[str, Any], every_field: bool) -> argparse.ArgumentParser:
    """The parser generated from the fields, with the resolved values as defaults; its help lists every field
    with ``every_field``, else HELP_FIELDS (the others parse all the same)."""
    description = __doc__ if every_field else _SHORT_DESCRIPTION
    parser = _parser(prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_argument_group("preset and config file")
    notes = ("; ".join(f"{name}: {note}" for name, note in PRESET_NOTES.items()) if every_field
             else ", ".join(PRESETS) + " (--help-all describes each)")
    top.add_argument("--preset", choices=PRESETS, default=preset, metavar="NAME",
                     help=f"data and features set (never training values): {notes} (default: %(default)s)")
    top.add_argument("--config", metavar="FILE", help="JSON file of field values: a config dict or a results.json "
                     "(its \"config\" key); flags override it")
    top.add_argument("--help-all", action="help", help="show every setting, grouped, and exit")
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for name, f in _FIELDS.items():
        kind, group, doc = _TYPES[name], groups[f.metadata["group"]], _field_help(name, every_field)
        if kind is bool:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=defaults[name], help=doc)
        else:
            metavar = None if f.metadata["choices"] else kind.__name__.upper()
            group.add_argument(f"--{name}", type=kind, choices=f.metadata["choices"], metavar=metavar,
                               default=defaults[name], help=doc)
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Config:
    """The Config of a command line (sys.argv[1:] when argv is None).

    argparse errors (unknown flag, bad type or choice) print the usage and one ``error:`` line and exit 2;
    an unreadable --config file and values that fail :func:`validate` raise ConfigError, which the scripts
    print as one line before exiting 2.
    """
    pre = _parser(prog, add_help=False)
    pre.add_argument("--preset", choices=PRESETS)
    pre.add_argument("--method", choices=METHODS)
    pre.add_argument("--config")
    pre.add_argument("--img_size")
    pre.add_argument("--help-all", action="store_true")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset or "demo"
    top = _read_config_file(known.config) if known.config else {}
    if known.method:
        top["method"] = known.method
    args = vars(_full_parser(prog, preset, _resolve(preset, top), known.help_all).parse_args(argv))
    del args["preset"], args["config"]
    config = _build(args)
    demo = PRESETS["demo"]
    if known.preset is None and not known.config and known.img_size is None and config.dataset != demo["dataset"]:
        print(f"note: without --preset the data and feature fields not given are the demo preset's, so "
              f"{config.dataset} images are resized to {config.img_size} px for {config.backbone}; pass --img_size "
              "(256 for defect images, as --preset cflow_lite0) or a --preset")
    return config


def describe(config: Config) -> str:
    """The resolved configuration as printed at the start of every run."""
    return json.dumps(config.to_dict(), indent=1, sort_keys=False)
