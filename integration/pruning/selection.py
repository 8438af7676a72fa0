"""Which layers to drop: LLM-Streamline cosine, angular distance, ShortGPT Block Influence, or the user's choice."""

import torch

from ..choices import METRICS, SELECTION_METRICS
from ..measurement.calibration import CalibrationStatistics
from ..options import parse_layers


def candidate_scores(statistics: CalibrationStatistics, num_layers: int, metric: str) -> dict[int, float]:
    """Score of every candidate: block start s (contiguous metrics) or single layer l (block influence).

    `cosine`: mean cosine between X_s and X_{s+n} (higher = the block changes less; every s = 0..L-n, so blocks at
    the very start and at the very end are candidates). `angular`: arccos(cos)/pi (lower is better).
    `block-influence`: 1 - cos(X_l, X_{l+1}) per layer (lower is better).
    """
    if metric == "cosine":
        scores = statistics.block_cosine(num_layers)
    elif metric == "angular":
        scores = statistics.block_angular(num_layers)
    elif metric == "block-influence":
        scores = statistics.block_influence()
    else:
        raise ValueError(f"Unknown metric {metric!r}: choose one of {', '.join(METRICS)}, or give explicit layers.")
    return {index: float(score) for index, score in enumerate(scores.tolist())}


def select_layers(statistics: CalibrationStatistics, num_layers: int, metric: str = "cosine") -> list[int]:
    """The `num_layers` layers to drop according to `metric` (see [`candidate_scores`])."""
    total = statistics.num_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"Cannot prune {num_layers} of {total} layers: choose 1..{total - 1}.")
    scores = candidate_scores(statistics, num_layers, metric)
    if metric == "block-influence":
        ranked = sorted(scores, key=lambda layer: (scores[layer], layer))
        return sorted(ranked[:num_layers])
    values = torch.tensor([scores[start] for start in sorted(scores)])
    start = int(values.argmax()) if metric == "cosine" else int(values.argmin())
    return list(range(start, start + num_layers))


__all__ = ["METRICS", "SELECTION_METRICS", "candidate_scores", "parse_layers", "select_layers"]
