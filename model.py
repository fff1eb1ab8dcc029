"""The flows and the detectors that own the path from images to scores and maps.

- :class:`CFlowModel`: CFLOW-AD (Gudovskiy, Ishizaka and Kozuka, WACV 2022), one conditional flow
  per stage of a frozen CNN. Every spatial position of a stage's feature map (B, C, H, W) is a
  *fiber*, mapped to z ~ N(0, I_C) conditioned on a 2-D positional encoding of (h, w); fibers are
  scored by log p / C (the loss and the anomaly maps, ``anomaly_map.py``). Defaults follow the
  official code (github.com/gudovskiy/cflow-ad); differences from anomalib are named.
- :class:`SANFModel`: SANF-AD (Ma, Lan et al., ICME 2023), a fixed whitening then the CAFF flow
  (``fusion.py``) over the semantic token, conditioned on the texture tokens.
- Detectors (:class:`SANFDetector`, :class:`CFlowDetector`, :class:`SANFCFlowDetector` (both, as two
  heads on one backbone pass), :class:`KNNDetector`, :class:`GaussianDetector`): frozen backbone + fitted
  head + token normalisation + a decision threshold set on held-out normal training images, with ``fit`` /
  ``score`` / ``score_images`` / ``predict`` (paths, PIL images or tensors → :class:`Prediction`) / ``save``;
  :func:`load_detector`
  reads a checkpoint back (``torch.load(weights_only=True)``: no pickled code runs) and refuses
  settings it was not trained with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from tqdm import tqdm

from anomaly_map import (AnomalyMapGenerator, ScoringRule, StageStatistics, candidate_rules, on_cpu, select_scoring,
                         stage_statistics)
from baselines import GaussianScorer, KNNScorer, ViewWhitening
from config import Config, ConfigError, as_trained_before, head_config
from datasets import DataError, ImageList, InputLoader
from extractor import FeatureExtractor, image_batches, randomly_rotated
from fusion import build_sanf_flow
from synthetic import synthetic_defects
from train import TrainingError, train_cflow, train_sanf
from utils import atomic_torch_save, check_device, shrunk_covariance, to_numpy
from views import map_from_view

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
"""ln sqrt(2 pi); the official code's ``_GCONST_`` is its negative, -0.9189385332046727."""


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """Sinusoidal 2-D positional encoding, as ``positionalencoding2d`` in the official code.

    The first half of the channels encodes the column (x, along width), the second half the
    row (y, along height); within each half, even channels hold sines and odd ones cosines.

    Args:
        channels: number of encoding channels P; must be divisible by 4.
        height: number of rows H.
        width: number of columns W.

    Returns:
        Tensor (channels, height, width), float32.

    Raises:
        ValueError: if ``channels`` is not divisible by 4.
    """
    if channels % 4 != 0:
        raise ValueError(f"channels must be divisible by 4 for a 2-D sin/cos encoding, got {channels}")
    half = channels // 2
    div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # (half/2,)
    pos_w = torch.arange(0.0, width).unsqueeze(1) * div_term  # (W, half/2)
    pos_h = torch.arange(0.0, height).unsqueeze(1) * div_term  # (H, half/2)
    encoding = torch.zeros(channels, height, width)
    encoding[0:half:2] = torch.sin(pos_w).T.unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(pos_w).T.unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(pos_h).T.unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(pos_h).T.unsqueeze(2).expand(-1, -1, width)
    return encoding


