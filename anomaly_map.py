"""Anomaly maps and image scores from CFLOW-AD's per-stage log-likelihood maps.

The anomaly map is the paper's (merge ``exp`` over all stages, below). The image score follows a
scoring rule (``ScoringRule``, the ``scoring`` setting): which stages' maps of log p / C (see
``model.CFlowModel.stage_log_likelihood_maps``), merged how, summarised how:

- merge ``exp`` (the paper, official code, anomalib): per stage, log p / C is shifted by a
  reference value, exponentiated, upsampled bilinearly to the image size (align_corners=True)
  and summed over stages; the anomaly map is a constant minus that sum. Stages whose
  likelihoods are spread wide are squashed by the exponential; the sharpest stage dominates.
- merge ``z``: per stage, (mean - log p / C) / std with the mean and standard deviation of the
  training fibers' values, upsampled and averaged over stages: every stage weighs the same in
  units of its own normal variation.
- image score ``max`` (the paper) is the maximum of the map; ``topK`` the mean of its K% highest
  pixels (robust to one bright pixel, favours defects of some extent).
- stages: all (default) or a subset, e.g. ``z/top1@blocks.1+blocks.2``.

``scoring auto`` (``select_scoring``) picks the rule on held-out normal *training* images and
synthetic defects made from them (``synthetic.py``); no test image is read. The rule changes image
scores only, never the map, so localisation stays the paper's whatever the rule. Computation is in
float64 on the CPU, as the official code (exp of very negative log-likelihoods underflows later than
in float32): the stage maps are moved there first (``on_cpu``), so that an accelerator computes no float64
and a map is the same whichever device ran the flows.

Normalisation of the ``exp`` merge (``normalization``), i.e. which reference is subtracted and
which constant the sum is subtracted from (the ``z`` merge always uses training statistics):

- ``"train"`` (default): the reference of stage l is the maximum of log p / C over all
  *training* fibers (``stage_statistics``), and the anomaly map is
  (number of stages) - sum. Both are fixed once training ends, so a test image's map and
  score never depend on which other images are scored with it.
- ``"test"``: the official code. The reference is the maximum over the *whole test set*
  and the anomaly map is max(sum) - sum over the whole test set, so every score depends on
  the rest of the test set (cflow-ad issue 24). Here it is computed exactly like
  ``"batch"``; the caller (main.py) must pass the whole test set in a single call.
- ``"batch"``: anomalib. The same maxima taken over each batch, so a score depends on the
  batch it was scored in and on the batch size (anomalib issues 450 and 568, PR 589).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor

from utils import to_numpy

NORMALIZATIONS = ("train", "test", "batch")
MERGES = ("exp", "z")
IMAGE_SCORES = ("max", "top1", "top10")
StageStatistics = dict[str, dict[str, float]]
"""Per stage name: ``max``, ``mean`` and ``std`` of log p / C over the training fibers."""


@dataclass(frozen=True)
class ScoringRule:
    """How stage maps become an image score; written ``merge/score[@stage+stage]``."""

    merge: str = "exp"
    image_score: str = "max"
    stages: tuple[str, ...] = ()
    """The stages merged; empty = all of them."""

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r} in scoring rule; choose from {MERGES}")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"unknown image score {self.image_score!r} in scoring rule; choose from {IMAGE_SCORES}")

    @classmethod
    def parse(cls, text: str) -> ScoringRule:
        """``exp/max``, ``z/top1``, ``z/max@blocks.1+blocks.2``."""
        rule, _, stages = text.partition("@")
        merge, slash, image_score = rule.partition("/")
        if not slash:
            raise ValueError(f"scoring rule {text!r} is not of the form merge/score[@stage+stage], e.g. exp/max")
        return cls(merge.strip(), image_score.strip(), tuple(s.strip() for s in stages.split("+") if s.strip()))

    def __str__(self) -> str:
        return f"{self.merge}/{self.image_score}" + (f"@{'+'.join(self.stages)}" if self.stages else "")

    def selected(self, stage_maps: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.stages:
            return stage_maps
        missing = [stage for stage in self.stages if stage not in stage_maps]
        if missing:
            raise ValueError(f"scoring rule {self} names stages {missing} that the model does not have "
                             f"({sorted(stage_maps)})")
        return {stage: stage_maps[stage] for stage in self.stages}


def on_cpu(stage_maps: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stage maps moved to the CPU (one copy per stage; nothing where they are there already)."""
    return {stage: values.detach().cpu() for stage, values in stage_maps.items()}


