"""Anomaly maps and image scores from CFLOW-AD's per-stage log-likelihood maps.

Per stage l, the map of log p / C (see ``model.CFlowModel.stage_log_likelihood_maps``) is
shifted by a reference value, exponentiated, upsampled bilinearly to the image size
(align_corners=True, official code) and summed over stages; the anomaly map is a constant
minus that sum, and an image's score is the maximum of its anomaly map. Computation is in
float64, as the official code and anomalib (exp of very negative log-likelihoods underflows
later than in float32).

Normalisation (``normalization``), i.e. which reference is subtracted and which constant
the sum is subtracted from:

- ``"train"`` (default): the reference of stage l is the maximum of log p / C over all
  *training* fibers (``reference_from_training``), and the anomaly map is
  (number of stages) - sum. Both are fixed once training ends, so a test image's map and
  score never depend on which other images are scored with it.
- ``"test"``: the official code. The reference is the maximum over the *whole test set*
  and the anomaly map is max(sum) - sum over the whole test set, so every score depends on
  the rest of the test set (cflow-ad issue 24). Here it is computed exactly like
  ``"batch"``; the caller (main.py) must pass the whole test set in a single call.
- ``"batch"``: anomalib. The same maxima taken over each batch, so a score depends on the
  batch it was scored in and on the batch size (anomalib issues 450 and 568, PR 589).
"""

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor

NORMALIZATIONS = ("train", "test", "batch")


def reference_from_training(maps: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Per-stage maximum of log p / C over all training fibers.

    Args:
        maps: per training batch, Tensor (B, H_l, W_l) of log p / C per stage name
            (the output of ``CFlowModel.stage_log_likelihood_maps``).

    Returns:
        The maximum per stage name, over all batches.

    Raises:
        ValueError: if ``maps`` is empty or the batches do not have the same stages.
    """
    reference: dict[str, float] = {}
    for batch_maps in maps:
        if reference and batch_maps.keys() != reference.keys():
            raise ValueError(f"stages {sorted(batch_maps)} differ from earlier batches' {sorted(reference)}")
        for stage, log_likelihood in batch_maps.items():
            reference[stage] = max(reference.get(stage, -float("inf")), log_likelihood.max().item())
    if not reference:
        raise ValueError("no training maps given")
    return reference


class AnomalyMapGenerator:
    """Turns per-stage log-likelihood maps into image-sized anomaly maps (higher = more anomalous).

    Args:
        image_size: (H, W) of the anomaly maps.
        normalization: ``"train"``, ``"test"`` or ``"batch"``; see the module docstring.
        reference: for ``"train"`` only, the per-stage maximum of log p / C over the training
            fibers (``reference_from_training``).

    Raises:
        ValueError: for an unknown ``normalization``, or a ``reference`` missing with
            ``"train"`` or given with another normalisation.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        normalization: str = "train",
        reference: dict[str, float] | None = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if (normalization == "train") != (reference is not None):
            raise ValueError('a reference is needed with normalization="train", and only then')
        self.image_size = image_size
        self.normalization = normalization
        self.reference = reference

    def __call__(self, stage_maps: dict[str, Tensor]) -> Tensor:
        """Anomaly maps of a set of images.

        Args:
            stage_maps: Tensor (B, H_l, W_l) of log p / C per stage name. With ``"test"``,
                B must be the whole test set.

        Returns:
            Tensor (B, H, W), float64.

        Raises:
            ValueError: if ``stage_maps`` is empty.
        """
        if not stage_maps:
            raise ValueError("no stage maps given")
        summed = sum(self._upsampled_likelihood(stage, log_likelihood) for stage, log_likelihood in stage_maps.items())
        if self.normalization == "train":
            return len(stage_maps) - summed
        return summed.max() - summed

    def _upsampled_likelihood(self, stage: str, log_likelihood: Tensor) -> Tensor:
        """exp(log p / C - reference), (B, H_l, W_l) -> (B, H, W), float64."""
        log_likelihood = log_likelihood.double()
        if self.normalization == "train":
            if stage not in self.reference:
                raise ValueError(f"no training reference for stage {stage!r}")
            shifted = log_likelihood - self.reference[stage]
        else:
            shifted = log_likelihood - log_likelihood.max()
        upsampled = F.interpolate(
            shifted.exp().unsqueeze(1), size=self.image_size, mode="bilinear", align_corners=True
        )
        return upsampled.squeeze(1)

    @staticmethod
    def image_scores(anomaly_maps: Tensor) -> Tensor:
        """Image anomaly scores, Tensor (B, H, W) -> (B,): the maximum of each map (official, anomalib)."""
        return anomaly_maps.amax(dim=(-2, -1))