def subnet_fc(dims_in: int, dims_out: int) -> nn.Sequential:
    """Coupling subnetwork Linear(i, 2i)-ReLU-Linear(2i, o), as in the official code and anomalib."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


@contextmanager
def _seeded_cpu_rngs(seed: int) -> Iterator[None]:
    """Seed numpy's global and torch's default CPU generator inside the block; restore both after.

    FrEIA 0.2 draws AllInOneBlock's hard permutation with ``np.random.permutation`` and the
    soft one with scipy's ``special_ortho_group.rvs`` (numpy's global state as well); the
    subnet weights come from torch's default CPU generator.
    """
    numpy_state = np.random.get_state()
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)


def build_cflow_decoder(
    in_channels: int,
    condition_dims: int = 128,
    n_blocks: int = 8,
    clamp: float = 1.9,
    permute_soft: bool = False,
    *,
    seed: int,
) -> Ff.SequenceINN:
    """Conditional flow over fibers of one stage (official ``cflow_head``, anomalib ``cflow_head``).

    Args:
        in_channels: fiber dimension C of the stage.
        condition_dims: positional-encoding dimension P; 128 (official ``condition_vec``, anomalib).
        n_blocks: number of AllInOneBlocks; 8 (official ``coupling_blocks``, anomalib).
        clamp: soft clamping of the affine log-scales; 1.9 (official ``clamp_alpha``, anomalib).
        permute_soft: random orthogonal (True) instead of hard permutations between blocks.
            The official code uses True; anomalib defaults to False because drawing from SO(C)
            is very slow above 512 channels (FrEIA warns).
        seed: seeds the permutations and the initial weights, so the same seed gives the
            same decoder; numpy's and torch's global generators are left as they were.

    Returns:
        SequenceINN mapping (M, C) fibers with conditions ``[(M, P)]`` to (z (M, C), log|det J| (M,)).
    """
    decoder = Ff.SequenceINN(in_channels)
    with _seeded_cpu_rngs(seed):
        for _ in range(n_blocks):
            decoder.append(
                Fm.AllInOneBlock,
                cond=0,
                cond_shape=(condition_dims,),
                subnet_constructor=subnet_fc,
                affine_clamping=clamp,
                global_affine_type="SOFTPLUS",
                permute_soft=permute_soft,
            )
    return decoder


class CFlowModel(nn.Module):
    """One conditional flow decoder per encoder stage; the encoder itself lives elsewhere.

    Args:
        stage_channels: channels C of each stage, keyed by the stage's module name in the
            encoder (e.g. ``{"blocks.2": 40, "blocks.4": 112}``); the order is kept.
        condition_dims: positional-encoding dimension P, divisible by 4; 128 (official, anomalib).
        n_blocks: coupling blocks per decoder; 8 (official, anomalib).
        clamp: affine clamping; 1.9 (official, anomalib).
        permute_soft: soft permutations; official True, anomalib False (default here: slow above
            512 channels).
        seed: decoder i (in ``stage_channels`` order) is built with seed ``seed + i``.

    Attributes:
        init_args: the arguments above, from which a process of the stage-parallel training builds its copy.
        stage_names: the stage names, in order.
        condition_dims: P.
        decoders: ModuleDict of the decoders, keyed by the stage name with '.' replaced by '_'
            (ModuleDict keys cannot hold '.'); use :meth:`decoder` to look one up by stage name.
    """

    def __init__(
        self,
        stage_channels: dict[str, int],
        condition_dims: int = 128,
        n_blocks: int = 8,
        clamp: float = 1.9,
        permute_soft: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if condition_dims % 4 != 0:
            raise ValueError(f"condition_dims must be divisible by 4, got {condition_dims}")
        self.init_args = dict(stage_channels=dict(stage_channels), condition_dims=condition_dims, n_blocks=n_blocks,
                              clamp=clamp, permute_soft=permute_soft, seed=seed)
        self.stage_names: tuple[str, ...] = tuple(stage_channels)
        self.stage_channels = dict(stage_channels)
        self._decoder_keys: dict[str, str] = {name: name.replace(".", "_") for name in self.stage_names}
        if len(set(self._decoder_keys.values())) != len(self.stage_names):
            raise ValueError(f"stage names collide once '.' is replaced by '_': {self.stage_names}")
        self.condition_dims = condition_dims
        self.decoders = nn.ModuleDict(
            {
                self._decoder_keys[name]: build_cflow_decoder(
                    channels, condition_dims, n_blocks, clamp, permute_soft, seed=seed + index
                )
                for index, (name, channels) in enumerate(stage_channels.items())
            }
        )
        self._flat_encodings: dict[tuple[int, int], Tensor] = {}

    def decoder(self, stage: str) -> Ff.SequenceINN:
        """The decoder of the stage named ``stage`` (its encoder module name)."""
        return self.decoders[self._decoder_keys[stage]]

    def fiber_log_likelihood_per_dim(self, stage: str, fibers: Tensor, conditions: Tensor) -> Tensor:
        """log p(fiber | condition) / C under the stage's flow, with gradients.

        log p = -C ln sqrt(2 pi) - ||z||^2 / 2 + log|det J|  (official ``get_logp``), divided by C.

        Args:
            stage: stage name.
            fibers: Tensor (M, C).
            conditions: Tensor (M, P).

        Returns:
            Tensor (M,).
        """
        channels = fibers.shape[1]
        z, log_jac_det = self.decoder(stage)(fibers, [conditions])
        log_likelihood = -channels * LOG_SQRT_2PI - 0.5 * z.pow(2).sum(dim=1) + log_jac_det
        return log_likelihood / channels

    def fibers_of(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten a feature map into fibers in (b, h, w) order, with their positional encodings.

        Args:
            feature_map: Tensor (B, C, H, W).

        Returns:
            fibers: Tensor (B*H*W, C), row b*H*W + h*W + w is ``feature_map[b, :, h, w]``.
            conditions: Tensor (B*H*W, P), the matching rows of the encoding, ``PE[:, h, w]``.
        """
        batch, channels, height, width = feature_map.shape
        fibers = feature_map.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        return fibers, self._flat_encoding(height, width, feature_map).repeat(batch, 1)

    def _flat_encoding(self, height: int, width: int, like: Tensor) -> Tensor:
        """Positional encoding as (H*W, P) rows in (h, w) order, cached per (H, W) on ``like``'s device/dtype."""
        cached = self._flat_encodings.get((height, width))
        if cached is None or cached.device != like.device or cached.dtype != like.dtype:
            encoding = positional_encoding_2d(self.condition_dims, height, width)
            cached = encoding.permute(1, 2, 0).reshape(height * width, self.condition_dims).to(like)
            self._flat_encodings[(height, width)] = cached
        return cached

    @torch.no_grad()
    def stage_log_likelihood_maps(self, features: dict[str, Tensor], chunk: int = 65536) -> dict[str, Tensor]:
        """Per-stage maps of log p / C for evaluation, without gradients, about ``chunk`` fibers at a time.

        Computes what :meth:`fiber_log_likelihood_per_dim` does for every fiber, up to float rounding, by
        :func:`folded_decoder_log_likelihood` (the positional encoding's share of each subnet's first
        layer computed once per position instead of once per fiber).

        Args:
            features: Tensor (B, C_l, H_l, W_l) per stage name.
            chunk: fibers per decoder call, rounded to whole images (memory bound only; results do not
                depend on it).

        Returns:
            Tensor (B, H_l, W_l) of log p / C per stage name.
        """
        maps = {}
        for stage, feature_map in features.items():
            batch, channels, height, width = feature_map.shape
            encoding = self._flat_encoding(height, width, feature_map)
            fibers = feature_map.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            images_per_call = max(1, chunk // (height * width))
            permutations = block_permutations(self.decoder(stage))
            log_likelihoods = [folded_decoder_log_likelihood(self.decoder(stage), image_chunk, encoding, permutations)
                               for image_chunk in fibers.split(images_per_call)]
            maps[stage] = torch.cat(log_likelihoods).reshape(batch, height, width)
        return maps


def block_permutations(decoder: Ff.SequenceINN) -> list[Tensor | None]:
    """Per AllInOneBlock of ``decoder``: the gather index of its permutation (FrEIA keeps a (C, C) matrix) when it
    is a hard permutation, None for a soft (orthogonal) one. Read with one host synchronisation for all blocks,
    once per decoder call instead of twice per block and chunk."""
    matrices = [block.w_perm.reshape(block.w_perm.shape[0], -1) for block in decoder.module_list]
    hard = torch.stack([((matrix == 0) | (matrix == 1)).all() & (matrix.sum(dim=1) == 1).all()
                        for matrix in matrices]).tolist()
    return [matrix.argmax(dim=1) if is_hard else None for matrix, is_hard in zip(matrices, hard)]


def folded_decoder_log_likelihood(decoder: Ff.SequenceINN, fibers: Tensor, encoding: Tensor,
                                  permutations: list[Tensor | None]) -> Tensor:
    """log p / C of a CFLOW decoder's fibers at every position of a grid, without autograd's bookkeeping.

    Each AllInOneBlock's subnet starts with ``W [x1; c] + b = W_x x1 + (W_c c + b)``. The condition c is the
    positional encoding, the same for every image, so ``W_c c + b`` is computed once per position and block
    and broadcast over the images: at Lite0's stride-8 stage (C = 40, P = 128) that is 86% of the first
    layer's work. A hard permutation, a (C, C) matrix product in FrEIA, becomes an index gather. The
    arithmetic is otherwise FrEIA 0.2's ``AllInOneBlock.forward`` (global affine SOFTPLUS/SIGMOID/EXP,
    no GIN, no Householder, no pre-permutation: what :func:`build_cflow_decoder` builds).

    Args:
        decoder: a conditional ``SequenceINN`` of AllInOneBlocks with ``subnet_fc`` subnets.
        fibers: Tensor (B, H*W, C), the fibers of B images in (h, w) order.
        encoding: Tensor (H*W, P), the positional encoding in the same order.
        permutations: the decoder's :func:`block_permutations`.

    Returns:
        Tensor (B, H*W) of log p / C.
    """
    channels = fibers.shape[-1]
    log_det = fibers.new_zeros(fibers.shape[:2])
    for block, permutation in zip(decoder.module_list, permutations):
        if block.GIN or block.householder or block.reverse_pre_permute:
            raise ValueError("folded_decoder_log_likelihood covers the AllInOneBlocks build_cflow_decoder makes")
        first, _, second = block.subnet
        passive = block.splits[0]
        position_term = torch.addmm(first.bias, encoding, first.weight[:, passive:].T)  # (H*W, hidden)
        hidden = torch.matmul(fibers[..., :passive], first.weight[:, :passive].T).add_(position_term).relu_()
        coefficients = torch.matmul(hidden, second.weight.T).add_(second.bias).mul_(0.1)
        active = channels - passive
        log_scale = block.clamp * torch.tanh(coefficients[..., :active])
        coupled = fibers[..., passive:] * torch.exp(log_scale) + coefficients[..., active:]
        scale = block.global_scale_activation(block.global_scale).reshape(channels)
        mixed = torch.cat((fibers[..., :passive], coupled), dim=-1) * scale + block.global_offset.reshape(channels)
        fibers = (mixed[..., permutation] if permutation is not None  # FrEIA's F.linear(mixed, w_perm) as a gather
                  else torch.matmul(mixed, block.w_perm.reshape(channels, channels).T))
        log_det += log_scale.sum(dim=-1) + torch.log(scale).sum()
    return (-channels * LOG_SQRT_2PI - 0.5 * fibers.pow(2).sum(dim=-1) + log_det) / channels


class SANFModel(nn.Module):
    """SANF-AD detector: a fixed whitening fitted on the normal training set, then the CAFF flow.

    Preprocessing (buffers, saved with the checkpoint): the semantic token y is centred and whitened
    with the Ledoit-Wolf shrunk covariance S of the training semantic tokens, x = W (y - mu) with
    W = S^(-1/2) (ZCA: channels stay aligned with the backbone's). With ``token_dim`` > 0 only the
    first ``token_dim`` principal axes of S are kept (PCA whitening), so that the flow works on
    ``token_dim`` channels instead of D. With ``flow_channels`` k > 0 the whitening is PCA-ordered and
    the flow transforms only the first k principal axes; the other axes pass through unchanged, so the
    density stays over all channels and starts, like the full flow, as the shrunk Gaussian, while the
    trainable part has k dimensions to fit with a few hundred images instead of D (with all D the
    held-out NLL rises from the first epoch on: BENCHMARKS.md). With the public code's "half" context
    the texture tokens go through the same map, which keeps their channels aligned with the flow's input; with the
    paper's "full" context (texture tokens of any width C, e.g. an intermediate CNN stage) each
    texture channel is standardised with its mean and standard deviation over the training tokens.

    Why: W is a fixed invertible linear layer, so it changes the NLL only by a constant, but it
    starts training at the shrunk-Gaussian (Mahalanobis) solution instead of at an isotropic one;
    with a few thousand normal images in 1280 dimensions the flow cannot learn that covariance
    from scratch in a few epochs.

    With ``views`` V > 1 (``--view_statistics per_view``) each view index v has its own mean and whitening W_v
    (:class:`baselines.ViewWhitening`, ZCA only): the flow then starts as one shrunk Gaussian per view, a
    density of the token given its view, and every method below takes each token's view index ``view`` (B,).
    The NLL then includes -log|det W_v|, which differs between views.

    Args:
        dim: D, channels of the semantic token.
        n_tokens: N, texture tokens per image.
        texture_dim: C, channels of the texture tokens (None: D).
        token_dim: channels the flow works on; 0 keeps all D.
        flow_channels: k, leading principal axes the flow transforms; 0 = all of them.
        views: V, view indices with their own whitening (1: one whitening for all tokens).
        view_rank: rank of the per-view whitening's low-rank part (set by fitting; needed to load one).
        n_layers, hidden, heads, clamp, context, fusion, seed: see ``fusion.build_sanf_flow``.
    """

    def __init__(self, dim: int, n_tokens: int, n_layers: int = 4, hidden: int = 1024, heads: int = 4,
                 clamp: float = 3.0, context: str = "half", fusion: bool = True, seed: int = 0,
                 token_dim: int = 0, texture_dim: int | None = None, flow_channels: int = 0, views: int = 1,
                 view_rank: int = 1) -> None:
        super().__init__()
        if token_dim > dim:
            raise ValueError(f"token_dim ({token_dim}) cannot exceed the token width ({dim})")
        if views > 1 and (token_dim or flow_channels):
            raise ValueError("per-view statistics whiten every channel (ZCA): use them with token_dim 0 and "
                             "flow_channels 0")
        self.dim, self.views = dim, views
        self.flow_dim = token_dim or dim
        if flow_channels > self.flow_dim:
            raise ValueError(f"flow_channels ({flow_channels}) cannot exceed the {self.flow_dim} token channels")
        self.flow_channels = flow_channels or self.flow_dim
        self.n_tokens = n_tokens
        self.texture_dim = texture_dim or dim
        if context == "half" and self.texture_dim != dim:
            raise ConfigError(f"--caff_context half splits the texture tokens like the semantic token, so they need "
                              f"its {dim} channels; these have {self.texture_dim} (a CNN's intermediate stage): use "
                              "--caff_context full, or --texture_layers last")
        self.context = context
        self.view_whitening = ViewWhitening(views, dim, view_rank) if views > 1 else None
        if self.view_whitening is None:
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("whitening", torch.eye(dim)[:, : self.flow_dim].clone())
        self.register_buffer("texture_mean", torch.zeros(self.texture_dim))
        self.register_buffer("texture_scale", torch.ones(self.texture_dim))
        context_dim = self.flow_channels if context == "half" else self.texture_dim
        self.flow = build_sanf_flow(self.flow_channels, n_tokens, n_layers=n_layers, hidden=hidden, heads=heads,
                                    clamp=clamp, context=context, fusion=fusion, seed=seed, context_dim=context_dim)

    @torch.no_grad()
    def fit_preprocessing(self, semantic_tokens: Tensor, texture_tokens: Tensor | None = None,
                          view: Tensor | None = None) -> None:
        """Mean and whitening from the normal training semantic tokens (M, D) (per view: of views ``view``
        (M,)); texture standardisation from their texture tokens (M, N, C) for the "full" context."""
        if texture_tokens is not None and self.context == "full":
            channels = texture_tokens.detach().cpu().reshape(-1, texture_tokens.shape[-1]).double()  # float64: CPU
            self.texture_mean.copy_(channels.mean(dim=0))
            self.texture_scale.copy_(channels.std(dim=0).clamp_min(1e-6))
        if self.view_whitening is not None:
            self.view_whitening.fit(semantic_tokens, self._checked_views(view))
            return
        mean, covariance, _ = shrunk_covariance(semantic_tokens)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.from_numpy(covariance))
        order = eigenvalues.argsort(descending=True)[: self.flow_dim]
        axes = eigenvectors[:, order] / eigenvalues[order].clamp_min(1e-12).sqrt()  # (D, flow_dim)
        if self.flow_dim == len(mean) and self.flow_channels == self.flow_dim:
            axes = axes @ eigenvectors[:, order].T  # ZCA: rotate back to the backbone's channels
        self.mean.copy_(mean)
        self.whitening.copy_(axes)

    def _checked_views(self, view: Tensor | None) -> Tensor:
        if view is None:
            raise ValueError(f"this model whitens each of its {self.views} views apart: pass each token's view index")
        return view

    def preprocess(self, tokens: Tensor, view: Tensor | None = None) -> Tensor:
        """Semantic tokens (B, D) (or (B, N, D) with "half" texture tokens) of views ``view`` (B,) → (..., flow_dim);
        ``view`` is needed only with per-view statistics."""
        if self.view_whitening is None:
            return (tokens - self.mean) @ self.whitening
        view = self._checked_views(view)
        if tokens.dim() == 3:
            return self.view_whitening(tokens.flatten(0, 1), view.repeat_interleave(tokens.shape[1])).view_as(tokens)
        return self.view_whitening(tokens, view)

    def preprocess_texture(self, texture_tokens: Tensor, view: Tensor | None = None) -> Tensor:
        """Texture tokens (..., C) → the flow's condition: the semantic map ("half") or standardised ("full")."""
        if self.context == "half":
            return self.preprocess(texture_tokens, view)[..., : self.flow_channels]
        return (texture_tokens - self.texture_mean) / self.texture_scale

    def latent(self, semantic_tokens: Tensor, patch_tokens: Tensor, noise: float = 0.0,
               view: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z (B, flow_dim) and log|det dz/dy| (B,) of the preprocessed semantic tokens, with Gaussian noise of
        std ``noise`` added to them after whitening (a training-time regulariser; 0 when scoring). The
        flow moves the first ``flow_channels`` channels; the others are z as they are (log-det 0). With per-view
        statistics log|det dz/dy| includes the view's log|det W_v|."""
        whitened = self.preprocess(semantic_tokens, view)
        if noise > 0:
            whitened = whitened + noise * torch.randn_like(whitened)
        head, tail = whitened.split([self.flow_channels, self.flow_dim - self.flow_channels], dim=-1)
        z_head, log_jac_det = self.flow(head, c=[self.preprocess_texture(patch_tokens, view)])
        if self.view_whitening is not None:
            log_jac_det = log_jac_det + self.view_whitening.log_det[view]
        return torch.cat((z_head, tail), dim=-1), log_jac_det

    def nll_per_dim(self, semantic_tokens: Tensor, patch_tokens: Tensor, noise: float = 0.0,
                    view: Tensor | None = None) -> Tensor:
        """(||z||^2 / 2 - log|det J|) / flow_dim per image (B,): the training loss (Eq. 14 per dimension)."""
        z, log_jac_det = self.latent(semantic_tokens, patch_tokens, noise, view)
        return (0.5 * z.pow(2).sum(dim=1) - log_jac_det) / self.flow_dim

    def anomaly_score(self, semantic_tokens: Tensor, patch_tokens: Tensor, score: str,
                      view: Tensor | None = None) -> Tensor:
        """nll: the negative log-likelihood per dimension; z2: mean(z^2), the public code (no log-det)."""
        if score == "nll":
            return self.nll_per_dim(semantic_tokens, patch_tokens, view=view)
        if score == "z2":
            return self.latent(semantic_tokens, patch_tokens, view=view)[0].pow(2).mean(dim=1)
        raise ValueError(f"score must be 'nll' or 'z2', got {score!r}")


# ----------------------------------------------------------------------------- detectors

DETECTOR_FORMAT = "nf-anomaly-detector/2"
COMMON_SCORE_FIELDS = ("method", "backbone", "img_size", "view_set", "test_views")
SCORE_FIELDS: dict[str, tuple[str, ...]] = {
    "sanf": ("scales", "patch_grid", "texture_layers", "token_norm", "view_statistics", "fusion", "caff_context",
             "n_flow_layers", "token_dim", "flow_channels", "hidden", "heads", "clamp", "score"),
    "knn": ("scales", "token_norm", "knn_k"),
    "gaussian": ("scales", "token_norm", "view_statistics", "gaussian_shrinkage"),
    "cflow": ("layers", "condition_dims", "n_flow_layers", "clamp", "permute_soft", "map_norm", "scoring"),
}
SCORE_FIELDS["sanf_cflow"] = tuple(dict.fromkeys(SCORE_FIELDS["sanf"] + SCORE_FIELDS["cflow"]))
"""Settings that change a trained detector's scores, per method: a checkpoint refuses other values."""


class DetectorError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the asked settings; the message names the fix."""


def normalise_tokens(tokens: Tensor, how: str) -> Tensor:
    """Per-token normalisation over the channel axis: none, l2 (unit length) or power (signed square root,
    then unit length). Applied to every semantic method's features alike, so that comparisons stay fair."""
    if how == "power":
        tokens = tokens.sign() * tokens.abs().sqrt()
    if how in ("l2", "power"):
        tokens = F.normalize(tokens, dim=-1)
    return tokens


class StageFeatures:
    """Per-stage feature maps (B, C, H, W) of a list of images, a batch of images at a time.

    Built from cached float16 arrays (converted once into float32 channels-last tensors, so that no
    epoch converts them again and a batch's fibers are a view of its maps), from tensors, or from an
    image list and the extractor (``--no-cache``: every batch goes through the backbone again, as in
    the official code and anomalib). From an image list, ``rotate_degrees`` > 0 rotates every image by a
    fresh random angle each time it is read (``extractor.randomly_rotated``, seeded by ``config.seed``);
    :meth:`unrotated` gives the same images without it.

    Maps of ``views`` > 1 views per image (scoring with test views) hold (N * V, C, H, W) rows, the V views of
    an image next to each other; ``len`` counts rows, so training sees every view as one more image.
    """

    def __init__(self, maps: dict[str, Tensor] | None = None, images: ImageList | None = None,
                 extractor: FeatureExtractor | None = None, config: Config | None = None,
                 rotate_degrees: float = 0.0, views: int = 1) -> None:
        if (maps is None) == (images is None or extractor is None or config is None):
            raise ValueError("give either the maps, or the images with an extractor and a config")
        if rotate_degrees and maps is not None:
            raise ValueError("cached feature maps cannot be rotated: rotation needs the images")
        if views > 1 and maps is None:
            raise ValueError("views are extracted into the cache: give the maps")
        self.maps, self.images, self.extractor, self.config, self.views = maps, images, extractor, config, views
        self.rotate_degrees = rotate_degrees
        self.rotations = torch.Generator().manual_seed(config.seed) if rotate_degrees else None

    def unrotated(self) -> StageFeatures:
        """The same images, never rotated (the training statistics describe the images as scored)."""
        if not self.rotate_degrees:
            return self
        return StageFeatures(images=self.images, extractor=self.extractor, config=self.config)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: str | torch.device, views: int = 1) -> StageFeatures:
        """Cached float16 maps (N * views, C, H, W) as float32 channels-last tensors on ``device``."""
        return cls({stage: torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device)
                    .contiguous(memory_format=torch.channels_last) for stage, array in arrays.items()}, views=views)

    def first_view(self) -> StageFeatures:
        """Each image's view 0 (the image itself) alone."""
        if self.views == 1:
            return self
        return StageFeatures({stage: maps[::self.views] for stage, maps in self.maps.items()})

    def __len__(self) -> int:
        return len(next(iter(self.maps.values()))) if self.maps is not None else len(self.images)

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterator[dict[str, Tensor]]:
        """Feature maps of ``batch_size`` images at a time, in ``order`` (default: the listed order)."""
        order = torch.arange(len(self)) if order is None else order
        if self.maps is not None:
            device = next(iter(self.maps.values())).device
            for index in order.to(device).split(batch_size):  # one copy to the device, not one per batch and stage
                yield {stage: maps[index] for stage, maps in self.maps.items()}
            return
        for images in image_batches(self.images.subset(to_numpy(order)), self.config, batch_size=batch_size):
            if self.rotations is not None:
                images = randomly_rotated(images, self.rotate_degrees, self.rotations)
            yield {stage: value.float() for stage, value in self.extractor(images).items()}

    def stage_channels(self) -> dict[str, int]:
        return {stage: feature_map.shape[1] for stage, feature_map in next(self.unrotated().batches(1)).items()}

    def only(self, stages: list[str]) -> StageFeatures:
        """The maps of these stages alone (the stage-parallel training of ``--stage_workers``)."""
        if self.maps is None:
            raise ValueError("the feature maps of some stages alone need cached features (--cache)")
        return StageFeatures({stage: self.maps[stage] for stage in stages}, views=self.views)


