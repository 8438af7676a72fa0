"""Held-out calibration windows: what every choice by outcome (`--patch auto`, `--metric loss`, `--target-ppl-ratio`,
the export's `--fold auto`) sets aside before anything is fitted, and scores its candidates on."""

import dataclasses

import torch

from linearpatch.common.errors import LinearPatchError

from ..data import TokenWindows


def default_holdout(count: int) -> int:
    """How many of `count` calibration windows a choice by outcome holds out by default: one in eight, at least one."""
    return max(1, count // 8)


def split_holdout(windows: TokenWindows, holdout: int | None) -> tuple[TokenWindows, TokenWindows]:
    """Split calibration windows into (fit, held out): the last `holdout` windows (default: one in eight, at least
    one) are held out. The windows are drawn at seeded random offsets, so the last ones are as random as any."""
    count = len(windows.input_ids)
    holdout = default_holdout(count) if holdout is None else holdout
    if not 1 <= holdout < count:
        raise ValueError(
            f"Cannot hold out {holdout} of {count} calibration windows: scoring by outcome needs at least one window "
            "to fit and one to score; raise --num-samples or change --holdout."
        )
    fit, held = (
        dataclasses.replace(windows, input_ids=rows)
        for rows in (windows.input_ids[:-holdout], windows.input_ids[-holdout:])
    )
    return fit, held


def split_fit_heldout(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows split into (fit, held out) for `--fold auto`: one in eight held out, at least one (as
    `--patch auto` splits them).

    Raises:
        LinearPatchError: for fewer than two windows.
    """
    count = len(input_ids)
    if count < 2:
        raise LinearPatchError(
            f"--fold auto scores each fold on held-out calibration windows, so it needs at least 2 (got {count}): "
            "raise --num-samples, or choose one fold (e.g. --fold down-proj-dense)."
        )
    holdout = default_holdout(count)
    return input_ids[:-holdout], input_ids[-holdout:]


__all__ = ["default_holdout", "split_fit_heldout", "split_holdout"]
