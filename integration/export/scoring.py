"""How `export --fold auto` scores a candidate fold on held-out windows: the held-out perplexity of the patched model
with the candidate's map (and frame) in place of the gap's patch, and, with `--score kl`, its KL to the dense model
(`measurement/closeness.py`) from the same forward passes. Either ranks the candidates (`choices.OUTCOMES`)."""

import math
from dataclasses import dataclass

import torch

from ..measurement.capture import logits_source
from ..measurement.closeness import Reference, token_closeness, top_predictions
from ..measurement.perplexity import summed_next_token_nll
from .folding import attach_fold_maps, detach_fold_maps


@torch.no_grad()
def heldout_outcomes(
    model,
    input_ids: torch.Tensor,
    maps: dict[int, torch.Tensor],
    frames: dict[int, torch.Tensor] | None = None,
    reference: Reference | None = None,
) -> dict[str, float]:
    """`loss` (the perplexity) of `model` (in memory or a [`layerwise_model`]) on `input_ids` with `maps` (and
    `frames`) attached in place of their patches (see [`attach_fold_maps`]), and its `kl` to the dense model's
    `reference` predictions on them when given."""
    handles = attach_fold_maps(model, maps, frames)
    nll, kl = 0.0, 0.0
    try:
        with logits_source(model, input_ids) as logits_of:
            for row in range(len(input_ids)):
                rows = slice(row, row + 1)
                logits = logits_of(rows)
                nll += summed_next_token_nll(logits, input_ids[rows])
                if reference is not None:
                    kl += float(token_closeness(reference, rows, logits.float())["kl"].sum())
    finally:
        detach_fold_maps(model, handles)
    outcomes = dict(loss=math.exp(nll / input_ids[:, 1:].numel()))
    if reference is not None:
        outcomes["kl"] = kl / input_ids.numel()
    return outcomes


def heldout_perplexity(
    model, input_ids: torch.Tensor, maps: dict[int, torch.Tensor], frames: dict[int, torch.Tensor] | None = None
) -> float:
    """Perplexity of `model` on `input_ids` with `maps` (and `frames`) attached in place of their patches: how a
    candidate fold scores by loss."""
    return heldout_outcomes(model, input_ids, maps, frames)["loss"]


@torch.no_grad()
def dense_reference(dense, input_ids: torch.Tensor, top_k: int) -> Reference:
    """The dense model's top-`top_k` next-token predictions on `input_ids` (in memory or a [`layerwise_model`]), what
    a candidate's KL is measured against."""
    parts = []
    with logits_source(dense, input_ids) as logits_of:
        for row in range(len(input_ids)):
            parts.append([part.cpu() for part in top_predictions(logits_of(slice(row, row + 1)).float(), top_k)])
    return Reference(input_ids, *(torch.cat(part) for part in zip(*parts, strict=True)))


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


__all__ = ["FoldScorer", "dense_reference", "heldout_outcomes", "heldout_perplexity"]