TokenFeatures = dict[str, Tensor]
"""Raw semantic-method features of M images: ``sem`` (M, D) and ``patches`` (M, N, C), float32 (C: the
texture stage's channels, D for a ViT's patch tokens); with V views of each image (M, V, D) and (M, V, N, C)."""


def flat_views(tokens: TokenFeatures) -> TokenFeatures:
    """Token features with their views as more rows: (M, V, ...) → (M * V, ...); one view as it is."""
    if tokens["sem"].dim() == 2:
        return tokens
    return {name: value.flatten(0, 1) for name, value in tokens.items()}


def _jsonable(value: Any) -> Any:
    """Python floats / ints / lists / dicts only, for the checkpoint's JSON metadata."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, Tensor)):
        return value.item()
    return value


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What :meth:`Detector.predict` returns for B images."""

    scores: np.ndarray  # (B,) image anomaly scores (higher: more anomalous)
    anomalous: np.ndarray  # (B,) bool: score above the detector's threshold (set on normal training images)
    maps: np.ndarray | None  # (B, S, S) anomaly maps at img_size (CFLOW), None for image-level methods
    head_scores: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # head → (B,) (sanf_cflow)


class Detector:
    """Frozen backbone + a head fitted on normal images + a decision threshold.

    Subclasses implement ``_fit`` (train the head, return its info), ``score`` (features → image
    scores and, for CFLOW, anomaly maps), ``features_of`` (backbone outputs → what ``score`` takes),
    ``count`` and ``_state`` / ``_restore`` (tensors and JSON metadata of the head).

    The threshold is the (1 - ``threshold_fpr``) quantile of the scores of the held-out normal
    training images (or, with ``val_fraction`` 0, of the fit images themselves, which is optimistic
    and said so in ``threshold_rule``). No test image is used. ``map_threshold`` is the same quantile of those
    images' map maxima (CFLOW): the scale of the maps, whose units differ from the scores' under a ``z`` rule.
    """

    method = ""

    def __init__(self, config: Config, extractor: FeatureExtractor | None = None) -> None:
        self.config = config
        self._extractor = extractor
        self.weights_source = extractor.weights_source if extractor is not None else ""
        self.threshold = math.nan
        self.map_threshold = math.nan
        self.threshold_rule = ""
        self.info: dict[str, Any] = {}

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen backbone, built on first use; its weights must be those the detector was trained with."""
        if self._extractor is None:
            extractor = FeatureExtractor(self.config)
            if self.weights_source and not same_weights(self.weights_source, extractor.weights_source):
                raise DetectorError(f"the detector was trained on backbone weights {self.weights_source}, but "
                                    f"--weights {self.config.weights} gives {extractor.weights_source}; pass the "
                                    "weights file it was trained with")
            self.check_stages(extractor)
            self._extractor = extractor
            self.weights_source = extractor.weights_source
        return self._extractor

    def check_stages(self, extractor: FeatureExtractor) -> None:
        """Refuse a backbone whose stages are not the ones the detector was trained on (CFLOW)."""

    def fit(self, fit: Any, held_out: Any | None, name: str,
            held_out_images: ImageList | None = None) -> dict[str, Any]:
        """Train on the fit images' features; set the threshold from the held-out ones (see the class doc).

        ``held_out_images`` are the held-out images themselves (CFLOW ``scoring auto`` makes defective
        copies of them)."""
        started = time.perf_counter()
        self.info = {**self._fit(fit, held_out, name, held_out_images), "fit_seconds": time.perf_counter() - started}
        reference = fit if held_out is None or self.count(held_out) == 0 else held_out
        scores, maps = self.score(reference)
        quantile = 1.0 - self.config.threshold_fpr
        self.threshold = float(np.quantile(scores, quantile))
        if maps is not None:
            self.map_threshold = float(np.quantile(maps.reshape(len(maps), -1).max(axis=1), quantile))
        which = ("held-out normal training images" if reference is held_out else
                 "fit images themselves (val_fraction 0: optimistic, expect more false alarms)")
        self.threshold_rule = (f"{quantile:g} quantile of the scores of {len(scores)} {which}: target false-positive "
                               f"rate {self.config.threshold_fpr:g}")
        if len(scores) * self.config.threshold_fpr < 1:
            few = (f"{len(scores)} images cannot show a false-positive rate of {self.config.threshold_fpr:g}: the "
                   "threshold is about their highest score, so expect more false alarms on new normal images (hold "
                   "out more with --val_fraction, or add normal training images)")
            self.threshold_rule += f"; {few}"
            if len(scores) < 5:  # printed where it is glaring; results.json's threshold_rule always says it
                print(f"note: '{name}': {few}")
        if self.config.uses_stages() and self.config.map_norm != "train":
            self.threshold_rule += (f"; with map_norm {self.config.map_norm} a score depends on the images scored with "
                                    "it, so the threshold is indicative only (map_norm train makes it exact)")
        return self.info

    def score_images(self, images: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (B, 3, S, S) at ``img_size`` → image scores (B,) and anomaly maps (B, S, S) or None."""
        return self.score_images_by_head(images)[:2]

    def score_images_by_head(self, images: Tensor) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        """:meth:`score_images` and each head's scores (B,) (``sanf_cflow``; else {})."""
        self.check_per_image_scores()
        size = self.config.img_size
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise DetectorError(f"score_images takes uint8 images of shape (B, 3, {size}, {size}); got {images.dtype} "
                                f"{tuple(images.shape)} (float pixels in [0, 1]: multiply by 255 and round; other "
                                "sizes: Detector.predict resizes as in training)")
        with record_function("predict.backbone"):
            features = self.features_of(self.extractor.view_features(images, self.config.view_set,
                                                                     self.config.test_views))
        return self.score_by_head(features)

    def check_per_image_scores(self) -> None:
        """Stop with a DetectorError where a new image's score would depend on the images scored with it: CFLOW's
        ``map_norm`` test and batch normalise the maps by maxima over the scored set."""
        if self.config.uses_stages() and self.config.map_norm != "train":
            raise DetectorError(f"this detector was trained with --map_norm {self.config.map_norm}, which normalises "
                                "the maps over the images scored together, so a new image's score would depend on "
                                "the others in its batch; retrain with --map_norm train to score new images "
                                "(main.py --eval_only still rescores the whole test split at once)")

    def predict(self, images: Any, batch_size: int | None = None) -> Prediction:
        """Scores, flags and maps of new images, in the order given.

        ``images``: one image or a list of them, each a file path, a PIL image, a (3, H, W) tensor or an
        (H, W, 3) array (uint8, or floats in [0, 1]); or a (B, 3, H, W) tensor. Each is made RGB and resized
        (bicubic) to ``img_size`` as in training, so an image file scores here as in main.py and predict.py.
        """
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not len(images):
            raise DataError("Detector.predict was given no image")
        image_list = ImageList.create([str(p) for p in range(len(images))], [0] * len(images), InputLoader(images))
        scores, maps, head_scores = [], [], []
        for batch in image_batches(image_list, self.config, batch_size=batch_size or self.config.test_batch_size):
            batch_scores, batch_maps, batch_heads = self.score_images_by_head(batch)
            scores.append(batch_scores)
            maps.append(batch_maps)
            head_scores.append(batch_heads)
        all_scores = np.concatenate(scores)
        return Prediction(all_scores, self.flagged(all_scores), None if maps[0] is None else np.concatenate(maps),
                          {head: np.concatenate([batch[head] for batch in head_scores]) for head in head_scores[0]})

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        """Which scores are above the decision threshold."""
        return scores > self.threshold

    def save(self, path: Path) -> None:
        """One file with everything scoring needs; readable with ``torch.load(weights_only=True)``."""
        tensors, meta = self._state()
        atomic_torch_save({
            "format": DETECTOR_FORMAT, "method": self.method, "config": json.dumps(self.config.to_dict()),
            "weights_source": self.weights_source,
            "meta": json.dumps(_jsonable({**meta, "threshold": self.threshold, "map_threshold": self.map_threshold,
                                          "threshold_rule": self.threshold_rule,
                                          "info": self.info})),
            "state": {name: tensor.detach().cpu() for name, tensor in tensors.items()},
        }, Path(path))

    def count(self, features: Any) -> int:
        return len(features)

    def _fit(self, fit: Any, held_out: Any | None, name: str, held_out_images: ImageList | None) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, features: Any) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def score_by_head(self, features: Any) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        """:meth:`score` and each head's own scores (a detector with heads; else {})."""
        return *self.score(features), {}

    def features_of(self, backbone_outputs: dict[str, Tensor]) -> Any:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        raise NotImplementedError


