"""How `export --fold auto` scores a candidate fold on held-out windows: the held-out perplexity of the patched model
with the candidate's map (and frame) in place of the gap's patch, and, with `--score kl`, its KL to the dense model
(`measurement/closeness.py`) from the same forward passes. Either ranks the candidates (`choices.OUTCOMES`)."""

from dataclasses import dataclass

import torch

from ..measurement.closeness import Reference, measure_windows
from .folding import attach_fold_maps, detach_fold_maps


def heldout_outcomes(
    model,
    input_ids: torch.Tensor,
    maps: dict[int, torch.Tensor],
    frames: dict[int, torch.Tensor] | None = None,
    reference: Reference | None = None,
) -> dict[str, float]:
    """`loss` (the perplexity) of `model` (in memory or a [`layerwise_model`]) on `input_ids` with `maps` (and
    `frames`) attached in place of their patches (see [`attach_fold_maps`]), and its `kl` to the dense model's
    `reference` predictions on them when given (see `measurement.closeness.measure_windows`)."""
    handles = attach_fold_maps(model, maps, frames)
    try:
        perplexity, figures = measure_windows(model, input_ids, reference)
    finally:
        detach_fold_maps(model, handles)
    return dict(loss=perplexity) | ({"kl": figures["kl"]} if figures else {})


def heldout_perplexity(
    model, input_ids: torch.Tensor, maps: dict[int, torch.Tensor], frames: dict[int, torch.Tensor] | None = None
) -> float:
    """Perplexity of `model` on `input_ids` with `maps` (and `frames`) attached in place of their patches: how a
    candidate fold scores by loss."""
    return heldout_outcomes(model, input_ids, maps, frames)["loss"]


@dataclass
class FoldScorer:
    r"""
    `(position, maps, frames) -> {outcome: value}` of a candidate fold on the held-out windows (see
    [`heldout_outcomes`]); `by` names the outcome that ranks the candidates.

    Args:
        model: the LinearPatch model (in memory or a [`layerwise_model`]).
        input_ids (`torch.LongTensor`): the held-out windows.
        by (`str`): `loss` or `kl`.
        reference ([`Reference`], *optional*): the dense model's predictions on them, needed by `kl`.
    """

    model: object
    input_ids: torch.Tensor
    by: str = "loss"
    reference: Reference | None = None

    def __call__(self, position: int, maps: dict, frames: dict) -> dict[str, float]:
        return heldout_outcomes(self.model, self.input_ids, maps, frames, self.reference)


__all__ = ["FoldScorer", "heldout_outcomes", "heldout_perplexity"]