def stage_statistics(maps: Iterable[dict[str, Tensor]]) -> StageStatistics:
    """Per-stage maximum, mean and standard deviation of log p / C over all training fibers, in float64 on the CPU.

    Args:
        maps: per training batch, Tensor (B, H_l, W_l) of log p / C per stage name
            (the output of ``CFlowModel.stage_log_likelihood_maps``).

    Raises:
        ValueError: if ``maps`` is empty or the batches do not have the same stages.
    """
    sums: dict[str, list[float]] = {}
    for batch_maps in maps:
        if sums and batch_maps.keys() != sums.keys():
            raise ValueError(f"stages {sorted(batch_maps)} differ from earlier batches' {sorted(sums)}")
        for stage, log_likelihood in on_cpu(batch_maps).items():
            values = log_likelihood.double()
            total = sums.setdefault(stage, [-float("inf"), 0.0, 0.0, 0])
            total[0] = max(total[0], values.max().item())
            total[1] += values.sum().item()
            total[2] += values.square().sum().item()
            total[3] += values.numel()
    if not sums:
        raise ValueError("no training maps given")
    statistics = {}
    for stage, (maximum, total, squares, count) in sums.items():
        mean = total / count
        std = max((squares / count - mean * mean), 0.0) ** 0.5
        statistics[stage] = {"max": maximum, "mean": mean, "std": max(std, 1e-12)}
    return statistics


class AnomalyMapGenerator:
    """Turns per-stage log-likelihood maps into image-sized anomaly maps (higher = more anomalous).

    Args:
        image_size: (H, W) of the anomaly maps.
        normalization: ``"train"``, ``"test"`` or ``"batch"`` (the ``exp`` merge); see the module docstring.
        statistics: the training fibers' statistics per stage (``stage_statistics``); needed by
            ``"train"`` and by the ``z`` merge.
        rule: the scoring rule (default: the paper's, ``exp/max``).

    Raises:
        ValueError: for an unknown ``normalization``, or ``statistics`` missing where needed.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        normalization: str = "train",
        statistics: StageStatistics | None = None,
        rule: ScoringRule = ScoringRule(),
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if statistics is None and (rule.merge == "z" or (rule.merge == "exp" and normalization == "train")):
            raise ValueError(f'training statistics are needed with normalization="train" or the z merge ({rule})')
        self.image_size = image_size
        self.normalization = normalization
        self.statistics = statistics
        self.rule = rule

    def __call__(self, stage_maps: dict[str, Tensor]) -> Tensor:
        """Anomaly maps of a set of images.

        Args:
            stage_maps: Tensor (B, H_l, W_l) of log p / C per stage name. With ``"test"`` (and the
                ``exp`` merge), B must be the whole test set.

        Returns:
            Tensor (B, H, W), float64, on the CPU (maps given on an accelerator are moved first).

        Raises:
            ValueError: if ``stage_maps`` is empty or lacks a stage of the rule or of the statistics.
        """
        if not stage_maps:
            raise ValueError("no stage maps given")
        stage_maps = on_cpu(self.rule.selected(stage_maps))
        if self.rule.merge == "z":
            return sum(self._upsampled(self._standardised(stage, ll)) for stage, ll in stage_maps.items()) / len(
                stage_maps)
        summed = sum(self._upsampled(self._shifted(stage, ll).exp()) for stage, ll in stage_maps.items())
        if self.normalization == "train":
            return len(stage_maps) - summed
        return summed.max() - summed

    def _stage_statistics(self, stage: str) -> dict[str, float]:
        if stage not in self.statistics:
            raise ValueError(f"no training statistics for stage {stage!r}")
        return self.statistics[stage]

    def _shifted(self, stage: str, log_likelihood: Tensor) -> Tensor:
        """log p / C minus the reference of the normalisation, float64."""
        log_likelihood = log_likelihood.double()
        if self.normalization == "train":
            return log_likelihood - self._stage_statistics(stage)["max"]
        return log_likelihood - log_likelihood.max()

    def _standardised(self, stage: str, log_likelihood: Tensor) -> Tensor:
        """(mean - log p / C) / std of the training fibers, float64: higher = less likely."""
        statistics = self._stage_statistics(stage)
        return (statistics["mean"] - log_likelihood.double()) / statistics["std"]

    def _upsampled(self, stage_map: Tensor) -> Tensor:
        """(B, H_l, W_l) -> (B, H, W), bilinear with align_corners=True (official code)."""
        return F.interpolate(stage_map.unsqueeze(1), size=self.image_size, mode="bilinear",
                             align_corners=True).squeeze(1)

    def image_scores(self, anomaly_maps: Tensor) -> Tensor:
        """Image anomaly scores, Tensor (B, H, W) -> (B,), under the rule's image score."""
        return image_scores(anomaly_maps, self.rule.image_score)