def same_weights(trained: str, now: str) -> bool:
    """Whether two weights descriptions name the same weights (by hash where both have one)."""
    if ":sha256:" in trained and ":sha256:" in now:
        return trained.rsplit(":", 1)[1] == now.rsplit(":", 1)[1]
    return trained == now


class _TokenDetector(Detector):
    """Shared part of the detectors over the semantic (and texture) tokens."""

    def features_of(self, backbone_outputs: dict[str, Tensor]) -> TokenFeatures:
        return {name: value.float() for name, value in backbone_outputs.items()}

    def count(self, features: TokenFeatures) -> int:
        return len(features["sem"])

    def per_view(self) -> bool:
        return self.config.view_statistics == "per_view"

    def with_view_index(self, tokens: TokenFeatures, views: int) -> TokenFeatures:
        """Flat tokens, each image's ``views`` views next to each other, with ``view`` (M * V,), each row's view
        index, where the statistics are per view (``view_statistics per_view``); otherwise as they are."""
        if not self.per_view():
            return tokens
        rows = len(tokens["sem"])
        return {**tokens, "view": torch.arange(rows, device=tokens["sem"].device) % views}

    def normalised(self, features: TokenFeatures) -> TokenFeatures:
        """``token_norm`` applied, on the device; non-finite features stop with a TrainingError."""
        tokens = {name: normalise_tokens(value.to(self.config.device).float(), self.config.token_norm)
                  for name, value in features.items()}
        if not all(torch.isfinite(value).all() for value in tokens.values()):
            raise TrainingError("non-finite features; delete this run's feature cache folder (under --cache_dir) so "
                                "that they are extracted again, and check --weights")
        return tokens

    @torch.no_grad()
    def score(self, features: TokenFeatures) -> tuple[np.ndarray, None]:
        """Image scores (M,); with views (``sem`` (M, V, D)) the mean of each image's view scores (DifferNet)."""
        tokens = self.normalised(features)
        images, views = self.count(tokens), (tokens["sem"].shape[1] if tokens["sem"].dim() == 3 else 1)
        tokens = self.with_view_index(flat_views(tokens), views)
        chunks = [self._score_tokens({name: value[start:start + 1024] for name, value in tokens.items()})
                  for start in range(0, len(tokens["sem"]), 1024)]
        return to_numpy(torch.cat(chunks).cpu().double().view(images, views).mean(dim=1)), None

    def _score_tokens(self, tokens: TokenFeatures) -> Tensor:
        raise NotImplementedError


