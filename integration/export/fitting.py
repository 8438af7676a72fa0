"""Fitting the fold of one gap (see `folding.py` for what a map and a frame are, and how they fold):

- [`fit_map`] fits `T` to an objective: `down-proj` reproduces the patched stream `(a + m) P` (the patch's own
  target, so it approximates an approximation); `down-proj-dense` reproduces the dense model's stream after the
  removed block directly, by least squares with each token weighted by its own norm (every later layer reads the
  stream through RMSNorm); `down-proj-cosine` minimises the cosine distance to it (ReplaceMe's best), starting from
  the least-squares map;
- [`fit_rotated`] (`down-proj-rotated`) fits, with `T`, a *frame* `R = c Q` (`Q` orthogonal, `c` a scalar) so that
  `(a + m T) R ~= target`. A map on one MLP output cannot reach the stream entering that layer, which holds most of
  what the removed block changed; a frame acts on all of it. It folds into the layers after the gap (and the head):
  their writers are multiplied by `R^-1` and their readers by `Q` (after each RMSNorm's weight is absorbed into the
  Linear layers that read it), so the export's stream after the gap is the reference's times `R^-1`, which every
  RMSNorm reads as the same thing. Exact up to RMSNorm's eps, for families whose layout is
  [`ResidualLayout.rotatable`] (Llama, Mistral, Qwen 2/3; not Gemma 3's normalised writers);
- [`relative_error`] says how far a fit is from its target, weighted as fitted.
"""

import torch
from torch import nn

from linearpatch.common.errors import LinearPatchError

from ..choices import FOLD_OBJECTIVES, ROTATED_OBJECTIVE
from .folding import apply_map


def _token_weight(target: torch.Tensor) -> torch.Tensor:
    """Per token, 1 / mean(target^2): every later layer reads the stream through RMSNorm, so what matters is each
    token's error relative to its own norm; unweighted least squares would fit the few massive-activation tokens and
    nothing else."""
    return 1.0 / target.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12)


def fit_map(
    objective: str,
    a: torch.Tensor,
    m: torch.Tensor,
    target: torch.Tensor,
    diagonal: bool = False,
    ridge: float = 1e-3,
    steps: int = 100,
) -> torch.Tensor:
    r"""
    The map `T` of one gap for `objective` (see the module docstring), so that `a + m T ~= target` per token.

    Args:
        objective (`str`): one of `FOLD_OBJECTIVES`; it decides the loss, the caller the target (the patched stream
            `(a + m) P` for `down-proj`, the dense model's stream for the others).
        a (`torch.Tensor` of shape `[tokens, C]`): the stream after the attention of the kept layer before the gap.
        m (`torch.Tensor` of shape `[tokens, C]`): that layer's MLP output.
        target (`torch.Tensor` of shape `[tokens, C]`): the stream to reproduce.
        diagonal (`bool`, *optional*): fit only per-channel scales (returned as a `[C]` vector).
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser, relative to the mean diagonal of the
            (weighted) Gram matrix.
        steps (`int`, *optional*, defaults to 100): full-batch Adam steps of the cosine objective.

    Returns:
        `torch.Tensor`: `T` (`[C, C]`, or `[C]` when `diagonal`), float64.
    """
    if objective not in FOLD_OBJECTIVES:
        raise LinearPatchError(f"Unknown fold objective {objective!r}: choose one of {', '.join(FOLD_OBJECTIVES)}.")
    if objective == ROTATED_OBJECTIVE:
        raise LinearPatchError(f"{ROTATED_OBJECTIVE} fits a map and a frame: call fit_rotated.")
    a, m, target = a.double(), m.double(), target.double()
    transform = _least_squares_map(a, m, target, _token_weight(target), diagonal, ridge)
    if objective == "down-proj-cosine":
        transform = _cosine_refine(transform, a, m, target, steps)
    return transform


def _least_squares_map(a, m, target, weight, diagonal: bool, ridge: float) -> torch.Tensor:
    """`T` minimising the `weight`ed squared error of `a + m T` to `target` (ridge-regularised)."""
    delta = target - a
    if diagonal:
        gram = (m * m * weight).sum(dim=0)
        transform = (m * delta * weight).sum(dim=0) / (gram + ridge * gram.mean())
    else:
        gram = m.T @ (m * weight)
        damping = ridge * gram.diagonal().mean()
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        transform = torch.linalg.solve(gram + damping * identity, m.T @ (delta * weight))
    return transform


# Each round of the alternation is an SVD of a C x C matrix in float64: 27 s at C = 4096 on 2 CPU cores (Llama-3-8B),
# so 100 rounds would take 45 minutes. Beyond this width the rounds shrink with the cube of the width (at least
# `_MIN_ROUNDS`): the fit then costs about what 100 rounds cost at this width.
_ROUNDS_WIDTH = 1024
_MIN_ROUNDS = 5


def rotated_rounds(width: int, rounds: int) -> int:
    """The rounds [`fit_rotated`] runs at most for a stream of `width` channels (`rounds` up to `_ROUNDS_WIDTH`)."""
    if width <= _ROUNDS_WIDTH:
        return rounds
    return min(rounds, max(_MIN_ROUNDS, int(rounds * (_ROUNDS_WIDTH / width) ** 3)))


