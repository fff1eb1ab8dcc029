"""Reference detectors on the same cached semantic tokens as SANF-AD.

- :class:`KNNScorer`: mean cosine distance to the k nearest normal training features (the DN2 /
  PANDA baseline without fine-tuning).
- :class:`GaussianScorer`: squared Mahalanobis distance under one Gaussian fitted to the normal
  training features, with Ledoit-Wolf or fixed shrinkage of the covariance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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