class SANFDetector(_TokenDetector):
    """SANF-AD: whitening + CAFF flow over the semantic token; score ``nll`` or ``z2`` (``config.score``)."""

    method = "sanf"

    def __init__(self, config: Config, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config, extractor)
        self.model: SANFModel | None = None

    def _build(self, dim: int, n_tokens: int, texture_dim: int, context: str, views: int | None = None,
               view_rank: int = 1) -> None:
        """A fresh seeded model; ``views`` with their own statistics: the fitted views (per view) or 1 (pooled)."""
        config = self.config
        try:  # seeded here: the subnets' initial weights do not depend on which classes ran before
            with _seeded_cpu_rngs(config.seed):
                model = SANFModel(dim, n_tokens, n_layers=config.n_flow_layers, hidden=config.hidden,
                                  heads=config.heads, clamp=config.clamp, context=context,
                                  fusion=config.fusion == "caff", seed=config.seed, token_dim=config.token_dim,
                                  texture_dim=texture_dim, flow_channels=config.flow_channels,
                                  views=views or (config.train_views if self.per_view() else 1),
                                  view_rank=view_rank)
        except ValueError as error:  # shapes that do not fit the flow's settings (heads, token_dim)
            raise ConfigError(str(error)) from None
        self.model = model.to(config.device)

    def _readings_to_train(self, dim: int, texture_dim: int, held_out: bool) -> list[str]:
        """The CAFF readings to train: the asked one, or for ``auto`` both where the texture tokens are as wide as
        the semantic token and images are held out (their NLL then chooses), else the paper's ``full``."""
        if self.config.caff_context != "auto":
            return [self.config.caff_context]
        both = texture_dim == dim and self.config.fusion == "caff" and held_out
        return ["full", "half"] if both else ["full"]

    def _fit(self, fit: TokenFeatures, held_out: TokenFeatures | None, name: str,
             held_out_images: ImageList | None = None) -> dict[str, Any]:
        tokens = self.with_view_index(flat_views(self.normalised(fit)), self.config.train_views)
        (_, dim), (_, n_tokens, texture_dim) = tokens["sem"].shape, tokens["patches"].shape
        held = None if held_out is None or self.count(held_out) == 0 else self.with_view_index(
            flat_views(self.normalised(held_out)), self.config.test_views)
        contexts = self._readings_to_train(dim, texture_dim, held is not None)
        trained: dict[str, tuple[SANFModel, dict[str, Any]]] = {}
        for context in contexts:
            self._build(dim, n_tokens, texture_dim, context)
            self.model.fit_preprocessing(tokens["sem"], tokens["patches"], tokens.get("view"))
            label = f"{name} ({context})" if len(contexts) > 1 else name
            trained[context] = self.model, train_sanf(self.model, tokens, held, self.config, label)

        def held_out_nll(context: str) -> float:  # a tie keeps the paper's reading, listed first; NaN never wins
            value = trained[context][1]["held_out_nll"]
            return value if math.isfinite(value) else math.inf

        chosen = min(contexts, key=held_out_nll)
        self.model, info = trained[chosen]
        if len(contexts) > 1:
            info = {**info, "caff_context_chosen": chosen,
                    "caff_context_held_out_nll": {context: trained[context][1]["held_out_nll"] for context in contexts},
                    "caff_context_train_seconds": {context: trained[context][1]["train_seconds"]
                                                   for context in contexts},
                    "caff_context_curves": {context: trained[context][1]["curve"] for context in contexts}}
        return {**info, "caff_context": chosen, "parameters": sum(p.numel() for p in self.model.flow.parameters())}

    def _score_tokens(self, tokens: TokenFeatures) -> Tensor:
        return self.model.anomaly_score(tokens["sem"], tokens["patches"], self.config.score, tokens.get("view"))

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.model.state_dict(), {"dim": self.model.dim, "n_tokens": self.model.n_tokens,
                                         "texture_dim": self.model.texture_dim, "caff_context": self.model.context}

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        # checkpoints from before --caff_context auto name their reading in their settings only
        context = meta.get("caff_context", self.config.caff_context)
        axes = tensors.get("view_whitening.axes")  # (V, D, R) with per-view statistics
        views, rank = (1, 1) if axes is None else (axes.shape[0], axes.shape[-1])
        self._build(meta["dim"], meta["n_tokens"], meta["texture_dim"], context, views, rank)
        self.model.load_state_dict(tensors, strict=True)
        self.model.eval()


