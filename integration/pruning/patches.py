"""Patch estimation from calibration statistics: one C x C matrix per contiguous gap, applied as `h @ P`."""

import torch

from ..choices import PATCH_CHOICES, PATCH_KINDS
from ..measurement.calibration import CalibrationStatistics
from ..measurement.hadamard import hadamard_matrix

# The lstsq regulariser, relative to the mean diagonal of X^T X (`--patch auto` also tries a grid around it).
DEFAULT_RIDGE = 1e-2
_EPS = 1e-12


def _mean_ratio(magnitudes: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """mean over windows of magnitudes[w, end] / magnitudes[w, start] (the paper's Eq. 4, per channel)."""
    after = magnitudes[:, end].double()
    before = magnitudes[:, start].double().clamp_min(_EPS)
    return (after / before).mean(dim=0)


def channel_scales(statistics: CalibrationStatistics, start: int, end: int, rotated: bool = True) -> torch.Tensor:
    """Scales d for gap [start, end): `d_k = mean_w [mean_t |(X_end H)[t,k]| / mean_t |(X_start H)[t,k]|]`
    (without H when `rotated=False`)."""
    magnitudes = statistics.rotated_abs_mean if rotated else statistics.channel_abs_mean
    return _mean_ratio(magnitudes, start, end)


def estimate_patch(
    statistics: CalibrationStatistics, start: int, end: int, kind: str = "hadamard", ridge: float = DEFAULT_RIDGE
) -> torch.Tensor:
    """The patch P (float32, C x C) for the gap [start, end) of the dense model.

    Args:
        statistics (`CalibrationStatistics`): from [`calibrate`] on the dense model.
        start (`int`), end (`int`): the gap; P maps X_start (output of layer start-1) towards X_end.
        kind (`str`, *optional*, defaults to `"hadamard"`):
            `hadamard`: P = H diag(d) H^T, d from the rotated magnitudes (LinearPatch);
            `diag`: P = diag(d) without rotation; `scalar`: P = r I with r the mean over windows of the ratio of
            mean |X| over all channels; `lstsq`: ridge least squares X_start P ~= X_end (ReplaceMe-style baseline,
            needs `regression_blocks=[(start, end)]` in the calibration pass).
        ridge (`float`, *optional*, defaults to 1e-2): lstsq regulariser, relative to the mean diagonal of
            X^T X.
    """
    size = statistics.channel_abs_mean.shape[-1]
    if kind == "hadamard":
        scales = channel_scales(statistics, start, end, rotated=True)
        rotation = hadamard_matrix(size, dtype=torch.float64)
        return ((rotation * scales) @ rotation.T).float()
    if kind == "diag":
        return torch.diag(channel_scales(statistics, start, end, rotated=False)).float()
    if kind == "scalar":
        magnitudes = statistics.channel_abs_mean.mean(dim=-1, keepdim=True)
        return (_mean_ratio(magnitudes, start, end) * torch.eye(size, dtype=torch.float64)).float()
    if kind == "lstsq":
        if (start, end) not in statistics.gram:
            raise ValueError(f"No Gram matrices for gap ({start}, {end}): calibrate with regression_blocks.")
        xtx, xty = statistics.gram[(start, end)]
        damping = ridge * xtx.diagonal().mean()
        return torch.linalg.solve(xtx + damping * torch.eye(size, dtype=xtx.dtype), xty).float()
    raise ValueError(f"Unknown patch kind {kind!r}: choose one of {', '.join(PATCH_KINDS)}.")


def scale_summary(statistics: CalibrationStatistics, start: int, end: int) -> dict:
    """Per-channel scale statistics of a gap, rotated and not (for the report)."""
    summary = {}
    for name, rotated in (("hadamard", True), ("channel", False)):
        if rotated and statistics.rotated_abs_mean.isnan().all():
            continue  # a width without a Hadamard matrix
        scales = channel_scales(statistics, start, end, rotated=rotated)
        summary[name] = dict(
            mean=float(scales.mean()), std=float(scales.std()), min=float(scales.min()), max=float(scales.max())
        )
    return summary


__all__ = ["DEFAULT_RIDGE", "PATCH_CHOICES", "PATCH_KINDS", "channel_scales", "estimate_patch", "scale_summary"]
