"""Every setting of the project: one typed dataclass, per-method training defaults, data/feature presets.

Both scripts take the same command line::

    python extractor.py --preset sanf_cifar10_lite0 --data_root ~/data/cifar10
    python main.py      --preset sanf_cifar10_lite0 --data_root ~/data/cifar10 --fusion none
    python main.py      --config results/<run>/results.json --eval_only

Each setting is resolved from, lowest to highest: the field defaults (SANF-AD's published setting), the
training defaults of --method, the --preset (data and features only; demo when omitted), the values of a
--config JSON file, then explicit flags. --method itself comes from the highest layer that sets it
(flag, file, preset, else sanf). --help shows the defaults in force for the given --preset and --method.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

METHODS = ("sanf", "cflow", "knn", "gaussian")
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


def _opt(group: str, default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"group": group, "doc": doc, "choices": choices})


@dataclass(frozen=True)
class Config:
    """Resolved settings of one run; field defaults are SANF-AD's published setting (``sanf_cifar10``)."""

    # data
    method: str = _opt("data", "sanf", "sanf: flow over the semantic token with CAFF; cflow: multi-scale conditional "
                       "flows with anomaly maps; knn / gaussian: baselines on the same cache", METHODS)
    dataset: str = _opt("data", "cifar10", "dataset and protocol (datasets.py)", DATASETS)
    data_root: str = _opt("data", "", "dataset folder; env ANOMALY_DATA_ROOT when empty (not needed for digits)")
    classes: str = _opt("data", "all", "'all' or a comma list of class / category names used as the normal class "
                        "in turn")
    download: bool = _opt("data", False, "let torchvision download CIFAR/STL/MNIST into data_root (needs internet)")
    max_train_per_class: int = _opt("data", 0, "quick subset: at most this many training images per normal class, "
                                    "drawn with the seed; 0 = full protocol")
    max_test: int = _opt("data", 0, "quick subset: at most this many test images, stratified by label, drawn with "
                         "the seed; 0 = full protocol")

    # features
    backbone: str = _opt("features", "vit_base_patch16_384.orig_in21k_ft_in1k", "timm model name (public SANF "
                         "code: ViT-B/16 at 384 px, ImageNet-21k pretrained, fine-tuned on 1k)")
    weights: str = _opt("features", "default", "'default': packaged weights (tf_efficientnet_lite0) or the hub when "
                        "online; a path: local state dict loaded strictly; 'none': random init, explicitly")
    img_size: int = _opt("features", 384, "input resolution (square resize)")
    patch_grid: int = _opt("features", 8, "SANF: texture tokens average-pooled to patch_grid x patch_grid (public "
                           "code 8)")
    texture_layers: str = _opt("features", "auto", "SANF: where the texture tokens come from. auto: a ViT's final "
                               "normalised patch tokens (the paper), a CNN's stride-16 stage (a texture-level stage, "
                               "chosen on training data with bench/validate.py; never the pooled last stage); last: "
                               "the final feature map (what the semantic token pools); or backbone module names, "
                               "comma-separated, each pooled to the grid and concatenated along channels")
    layers: str = _opt("features", "auto", "CFLOW: backbone stages, module names comma-separated, or auto: a CNN's "
                       "stages at strides 8, 16 and 32 of timm's feature_info (the paper's layer2-4 of a ResNet; "
                       "EfficientNet-Lite0 blocks.2,blocks.4,blocks.6), a ViT's blocks at a third, two thirds and "
                       "the end of its depth (12 blocks: blocks.3,blocks.7,blocks.11)")
    token_norm: str = _opt("features", "none", "sanf / knn / gaussian: per-token normalisation of the cached "
                           "features: none (public code), l2 (unit length: the cosine geometry of the kNN baseline), "
                           "power (signed square root, then unit length)", ("none", "l2", "power"))
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
    caff_context: str = _opt("sanf", "auto", "full: keys/values from all texture-token channels through a context "
                             "projection, any texture width (paper's Eq. 6-11); half: the texture-token channel half "
                             "that follows the flow's permutation (public code; texture tokens as wide as the "
                             "semantic token); auto: where the texture tokens are as wide as the semantic token (a "
                             "ViT's final or block tokens, a CNN's --texture_layers last) and images are held out, "
                             "train both and keep the one with the lower held-out NLL of normal training images (a "
                             "tie keeps full); otherwise full (a CNN's texture stage, or val_fraction 0); a "
                             "checkpoint trained with auto accepts auto or the reading it kept; unused with "
                             "--fusion none",
                             ("full", "half", "auto"))
    token_dim: int = _opt("sanf", 0, "channels the flow works on; the tokens are projected on the first token_dim "
                          "principal axes of the normal training tokens (0 = all D channels, as the paper)")
    flow_channels: int = _opt("sanf", 0, "the flow transforms the first flow_channels principal axes of the whitened "
                              "semantic token and leaves the others as the whitened Gaussian (0 = all, as the paper): "
                              "fewer dimensions to fit when normal images are few")
    train_noise: float = _opt("sanf", 0.0, "std of Gaussian noise added to the whitened semantic tokens while training "
                              "(0 = none, as the paper): a regulariser for few images in many dimensions")
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
    scoring: str = _opt("cflow", "exp/max", "how an image's score comes from the stage maps (anomaly_map.py; the "
                        "anomaly map itself is always the paper's): merge/score[@stage+stage]; merge exp (the paper: "
                        "sum of exp(log p) over stages) or z (stages standardised on training fibers, averaged); score "
                        "max (the paper) or topK (mean of the K% highest pixels, K in 1, 10); auto: chosen after "
                        "training on held-out normal training images and synthetic defects made from them "
                        "(synthetic.py), never on a test split; the paper's rule unless another separates them better "
                        "by more than the standard error of its AUROC (the rules are compared on maps normalised "
                        "with training statistics, as --map_norm train, whatever --map_norm is). The official "
                        "scoring is exp/max with --map_norm test, anomalib's exp/max with --map_norm batch")
    test_batch_size: int = _opt("cflow", 32, "images per scoring batch")
    n_figure_images: int = _opt("cflow", 6, "test images drawn in each category's figure")
    save_maps: bool = _opt("cflow", False, "write every test image's anomaly map (.npy, float16) under the results "
                           "folder")

    # training
    epochs: int = _opt("training", 10, "training epochs at most; with val_fraction > 0 the epoch with the lowest "
                       "held-out NLL is kept")
    batch_size: int = _opt("training", 32, "training images per batch (SANF: per Adam step, paper 32; CFLOW: images "
                           "whose fibers are shuffled together, official 32)")
    lr: float = _opt("training", 5e-5, "Adam learning rate (SANF paper 5e-5; CFLOW official 2e-4)")
    beta1: float = _opt("training", 0.8, "Adam beta1 (SANF paper 0.8; CFLOW 0.9)")
    beta2: float = _opt("training", 0.8, "Adam beta2 (SANF paper 0.8; CFLOW 0.999)")
    adam_eps: float = _opt("training", 1e-4, "Adam epsilon (SANF public code 1e-4, DifferNet's; the paper gives none; "
                           "CFLOW 1e-8, torch's default as in its official code)")
    weight_decay: float = _opt("training", 1e-5, "Adam weight decay (SANF paper 1e-5; CFLOW 0)")
    grad_clip: float = _opt("training", 0.0, "max gradient norm (0 = off, as the public code)")
    lr_schedule: str = _opt("training", "constant", "CFLOW: constant (lr throughout, as anomalib) or official "
                            "(CFLOW-AD's code: a meta-epoch is sub_epochs epochs; over the first 2 meta-epochs lr "
                            "rises per image batch from lr/10 to the cosine value of meta-epoch 2, then it follows a "
                            "cosine from lr to lr*1e-3 over epochs/sub_epochs meta-epochs, stepped once per "
                            "meta-epoch; the official run is --epochs 200: 25 x 8)", ("constant", "official"))
    sub_epochs: int = _opt("training", 8, "CFLOW with --lr_schedule official: epochs per meta-epoch (official 8); "
                           "epochs must be a multiple of it, at least 3 meta-epochs")
    rotate_degrees: float = _opt("training", 0.0, "CFLOW with --no-cache: each fit image rotated about its centre by "
                                 "an angle drawn uniformly from [-rotate_degrees, rotate_degrees] every time it is "
                                 "trained on (nearest neighbour, black corners: the official code's RandomRotation(5)); "
                                 "0 = none (cached features cannot be rotated)")
    val_fraction: float = _opt("training", 0.1, "seeded fraction of the normal training images held out of the fit: "
                               "their likelihood picks the kept epoch (lowest held-out NLL, epoch 0 included: "
                               "training never ends worse on them than it started) and their scores set the decision "
                               "threshold; every method fits on the same remaining images; 0 = the papers' "
                               "fixed-epoch training on all images")
    patience: int = _opt("training", 1, "with held-out images: stop once this many epochs in a row have not lowered "
                         "the held-out NLL (the kept weights are the best epoch's either way); 0 = run every epoch. "
                         "SANF 1: its held-out NLL has risen monotonically once it rose (BENCHMARKS.md); CFLOW 2: "
                         "its curve has single-epoch bumps")
    held_out_checks: int = _opt("training", 1, "SANF: held-out NLL measurements per epoch, each after an equal share "
                                "of its batches (1 = after every epoch); with more, the kept weights may come from "
                                "within an epoch and patience counts measurements, so a flow that only worsens stops "
                                "after a fraction of an epoch")
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
    compile: bool = _opt("run", False, "CFLOW: torch.compile the training step's flow and loss (inductor; needs a C++ "
                         "compiler; about 10 s of compilation per stage in the first epoch): fewer, fused "
                         "kernels per Adam step, which matters at small fiber batches; same numbers up to rounding")
    stage_workers: int = _opt("run", 1, "CFLOW on CPU with cached features: processes that train the stages' "
                              "decoders side by side, the stages grouped by cost (fibers per image x decoder "
                              "parameters), each process with threads / groups torch threads; 1 = one "
                              "stage after the other in this process. Each stage has its own shuffling generator, "
                              "so the numbers are the same either way up to the float rounding of another thread "
                              "count. 2 on two cores: 1.25-1.6x faster epochs at 64 fibers per step (BENCHMARKS.md)")
    results_dir: str = _opt("run", "results", "results folder")
    eval_only: bool = _opt("run", False, "main.py: rescore the saved checkpoints without training, into "
                           "<run folder>/eval_only/ (the run's own results stay); the checkpoints' settings are "
                           "required")

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
}
PRESET_NOTES: dict[str, str] = {
    "demo": "offline CPU demo: sklearn digits at 64 px, packaged EfficientNet-Lite0 weights, every digit in turn",
    "sanf_cifar10": "SANF-AD as published: CIFAR-10, ViT-B/16 at 384 px, 8x8 pooled patches",
    "sanf_cifar10_lite0": "SANF on a CPU: CIFAR-10, EfficientNet-Lite0 at 224 px, 3x3 pooled patches, power norm",
    "cflow_mvtec": "CFLOW-AD as in the official code: MVTec AD, WideResNet-50-2 layer2-4 at 256 px",
    "cflow_lite0": "CFLOW on a CPU: MVTec AD, EfficientNet-Lite0 stages at strides 8/16/32, 256 px",
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
    if config.stage_workers > 1 and (config.method != "cflow" or not config.cache or not on_cpu):
        raise ConfigError("--stage_workers > 1 trains CFLOW's decoders in CPU processes over cached features: use it "
                          "with --method cflow, --cache and --device cpu, or drop it")
    if config.method == "cflow" and not config.layer_list() and not config.layers_auto():
        raise ConfigError("method=cflow needs --layers: backbone module names, comma-separated, or auto")
    if config.method == "cflow" and config.layer_list():  # --layers auto: checked once the extractor resolves it
        check_scoring_stages(config.scoring, config.layer_list())
    else:
        check_scoring_stages(config.scoring, None)


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
                                      "rotate_degrees": 0.0}