class KNNDetector(_TokenDetector):
    """kNN baseline: mean cosine distance to the ``knn_k`` nearest fit images' semantic tokens."""

    method = "knn"

    def __init__(self, config: Config, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config, extractor)
        self.scorer = KNNScorer(config.knn_k)

    def _fit(self, fit: TokenFeatures, held_out: TokenFeatures | None, name: str,
             held_out_images: ImageList | None = None) -> dict[str, Any]:
        if self.count(fit) < self.config.knn_k:
            raise ConfigError(f"kNN with --knn_k {self.config.knn_k} needs at least {self.config.knn_k} fit images; "
                              f"task {name} has {self.count(fit)} (lower --knn_k or --val_fraction, or add images)")
        self.scorer.fit(flat_views(self.normalised(fit))["sem"])
        return {}

    def _score_tokens(self, tokens: TokenFeatures) -> Tensor:
        return self.scorer.score(tokens["sem"])

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"bank": self.scorer.bank}, {}

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.scorer.bank = tensors["bank"].to(self.config.device)


class GaussianDetector(_TokenDetector):
    """Gaussian baseline: squared Mahalanobis distance with a shrunk covariance of the fit images' tokens (with
    ``view_statistics per_view``, of the fit tokens of the same view index: ||W_v (x - mu_v)||^2)."""

    method = "gaussian"

    def __init__(self, config: Config, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config, extractor)
        self.scorer = GaussianScorer(config.gaussian_shrinkage)
        self.view_whitening: ViewWhitening | None = None

    def _fit(self, fit: TokenFeatures, held_out: TokenFeatures | None, name: str,
             held_out_images: ImageList | None = None) -> dict[str, Any]:
        tokens = flat_views(self.normalised(fit))
        if not self.per_view():
            self.scorer.fit(tokens["sem"])
            return {"shrinkage": self.scorer.used_shrinkage}
        self.view_whitening = ViewWhitening(self.config.train_views, tokens["sem"].shape[-1])
        used = self.view_whitening.fit(tokens["sem"], self.with_view_index(tokens, self.config.train_views)["view"],
                                       self.config.gaussian_shrinkage)
        return {"shrinkage": used}

    def _score_tokens(self, tokens: TokenFeatures) -> Tensor:
        if self.view_whitening is not None:
            return self.view_whitening(tokens["sem"], tokens["view"]).square().sum(dim=1)
        return self.scorer.score(tokens["sem"])

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.view_whitening is not None:
            return self.view_whitening.state_dict(), {}
        return {"mean": self.scorer.mean, "precision": self.scorer.precision}, {}

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if not self.per_view():
            self.scorer.load(tensors["mean"], tensors["precision"], self.config.device)
            return
        views, dim, rank = tensors["axes"].shape
        self.view_whitening = ViewWhitening(views, dim, rank)
        self.view_whitening.load_state_dict(tensors, strict=True)
        self.view_whitening.to(self.config.device)


DEFECT_COPIES = 3
"""``scoring auto``: synthetic defective copies made of each held-out image."""