def fit_rotated(
    a: torch.Tensor,
    m: torch.Tensor,
    target: torch.Tensor,
    ridge: float = 1e-3,
    rounds: int = 100,
    tolerance: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The `down-proj-rotated` fold of one gap: a map `T` and a frame `R = c Q` (`Q` orthogonal, `c > 0`) so that
    `(a + m T) R ~= target` per token, each token weighted by its own norm (as `down-proj-dense`). Alternates the two
    closed forms from `T = I`: `R` by weighted orthogonal Procrustes with the best scale, `T` by least squares to
    `target R^-1`. Every round works on `C x C` statistics gathered once, so rounds are cheap whatever the tokens.

    Args:
        a, m, target (`torch.Tensor` of shape `[tokens, C]`): as for [`fit_map`] (the target is the dense stream).
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser of `T`.
        rounds (`int`, *optional*, defaults to 100): most alternations (fewer for a width above 1024: see
            [`rotated_rounds`]).
        tolerance (`float`, *optional*, defaults to 1e-7): stop once a round lowers the weighted error by less than
            this fraction of the target's weighted norm.

    Returns:
        `(T, R)`, float64 `[C, C]` each.
    """
    a, m, target = a.double(), m.double(), target.double()
    rounds = rotated_rounds(a.shape[1], rounds)
    weight = _token_weight(target)
    m_m = m.T @ (m * weight)
    identity = torch.eye(m_m.shape[0], dtype=m_m.dtype, device=m_m.device)
    factor = torch.linalg.cholesky(m_m + ridge * m_m.diagonal().mean() * identity)
    m_a, m_y, a_y = m.T @ (a * weight), m.T @ (target * weight), a.T @ (target * weight)
    a_a, y_y = float((a.pow(2) * weight).sum()), float((target.pow(2) * weight).sum())
    transform = identity.clone()
    best = (float("inf"), transform, None)
    for _ in range(rounds):
        # R for this T: Procrustes on x = a + m T, from x^T W y and x^T W x alone.
        u, singular, vh = torch.linalg.svd(a_y + transform.T @ m_y)
        x_x = a_a + 2 * float((transform * m_a).sum()) + float((transform * (m_m @ transform)).sum())
        scale = float(singular.sum()) / x_x
        rotation = u @ vh
        error = y_y - float(singular.sum()) ** 2 / x_x  # at the best scale
        if error > best[0] - tolerance * y_y:
            if error < best[0]:
                best = (error, transform, scale * rotation)
            break
        best = (error, transform, scale * rotation)
        # T for this R: least squares of m T to target R^-1 - a (every token's norm scales by 1 / c alike).
        transform = torch.cholesky_solve(m_y @ rotation.T / scale - m_a, factor)
    return best[1], best[2]


def _cosine_refine(transform: torch.Tensor, a, m, target, steps: int, max_tokens: int = 65536) -> torch.Tensor:
    """Minimise the mean cosine distance between `a + m T` and `target` by full-batch Adam from `transform`; keep the
    best `T` seen (the least-squares start included), on at most `max_tokens` tokens (evenly spaced)."""
    if len(a) > max_tokens:
        rows = torch.linspace(0, len(a) - 1, max_tokens).long()
        a, m, target = a[rows], m[rows], target[rows]
    a, m, target = a.float(), m.float(), target.float()
    parameter = nn.Parameter(transform.float().clone())
    # Adam moves every entry by about lr per step: a small fraction of the map's typical entry.
    optimizer = torch.optim.Adam([parameter], lr=1e-2 * float(transform.abs().mean()))

    def loss_of(value: torch.Tensor) -> torch.Tensor:
        return 1 - nn.functional.cosine_similarity(a + apply_map(m, value), target, dim=1).mean()

    best, best_loss = transform.clone(), float("inf")
    for step in range(steps):
        # The loss of each step's starting point is the one its gradient needs: one evaluation per point visited.
        optimizer.zero_grad()
        loss = loss_of(parameter)
        if step == 0:  # the least-squares start, kept in full precision
            best_loss = float(loss.detach())
        elif float(loss.detach()) < best_loss:
            best, best_loss = parameter.detach().double().clone(), float(loss.detach())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        if steps and float(loss_of(parameter)) < best_loss:  # where the last step landed
            best = parameter.detach().double().clone()
    return best


def relative_error(
    a: torch.Tensor, m: torch.Tensor, target: torch.Tensor, transform: torch.Tensor, frame: torch.Tensor | None = None
) -> float:
    """How far `a + m T` (times the frame `R`, if any) is from `target`, relative to it, each token weighted by its
    own norm (as fitted)."""
    weight = _token_weight(target)
    mapped = a + apply_map(m, transform)
    if frame is not None:
        mapped = mapped @ frame.double()
    return float(((mapped - target) * weight.sqrt()).norm() / (target * weight.sqrt()).norm())


__all__ = ["fit_map", "fit_rotated", "relative_error"]