"""Fields added after runs had been saved, with the value every run saved before them trained with (Adam's eps
was torch's default; the learning rate was constant; no image was rotated)."""


def as_trained_before(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved settings (a checkpoint's, or a results.json's) with the fields added since, as they trained."""
    return {**FIELDS_ADDED_LATER, **saved}


_USAGE = "%(prog)s [--preset NAME] [--method METHOD] [--config FILE] [--FIELD VALUE ...] [-h]"


def _parser(prog: str | None, **kwargs: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, usage=_USAGE, allow_abbrev=False, **kwargs)


def _full_parser(prog: str | None, preset: str, defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """The parser generated from the fields, with the resolved values as defaults."""
    parser = _parser(prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_argument_group("preset and config file")
    notes = "; ".join(f"{name}: {note}" for name, note in PRESET_NOTES.items())
    top.add_argument("--preset", choices=PRESETS, default=preset, metavar="NAME",
                     help=f"data and features set (never training values): {notes} (default: %(default)s)")
    top.add_argument("--config", metavar="FILE", help="JSON file of field values: a config dict or a results.json "
                     "(its \"config\" key); flags override it")
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for name, f in _FIELDS.items():
        kind, doc = _TYPES[name], f.metadata["doc"].replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            groups[f.metadata["group"]].add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                                                     default=defaults[name], help=doc)
        else:
            groups[f.metadata["group"]].add_argument(f"--{name}", type=kind, choices=f.metadata["choices"],
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
    known, _ = pre.parse_known_args(argv)
    preset = known.preset or "demo"
    top = _read_config_file(known.config) if known.config else {}
    if known.method:
        top["method"] = known.method
    args = vars(_full_parser(prog, preset, _resolve(preset, top)).parse_args(argv))
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