class CFlowDetector(Detector):
    """CFLOW-AD: per-stage conditional flows → the paper's anomaly maps, image scores under a scoring rule.

    The rule is ``scoring`` or, with ``scoring auto``, the one chosen after training on the held-out
    normal training images and synthetic defects made from them (``anomaly_map.select_scoring``).
    """

    method = "cflow"

    def __init__(self, config: Config, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config, extractor)
        self.model: CFlowModel | None = None
        self.statistics: StageStatistics | None = None
        self.rule = ScoringRule() if config.scoring == "auto" else ScoringRule.parse(config.scoring)

    def build(self, stage_channels: dict[str, int]) -> None:
        """Fresh (untrained, seeded) decoders for these stages."""
        config = self.config
        self.model = CFlowModel(stage_channels, condition_dims=config.condition_dims, n_blocks=config.n_flow_layers,
                                clamp=config.clamp, permute_soft=config.permute_soft,
                                seed=config.seed).to(config.device)

    def features_of(self, backbone_outputs: dict[str, Tensor]) -> StageFeatures:
        """Stage maps (B, C, H, W), or with test views (B, V, C, H, W) → StageFeatures of B * V rows."""
        views = self.config.test_views
        return StageFeatures({stage: (value.flatten(0, 1) if views > 1 else value).float()
                              for stage, value in backbone_outputs.items()}, views=views)

    def _fit(self, fit: StageFeatures, held_out: StageFeatures | None, name: str,
             held_out_images: ImageList | None = None) -> dict[str, Any]:
        self.build(fit.stage_channels())
        held = None if held_out is None or len(held_out) == 0 else held_out
        info = train_cflow(self.model, fit, held, self.config, name)
        self.statistics = self.training_statistics(fit.unrotated())
        info["parameters"] = sum(p.numel() for p in self.model.parameters())
        if self.config.scoring == "auto":
            info["scoring_selection"] = self.choose_rule(held, held_out_images)
        info["scoring_rule"] = str(self.rule)
        return info

    def choose_rule(self, held_out: StageFeatures | None, held_out_images: ImageList | None) -> list[dict]:
        """``scoring auto``: set ``self.rule`` from the held-out images and ``DEFECT_COPIES`` defective
        copies of each (seeded)."""
        if held_out is None or held_out_images is None or len(held_out_images) < 2:
            raise DetectorError("scoring auto chooses the scoring rule on held-out normal training images and needs "
                                "at least 2 of them: raise --val_fraction, or name a rule (e.g. --scoring exp/max)")
        config = self.config
        images = torch.cat(list(image_batches(held_out_images, config)))
        defects = torch.cat([synthetic_defects(images, seed=config.seed + copy)[0] for copy in range(DEFECT_COPIES)])
        with torch.no_grad():
            outputs = [self.extractor(batch) for batch in defects.split(config.extract_batch_size)]
        defect_features = StageFeatures({stage: torch.cat([output[stage].float() for output in outputs])
                                         for stage in self.model.stage_names})
        self.rule, rows = select_scoring(self.stage_log_likelihoods(held_out.first_view()), self.stage_log_likelihoods(
            defect_features), self.statistics, (config.img_size, config.img_size),
            candidate_rules(self.model.stage_names))
        return rows

    @torch.no_grad()
    def training_statistics(self, fit: StageFeatures) -> StageStatistics:
        """Per-stage max, mean and std of log p / C over the fit images' fibers."""
        self.model.eval()
        batches = tqdm(fit.batches(self.config.test_batch_size), desc="training statistics", leave=False,
                       total=math.ceil(len(fit) / self.config.test_batch_size), unit="batch")
        return stage_statistics(self.model.stage_log_likelihood_maps(features) for features in batches)

    @torch.no_grad()
    def stage_log_likelihoods(self, features: StageFeatures) -> dict[str, Tensor]:
        """log p / C maps (N, H_l, W_l) of every image, per stage, on the CPU (where the maps are made)."""
        self.model.eval()
        size = self.config.test_batch_size
        batches = [on_cpu(self.model.stage_log_likelihood_maps(f)) for f in
                   tqdm(features.batches(size), desc="scoring", total=math.ceil(len(features) / size),
                        unit="batch", leave=False, disable=len(features) <= size)]
        return {stage: torch.cat([maps[stage] for maps in batches]) for stage in self.model.stage_names}

    def score(self, features: StageFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) float64 under the scoring rule and anomaly maps (N, S, S) float32 at ``img_size``;
        with views, each image's mean score over its views and the mean of its views' maps turned back."""
        with record_function("predict.flows"):
            stage_maps = self.stage_log_likelihoods(features)
        with record_function("predict.anomaly_maps"):
            scores, maps = anomaly_maps(stage_maps, self.config, self.statistics, self.rule)
        if features.views == 1:
            return scores, maps
        return averaged_views(scores, maps, self.config.view_set, features.views)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.model.state_dict(), {"stage_channels": self.model.stage_channels, "statistics": self.statistics,
                                         "rule": str(self.rule)}

    def check_stages(self, extractor: FeatureExtractor) -> None:
        if self.model is not None and list(self.model.stage_names) != extractor.layers:
            raise DetectorError(f"the detector was trained on the stages {','.join(self.model.stage_names)}, but "
                                f"--layers {self.config.layers} gives {','.join(extractor.layers)}; pass --layers "
                                f"{','.join(self.model.stage_names)}")

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.build(meta["stage_channels"])
        self.model.load_state_dict(tensors, strict=True)
        self.model.eval()
        self.statistics = meta["statistics"]
        self.rule = ScoringRule.parse(meta["rule"])


TOKEN_NAMES = ("sem", "patches")
"""The token arrays of a cache unit; the others of a ``sanf_cflow`` unit are the stage maps."""


@dataclasses.dataclass(frozen=True)
class BothFeatures:
    """``sanf_cflow`` features of a set of images: the SANF head's tokens and the CFLOW head's stage maps."""

    tokens: TokenFeatures
    stages: StageFeatures


class SANFCFlowDetector(Detector):
    """SANF-AD and CFLOW-AD as two heads on one backbone pass: CFLOW's anomaly maps, and as the image score the
    larger of the two heads' scores, each standardised as a z score by the mean and standard deviation of its
    scores on the held-out normal training images (anomalous when either head says so).

    The rule is fixed, not tuned: a weighting chosen on synthetic defects would favour CFLOW's head, since such
    defects are local. Each head trains as its method alone would (``config.head_config``), so its scores and
    CFLOW's maps are those of ``--method sanf`` and ``--method cflow`` runs with the same settings.
    """

    method = "sanf_cflow"

    def __init__(self, config: Config, extractor: FeatureExtractor | None = None) -> None:
        super().__init__(config, extractor)
        self.sanf = SANFDetector(head_config(config, "sanf"), extractor)
        self.cflow = CFlowDetector(head_config(config, "cflow"), extractor)
        self.standardisation: dict[str, tuple[float, float]] = {}

    @property
    def heads(self) -> dict[str, Detector]:
        return {"sanf": self.sanf, "cflow": self.cflow}

    def features_of(self, backbone_outputs: dict[str, Tensor]) -> BothFeatures:
        return BothFeatures(self.sanf.features_of({name: backbone_outputs[name] for name in TOKEN_NAMES}),
                            self.cflow.features_of({name: value for name, value in backbone_outputs.items()
                                                    if name not in TOKEN_NAMES}))

    def count(self, features: BothFeatures) -> int:
        return self.sanf.count(features.tokens)

    def _fit(self, fit: BothFeatures, held_out: BothFeatures | None, name: str,
             held_out_images: ImageList | None = None) -> dict[str, Any]:
        """Both heads, then each head's standardisation from its scores on the held-out images (without any:
        on the fit images, as the threshold)."""
        reference = fit if held_out is None else held_out
        for head, detector in self.heads.items():
            detector._extractor = self.extractor  # CFLOW's scoring auto extracts its synthetic defects
            detector.fit(getattr(fit, "tokens" if head == "sanf" else "stages"),
                         None if held_out is None else getattr(held_out, "tokens" if head == "sanf" else "stages"),
                         name, held_out_images)
        self.standardisation = {head: standardisation(scores) for head, scores in
                                self._head_scores(reference).items()}
        return {"heads": {head: detector.info for head, detector in self.heads.items()},
                "head_standardisation": {head: {"mean": mean, "std": std}
                                         for head, (mean, std) in self.standardisation.items()},
                "combination": "max of the heads' z scores (held-out mean and standard deviation)"}

    def _head_scores(self, features: BothFeatures, maps: list | None = None) -> dict[str, np.ndarray]:
        sanf_scores = self.sanf.score(features.tokens)[0]
        cflow_scores, cflow_maps = self.cflow.score(features.stages)
        if maps is not None:
            maps.append(cflow_maps)
        return {"sanf": sanf_scores, "cflow": cflow_scores}

    def score(self, features: BothFeatures) -> tuple[np.ndarray, np.ndarray]:
        return self.score_by_head(features)[:2]

    def score_by_head(self, features: BothFeatures) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The combined scores (N,) float64, CFLOW's maps (N, S, S) and each head's raw scores."""
        maps: list[np.ndarray] = []
        head_scores = self._head_scores(features, maps)
        z_scores = [(head_scores[head] - mean) / std for head, (mean, std) in self.standardisation.items()]
        return np.max(z_scores, axis=0), maps[0], head_scores

    def check_stages(self, extractor: FeatureExtractor) -> None:
        self.cflow.check_stages(extractor)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = {}, {"standardisation": self.standardisation, "heads": {}}
        for head, detector in self.heads.items():
            head_tensors, head_meta = detector._state()
            tensors.update({f"{head}.{name}": tensor for name, tensor in head_tensors.items()})
            meta["heads"][head] = {"meta": head_meta, "threshold": detector.threshold,
                                   "map_threshold": detector.map_threshold, "threshold_rule": detector.threshold_rule,
                                   "info": detector.info}
        return tensors, {**meta, "caff_context": self.sanf.model.context}

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        for head, detector in self.heads.items():
            saved = meta["heads"][head]
            detector._restore({name[len(head) + 1:]: tensor for name, tensor in tensors.items()
                               if name.startswith(f"{head}.")}, saved["meta"])
            detector.threshold, detector.map_threshold = saved["threshold"], saved["map_threshold"]
            detector.threshold_rule, detector.info = saved["threshold_rule"], saved["info"]
        self.standardisation = {head: (float(mean), float(std))
                                for head, (mean, std) in meta["standardisation"].items()}


