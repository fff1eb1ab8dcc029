"""CFLOW-AD: conditional normalizing flows over multi-scale frozen CNN features.

Gudovskiy, Ishizaka and Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection
with Localization via Conditional Normalizing Flows", WACV 2022.

Each stage ("pool layer") of a frozen encoder gives a feature map (B, C, H, W). Every
spatial position is a *fiber*: the C-vector ``feature_map[b, :, h, w]``. One conditional
flow (decoder) per stage maps a fiber to a latent z ~ N(0, I_C), conditioned on a 2-D
positional encoding of (h, w). Fibers are scored by their log-likelihood per dimension,
log p / C, which is both what the loss uses and what the anomaly maps are built from
(see ``anomaly_map.py`` for the post-processing).

Defaults follow the official code (github.com/gudovskiy/cflow-ad) unless stated;
differences from anomalib (models/image/cflow) are named where they exist.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import shrunk_covariance

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

    The training loop takes one optimizer step per chunk, as the official code (chunk 256,
    ``N``) and anomalib (``fiber_batch_size`` 64). The last, partial chunk is kept.

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
        self.stage_names: tuple[str, ...] = tuple(stage_channels)
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
        """Per-stage maps of log p / C for evaluation, without gradients, ``chunk`` fibers at a time.

        Args:
            features: Tensor (B, C_l, H_l, W_l) per stage name.
            chunk: fibers per decoder call (memory bound only; results do not depend on it).

        Returns:
            Tensor (B, H_l, W_l) of log p / C per stage name.
        """
        maps = {}
        for stage, feature_map in features.items():
            batch, _, height, width = feature_map.shape
            fibers, conditions = self.fibers_of(feature_map)
            log_likelihoods = [
                self.fiber_log_likelihood_per_dim(stage, fiber_chunk, condition_chunk)
                for fiber_chunk, condition_chunk in zip(fibers.split(chunk), conditions.split(chunk))
            ]
            maps[stage] = torch.cat(log_likelihoods).reshape(batch, height, width)
        return maps


class SANFModel(nn.Module):
    """SANF-AD detector: a fixed whitening fitted on the normal training set, then the CAFF flow.

    Preprocessing (buffers, saved with the checkpoint): the semantic token y is centred and whitened
    with the Ledoit-Wolf shrunk covariance S of the training semantic tokens, x = W (y - mu) with
    W = S^(-1/2) (ZCA: channels stay aligned with the backbone's). With ``token_dim`` > 0 only the
    first ``token_dim`` principal axes of S are kept (PCA whitening), so that the flow works on
    ``token_dim`` channels instead of D. The patch tokens go through the same map, which keeps
    their channels aligned with the flow's input (the public code's "half" context needs that).

    Why: W is a fixed invertible linear layer, so it changes the NLL only by a constant, but it
    starts training at the shrunk-Gaussian (Mahalanobis) solution instead of at an isotropic one;
    with a few thousand normal images in 1280 dimensions the flow cannot learn that covariance
    from scratch in a few epochs.

    Args:
        dim: D, channels of the cached tokens.
        n_tokens: N, patch tokens per image.
        token_dim: channels the flow works on; 0 keeps all D.
        n_layers, hidden, heads, clamp, context, fusion, seed: see ``fusion.build_sanf_flow``.
    """

    def __init__(self, dim: int, n_tokens: int, n_layers: int = 4, hidden: int = 1024, heads: int = 4,
                 clamp: float = 3.0, context: str = "half", fusion: bool = True, seed: int = 0,
                 token_dim: int = 0) -> None:
        super().__init__()
        from fusion import build_sanf_flow

        if token_dim > dim:
            raise ValueError(f"token_dim ({token_dim}) cannot exceed the token width ({dim})")
        self.flow_dim = token_dim or dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whitening", torch.eye(dim)[:, : self.flow_dim].clone())
        self.flow = build_sanf_flow(self.flow_dim, n_tokens, n_layers=n_layers, hidden=hidden, heads=heads,
                                    clamp=clamp, context=context, fusion=fusion, seed=seed)

    @torch.no_grad()
    def fit_preprocessing(self, semantic_tokens: Tensor) -> None:
        """Mean and whitening from the normal training semantic tokens (M, D)."""
        mean, covariance, _ = shrunk_covariance(semantic_tokens)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.from_numpy(covariance))
        order = eigenvalues.argsort(descending=True)[: self.flow_dim]
        axes = eigenvectors[:, order] / eigenvalues[order].clamp_min(1e-12).sqrt()  # (D, flow_dim)
        if self.flow_dim == len(mean):
            axes = axes @ eigenvectors[:, order].T  # ZCA: rotate back to the backbone's channels
        self.mean.copy_(mean)
        self.whitening.copy_(axes)

    def preprocess(self, tokens: Tensor) -> Tensor:
        """(..., D) → (..., flow_dim)."""
        return (tokens - self.mean) @ self.whitening

    def latent(self, semantic_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, flow_dim) and log|det dz/dy| (B,) of the preprocessed semantic tokens."""
        z, log_jac_det = self.flow(self.preprocess(semantic_tokens), c=[self.preprocess(patch_tokens)])
        return z, log_jac_det

    def nll_per_dim(self, semantic_tokens: Tensor, patch_tokens: Tensor) -> Tensor:
        """(||z||^2 / 2 - log|det J|) / flow_dim per image (B,): the training loss (Eq. 14 per dimension)."""
        z, log_jac_det = self.latent(semantic_tokens, patch_tokens)
        return (0.5 * z.pow(2).sum(dim=1) - log_jac_det) / self.flow_dim

    def anomaly_score(self, semantic_tokens: Tensor, patch_tokens: Tensor, score: str) -> Tensor:
        """nll: the negative log-likelihood per dimension; z2: mean(z^2), the public code (no log-det)."""
        if score == "nll":
            return self.nll_per_dim(semantic_tokens, patch_tokens)
        if score == "z2":
            return self.latent(semantic_tokens, patch_tokens)[0].pow(2).mean(dim=1)
        raise ValueError(f"score must be 'nll' or 'z2', got {score!r}")