def image_scores(anomaly_maps: Tensor, how: str = "max") -> Tensor:
    """(B, H, W) -> (B,): the maximum of each map (official, anomalib) or the mean of its top K% pixels."""
    flat = anomaly_maps.flatten(1)
    if how == "max":
        return flat.amax(dim=1)
    if how not in IMAGE_SCORES:
        raise ValueError(f"unknown image score {how!r}; choose from {IMAGE_SCORES}")
    count = max(1, round(flat.shape[1] * int(how[3:]) / 100))
    return flat.topk(count, dim=1).values.mean(dim=1)


def candidate_rules(stages: Sequence[str]) -> list[ScoringRule]:
    """What ``scoring auto`` chooses from: every merge and image score, over all the stages and
    every subset that leaves one stage out (the paper's rule first: it wins ties)."""
    subsets = [()] + ([tuple(s) for s in itertools.combinations(stages, len(stages) - 1)] if len(stages) > 1 else [])
    return [ScoringRule(merge, score, subset) for subset in subsets for merge in MERGES for score in IMAGE_SCORES]


def auroc_standard_error(auroc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUROC from n_positive and n_negative samples."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc * auroc / (1 + auroc)
    variance = (auroc * (1 - auroc) + (n_positive - 1) * (q1 - auroc * auroc)
                + (n_negative - 1) * (q2 - auroc * auroc)) / (n_positive * n_negative)
    return max(variance, 0.0) ** 0.5


def select_scoring(normal_maps: dict[str, Tensor], defect_maps: dict[str, Tensor], statistics: StageStatistics,
                   image_size: tuple[int, int], candidates: Sequence[ScoringRule]) -> tuple[ScoringRule, list[dict]]:
    """The rule whose image scores best separate defective from normal training images.

    A few dozen held-out images give AUROCs a few hundredths apart by chance, so the first
    candidate (the paper's rule) is left only for a rule better by more than the standard error
    of its AUROC (``auroc_standard_error``); among those, the best. The maps are normalised with the
    training statistics (``map_norm`` train) whatever the run's ``map_norm``: with ``test`` or ``batch`` a
    score depends on the images scored with it, which a selection set of normal images followed by their
    defective copies would not represent.

    Args:
        normal_maps, defect_maps: log p / C per stage of held-out normal training images and of
            synthetic defects made from them (nothing from a test split).
        statistics: the fit images' ``stage_statistics``.
        candidates: the rules to compare, the default first.

    Returns:
        The chosen rule and one row per candidate: ``rule``, ``image_auroc``.
    """
    stages = list(normal_maps)
    normal_maps, defect_maps = on_cpu(normal_maps), on_cpu(defect_maps)
    both = {stage: torch.cat([normal_maps[stage], defect_maps[stage]]) for stage in stages}
    n_normal, n_defect = len(normal_maps[stages[0]]), len(defect_maps[stages[0]])
    labels = np.r_[np.zeros(n_normal), np.ones(n_defect)]
    auroc: dict[ScoringRule, float] = {}
    for merge, subset in dict.fromkeys((rule.merge, rule.stages) for rule in candidates):
        # one merged map per merge and stage set, summarised by every image score that shares it
        maps = AnomalyMapGenerator(image_size, "train", statistics, ScoringRule(merge, stages=subset))(both)
        for rule in candidates:
            if (rule.merge, rule.stages) == (merge, subset):
                auroc[rule] = float(roc_auc_score(labels, to_numpy(image_scores(maps, rule.image_score))))
    rows = [{"rule": str(rule), "image_auroc": auroc[rule]} for rule in candidates]
    return candidates[chosen_index([row["image_auroc"] for row in rows], n_defect, n_normal)], rows


def chosen_index(aurocs: Sequence[float], n_defect: int, n_normal: int) -> int:
    """0 (the default) unless the best AUROC beats ``aurocs[0]`` by more than its standard error; then the
    first of the best."""
    margin = auroc_standard_error(aurocs[0], n_defect, n_normal)
    best = max(range(len(aurocs)), key=lambda i: (aurocs[i], -i))
    return best if aurocs[best] > aurocs[0] + margin else 0
