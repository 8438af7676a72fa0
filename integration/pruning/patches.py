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


def massive_channels(statistics: CalibrationStatistics, start: int, end: int) -> torch.Tensor:
    """The massive-activation channels at either end of the gap [start, end) (a bool mask over C; all False for
    statistics from before they were recorded)."""
    if statistics.massive_channels is None:
        return torch.zeros(statistics.channel_abs_mean.shape[-1], dtype=torch.bool)
    return statistics.massive_channels[start] | statistics.massive_channels[end]


def hadamard_patch(statistics: CalibrationStatistics, start: int, end: int) -> torch.Tensor:
    """LinearPatch's P = H diag(d) H^T for the gap [start, end), with the model's massive-activation channels kept
    out of the rotation.

    The rotation spreads every channel over all of them, so d is the ratio of the whole stream's magnitudes. A block
    may change massive channels in opposite ways: Gemma-3-270M's layers 6..11 shrink channel 400 six-fold while
    channel 163 grows 4.5-fold, so every rotated scale is about 4.4 and the patch hands layer 12 a channel 400 26x
    too large (held-out perplexity 5e18 against 4e4 for no patch). Here the massive channels M (see
    [`calibrate`]) each get their own ratio, and H diag(d) H^T is fitted to the stream with M zeroed and applied to
    it: P = E H diag(d_rest) H^T E + diag(r_M), E the projection that zeroes M. With no massive channel (SmolLM2
    and every tiny test model) this is the paper's patch exactly.
    """
    size = statistics.channel_abs_mean.shape[-1]
    rotation = hadamard_matrix(size, dtype=torch.float64)
    massive = massive_channels(statistics, start, end)
    if not massive.any():
        scales = channel_scales(statistics, start, end, rotated=True)
        return ((rotation * scales) @ rotation.T).float()
    rest = (~massive).double()
    scales = _mean_ratio(statistics.rotated_rest_abs_mean, start, end)
    patch = rest[:, None] * ((rotation * scales) @ rotation.T) * rest[None, :]
    own = channel_scales(statistics, start, end, rotated=False)
    index = massive.nonzero().flatten()
    patch[index, index] = own[index]
    return patch.float()


def estimate_patch(
    statistics: CalibrationStatistics, start: int, end: int, kind: str = "hadamard", ridge: float = DEFAULT_RIDGE
) -> torch.Tensor:
    """The patch P (float32, C x C) for the gap [start, end) of the dense model.

    Args:
        statistics (`CalibrationStatistics`): from [`calibrate`] on the dense model.
        start (`int`), end (`int`): the gap; P maps X_start (output of layer start-1) towards X_end.
        kind (`str`, *optional*, defaults to `"hadamard"`):
            `hadamard`: P = H diag(d) H^T, d from the rotated magnitudes (LinearPatch); where the model carries
            massive-activation channels at either end of the gap, those are scaled on their own and the rotation
            covers the rest (see [`hadamard_patch`]);
            `diag`: P = diag(d) without rotation; `scalar`: P = r I with r the mean over windows of the ratio of
            mean |X| over all channels; `lstsq`: ridge least squares X_start P ~= X_end (ReplaceMe-style baseline,
            needs `regression_blocks=[(start, end)]` in the calibration pass).
        ridge (`float`, *optional*, defaults to 1e-2): lstsq regulariser, relative to the mean diagonal of
            X^T X.
    """
    size = statistics.channel_abs_mean.shape[-1]
    if kind == "hadamard":
        return hadamard_patch(statistics, start, end)
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
    """Per-channel scale statistics of a gap, rotated and not, and its massive-activation channels (for the
    report)."""
    summary = {"massive_channels": massive_channels(statistics, start, end).nonzero().flatten().tolist()}
    for name, rotated in (("hadamard", True), ("channel", False)):
        if rotated and statistics.rotated_abs_mean.isnan().all():
            continue  # a width without a Hadamard matrix
        scales = channel_scales(statistics, start, end, rotated=rotated)
        summary[name] = dict(
            mean=float(scales.mean()), std=float(scales.std()), min=float(scales.min()), max=float(scales.max())
        )
    return summary


__all__ = [
    "DEFAULT_RIDGE",
    "PATCH_CHOICES",
    "PATCH_KINDS",
    "channel_scales",
    "estimate_patch",
    "hadamard_patch",
    "massive_channels",
    "scale_summary",
]