def standardisation(scores: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation of a head's normal scores, by which its z scores are made; a spread
    of 0 (a single image, or identical scores) stops with a DetectorError."""
    if len(scores) < 2 or not np.std(scores) > 0:
        raise DetectorError(f"the combined detector standardises each head's scores on the held-out normal images, "
                            f"but {len(scores)} image(s) gave no spread: raise --val_fraction or add images")
    return float(np.mean(scores)), float(np.std(scores, ddof=1))


def anomaly_maps(stage_maps: dict[str, Tensor], config: Config, statistics: StageStatistics | None,
                 rule: ScoringRule) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) float64 under ``rule`` and the paper's anomaly maps (N, S, S) float32 at img_size.

    ``map_norm`` ``train`` maps each image with the training statistics alone; ``test`` normalises
    the whole given set at once (official code); ``batch`` each group of ``test_batch_size`` images
    (anomalib). A rule other than the paper's (``exp/max``) computes the scores from its own merge
    of the stage maps; the ``z`` merge always uses the training statistics.
    """
    size = (config.img_size, config.img_size)
    paper = AnomalyMapGenerator(size, config.map_norm, statistics)
    scorer = paper if rule == ScoringRule() else AnomalyMapGenerator(size, config.map_norm, statistics, rule)
    count = len(next(iter(stage_maps.values())))
    group = count if config.map_norm == "test" else config.test_batch_size
    scores, maps = [], []
    for start in range(0, count, group):
        batch = {stage: values[start:start + group] for stage, values in stage_maps.items()}
        batch_maps = paper(batch)
        scores.append(to_numpy(scorer.image_scores(batch_maps if scorer is paper else scorer(batch))))
        maps.append(to_numpy(batch_maps.float()))
    return np.concatenate(scores), np.concatenate(maps)


def averaged_views(scores: np.ndarray, maps: np.ndarray, view_set: str, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N * V,) and maps (N * V, S, S) of V views per image → each image's mean score (N,) and the mean of
    its views' maps, each turned back onto the image first (``views.map_from_view``), (N, S, S)."""
    per_view = torch.from_numpy(maps).view(-1, views, *maps.shape[1:])
    turned_back = torch.stack([map_from_view(per_view[:, view], view_set, view) for view in range(views)], dim=1)
    return scores.reshape(-1, views).mean(axis=1), to_numpy(turned_back.mean(dim=1))


DETECTORS: dict[str, type[Detector]] = {"sanf": SANFDetector, "cflow": CFlowDetector,
                                        "sanf_cflow": SANFCFlowDetector, "knn": KNNDetector,
                                        "gaussian": GaussianDetector}


def build_detector(config: Config, extractor: FeatureExtractor | None = None) -> Detector:
    return DETECTORS[config.method](config, extractor)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DetectorError(f"no checkpoint {path}; train first (main.py without --eval_only)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise DetectorError(f"cannot read checkpoint {path} ({type(error).__name__}); it is not a detector file "
                            "written by main.py: retrain, or pass the right file") from None
    if not isinstance(saved, dict) or saved.get("format") != DETECTOR_FORMAT:
        raise DetectorError(f"{path} is not a detector checkpoint of this project (expected format "
                            f"{DETECTOR_FORMAT}); retrain with main.py")
    return saved


def trained_config(saved: dict[str, Any], path: Path) -> Config:
    """The configuration a checkpoint was trained with."""
    try:  # a checkpoint holds every field of its time
        return Config(**as_trained_before(json.loads(saved["config"])))
    except (TypeError, ValueError) as error:
        raise DetectorError(f"checkpoint {path} holds a configuration this version cannot read ({error}); "
                            "retrain") from None


TRAINING_FIELDS = ("max_train_per_class", "seed", "train_noise", "fiber_batch", "epochs", "batch_size", "lr", "beta1",
                   "beta2", "adam_eps", "weight_decay", "grad_clip", "lr_schedule", "sub_epochs", "rotate_degrees",
                   "train_views", "val_fraction", "patience", "held_out_checks", "threshold_fpr")
"""Settings that made a checkpoint (its fit images, held-out images, training and threshold) without changing how
it scores: ``main.py --eval_only`` refuses other values, since its results.json would report them."""


def settings_differences(trained: Config, asked: Config, also: tuple[str, ...] = (),
                         kept_context: str | None = None) -> list[str]:
    """Score-affecting fields (and the fields ``also`` names) whose values differ, as
    ``name (checkpoint X, asked Y)``.

    ``auto`` is no difference by name: ``--layers auto`` against the stages it resolves to (checked by
    ``Detector.check_stages``), and ``--caff_context auto`` against the reading the checkpoint kept
    (``kept_context``, from its metadata)."""
    names = COMMON_SCORE_FIELDS + SCORE_FIELDS[trained.method] + also
    if trained.layers_auto() or asked.layers_auto():
        names = tuple(name for name in names if name != "layers")
    differences = []
    if "caff_context" in names and kept_context is not None and "auto" in (trained.caff_context, asked.caff_context):
        names = tuple(name for name in names if name != "caff_context")
        if asked.caff_context not in ("auto", kept_context):
            differences.append(f"caff_context (checkpoint kept {kept_context!r}, asked {asked.caff_context!r})")
    return [f"{name} (checkpoint {getattr(trained, name)!r}, asked {getattr(asked, name)!r})"
            for name in names if getattr(trained, name) != getattr(asked, name)] + differences


def load_detector(path: Path | str, config: Config | None = None, extractor: FeatureExtractor | None = None,
                  also: tuple[str, ...] = (), **run_settings: Any) -> Detector:
    """A trained detector from its checkpoint.

    Args:
        path: the checkpoint (``<results>/checkpoints/<task>.pt``).
        config: the settings asked for; a score-affecting field (or a field ``also`` names) that differs from
            the checkpoint's stops with a DetectorError naming every such field. None: the checkpoint's own
            settings.
        extractor: a backbone already built for these settings (its weights are checked).
        run_settings: without ``config``, fields that do not change scores (device, weights location,
            test_batch_size, threads) replaced in the checkpoint's settings.
    """
    path = Path(path)
    saved = _read_checkpoint(path)
    trained = trained_config(saved, path)
    meta = json.loads(saved["meta"])
    if config is not None:
        differences = settings_differences(trained, config, also, meta.get("caff_context"))
        if differences:
            raise DetectorError(f"checkpoint {path} was trained with other settings: {'; '.join(differences)}; "
                                "pass the checkpoint's values (--config with the run's results.json does) or "
                                "retrain")
    else:
        config = dataclasses.replace(trained, **run_settings)
    try:
        check_device(config.device)
    except ConfigError as error:
        raise DetectorError(f"checkpoint {path}: {error} (it was trained on {trained.device}; pass device='cpu' to "
                            "load_detector)") from None
    if extractor is not None and not same_weights(saved["weights_source"], extractor.weights_source):
        raise DetectorError(f"checkpoint {path} was trained on backbone weights {saved['weights_source']}, this run "
                            f"loads {extractor.weights_source}; pass the weights it was trained with")
    detector = build_detector(config, extractor)
    detector.weights_source = saved["weights_source"]
    detector.threshold, detector.threshold_rule, detector.info = meta["threshold"], meta["threshold_rule"], meta["info"]
    # checkpoints from before map_threshold: the image threshold, the maps' scale under the paper's exp merge
    detector.map_threshold = meta.get("map_threshold", detector.threshold)
    try:
        detector._restore(saved["state"], meta)
    except (KeyError, RuntimeError) as error:
        raise DetectorError(f"checkpoint {path} does not fit its own settings ({str(error)[:200]}); retrain") from None
    if extractor is not None:
        detector.check_stages(extractor)
    return detector
