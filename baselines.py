"""Reference detectors on the same cached semantic tokens as SANF-AD.

- :class:`KNNScorer`: mean cosine distance to the k nearest normal training features (the DN2 /
  PANDA baseline without fine-tuning).
- :class:`GaussianScorer`: squared Mahalanobis distance under one Gaussian fitted to the normal
  training features, with Ledoit-Wolf or fixed shrinkage of the covariance.
- :class:`ViewWhitening`: one such Gaussian per view index (``--view_statistics per_view``), as a whitening
  map: the Gaussian baseline's score and SANF-AD's start over views.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import shrunk_covariance


class KNNScorer:
    """Anomaly score = mean of the ``k`` smallest cosine distances to the training features."""

    def __init__(self, k: int = 2, chunk: int = 1024):
        self.k, self.chunk = k, chunk
        self.bank: Tensor | None = None

    def fit(self, features: Tensor) -> KNNScorer:
        if len(features) < self.k:
            raise ValueError(f"kNN with k={self.k} needs at least {self.k} training features, got {len(features)}")
        self.bank = F.normalize(features.float(), dim=1)
        return self

    def score(self, features: Tensor) -> Tensor:
        assert self.bank is not None, "fit() first"
        queries = F.normalize(features.float(), dim=1)
        scores = []
        for start in range(0, len(queries), self.chunk):
            similarity = queries[start:start + self.chunk] @ self.bank.T
            scores.append((1 - similarity.topk(self.k, dim=1).values).mean(dim=1))
        return torch.cat(scores)


class GaussianScorer:
    """Anomaly score = (x - mu)^T Sigma^-1 (x - mu) with a shrunk covariance.

    ``shrinkage`` 0 picks the Ledoit-Wolf coefficient from the training data; a value in (0, 1]
    blends the sample covariance with a scaled identity: (1 - s) S + s (tr S / D) I.

    ``mean`` and ``precision`` (Sigma^-1) are float64 on the CPU, where they are estimated and saved. Scoring
    runs on the features' device in float32 as ||(x - mu) W||^2 with W W^T = Sigma^-1: a sum of squares, which
    no rounding can make negative or cancel, unlike the quadratic form itself.
    """

    def __init__(self, shrinkage: float = 0.0):
        self.shrinkage = shrinkage
        self.used_shrinkage = float("nan")
        self.mean: Tensor | None = None
        self.precision: Tensor | None = None
        self._centre: Tensor | None = None
        self._factor: Tensor | None = None

    def fit(self, features: Tensor) -> GaussianScorer:
        mean, covariance, self.used_shrinkage = shrunk_covariance(features, self.shrinkage)
        return self.load(mean, torch.from_numpy(np.linalg.pinv(covariance, hermitian=True)), features.device)

    def load(self, mean: Tensor, precision: Tensor, device: torch.device | str) -> GaussianScorer:
        """Take a fitted (or saved) mean and precision; score on ``device``."""
        self.mean, self.precision = mean.detach().cpu().double(), precision.detach().cpu().double()
        eigenvalues, eigenvectors = torch.linalg.eigh(self.precision)
        self._centre = self.mean.float().to(device)
        self._factor = (eigenvectors * eigenvalues.clamp_min(0).sqrt()).float().to(device)
        return self

    def score(self, features: Tensor) -> Tensor:
        assert self._centre is not None and self._factor is not None, "fit() first"
        return ((features.float() - self._centre) @ self._factor).square().sum(dim=1)


class ViewWhitening(nn.Module):
    """Per-view ZCA whitening x -> W_v (x - mu_v), with W_v = S_v^(-1/2) and S_v the shrunk covariance of the
    fitted tokens of view v.

    View v of every image is one fixed transform (``views.py``), so the tokens of a view have a mean and
    covariance of their own; pooled, the V views make one wider Gaussian in which a defect can hide along the
    axes that tell views apart. A shrunk covariance of n tokens is a multiple of the identity plus a term of
    rank below n, so W_v is stored as ``floor_gain`` I + U diag(``axis_gain``) U^T with U (D, R), R = min(D, n):
    O(V D R) numbers instead of O(V D^2).

    Buffers: ``mean`` (V, D), ``axes`` (V, D, R), ``axis_gain`` (V, R), ``floor_gain`` (V,) and ``log_det`` (V,),
    log|det W_v|, which a density over all views needs (the views' whitenings differ).
    """

    def __init__(self, views: int, dim: int, rank: int = 1) -> None:
        super().__init__()
        self.views, self.dim = views, dim
        self._allocate(rank)

    def _allocate(self, rank: int) -> None:
        views, dim = self.views, self.dim
        self.register_buffer("mean", torch.zeros(views, dim))
        self.register_buffer("axes", torch.zeros(views, dim, rank))
        self.register_buffer("axis_gain", torch.zeros(views, rank))
        self.register_buffer("floor_gain", torch.ones(views))
        self.register_buffer("log_det", torch.zeros(views))

    @property
    def rank(self) -> int:
        return self.axes.shape[-1]

    @torch.no_grad()
    def fit(self, tokens: Tensor, view: Tensor, shrinkage: float = 0.0) -> list[float]:
        """Fit on tokens (M, D) whose view indices are ``view`` (M,); returns each view's shrinkage used."""
        counts = torch.bincount(view.cpu(), minlength=self.views)
        if len(counts) > self.views or counts.min() < 2:
            raise ValueError(f"per-view statistics need at least 2 tokens of each of the {self.views} views, got "
                             f"{counts.tolist()}")
        dtype = self.mean.dtype  # that of the module (a double model's stays double)
        self._allocate(min(self.dim, int(counts.max())))
        self.to(tokens.device, dtype)
        used = []
        for index in range(self.views):
            rows = tokens[view == index]
            mean, covariance, shrinkage_used = shrunk_covariance(rows, shrinkage)
            eigenvalues, axes, floor = self._eigen(torch.from_numpy(covariance), rows.detach().cpu().double() - mean)
            floor_gain = floor.rsqrt() if len(eigenvalues) < self.dim else torch.zeros((), dtype=torch.float64)
            kept = len(eigenvalues)
            self.mean[index] = mean.to(dtype)
            self.axes[index, :, :kept] = axes.to(dtype)
            self.axis_gain[index, :kept] = (eigenvalues.rsqrt() - floor_gain).to(dtype)
            self.floor_gain[index] = floor_gain.to(dtype)
            self.log_det[index] = float(-0.5 * (eigenvalues.log().sum() + (self.dim - kept) * floor.log()))
            used.append(shrinkage_used)
        return used

    def _eigen(self, covariance: Tensor, centred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eigenvalues (R,), axes (D, R) and the floor eigenvalue of a shrunk covariance a X^T X + b I of centred
        tokens X (n, D), float64. With n < D the span of X's rows (an orthonormal basis Q of n columns) holds every
        eigenvalue above the floor b, so the eigen-decomposition of the n x n matrix Q^T C Q gives them, and b is
        the mean of C's trace outside it: O(n D^2) work instead of a D x D eigen-decomposition."""
        if len(centred) >= self.dim:
            eigenvalues, axes = torch.linalg.eigh(covariance)
            return eigenvalues.clamp_min(1e-12), axes, eigenvalues.new_tensor(1.0)
        basis = torch.linalg.qr(centred.T).Q  # (D, n)
        inside = basis.T @ covariance @ basis
        eigenvalues, rotation = torch.linalg.eigh(inside)
        floor = ((covariance.trace() - inside.trace()) / (self.dim - len(centred))).clamp_min(1e-12)
        return eigenvalues.clamp_min(1e-12), basis @ rotation, floor

    def forward(self, tokens: Tensor, view: Tensor) -> Tensor:
        """Tokens (B, D) of views ``view`` (B,) → whitened (B, D)."""
        whitened = torch.empty_like(tokens)
        for index in range(self.views):
            rows = view == index
            centred = tokens[rows] - self.mean[index]
            axes = self.axes[index]
            whitened[rows] = centred * self.floor_gain[index] + ((centred @ axes) * self.axis_gain[index]) @ axes.T
        return whitened
