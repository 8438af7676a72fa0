"""Closeness by cut: how far from the dense model every block of one depth leaves it, with and without a patch.

The figure `linearpatch report` draws from it answers the question the cosine proxy stands in for: at this depth,
which cut changes the model least? For each block start s, the dense model with layers [s, s + n) removed is scored
on windows held out from the fit ([`HeldOutScorer`]: one dense forward stores the stream, each cut costs the layers
after it), once as the plain cut and once with a training-free patch fitted on the other windows; beside them, the
cosine of the block's input and output, the proxy `--metric cosine` reads.
"""

from ..data import TokenWindows
from ..measurement.calibration import calibrate
from ..measurement.hadamard import hadamard_supported
from ..measurement.holdout import default_holdout, split_holdout
from .search import HeldOutScorer, PatchVariant
from .selection import candidate_scores


def closeness_by_cut(dense, windows: TokenWindows, num_layers: int, progress: bool = False) -> dict:
    """Every block of `num_layers` layers of `dense`, scored on held-out windows as a plain cut and patched.

    Args:
        dense: the dense causal LM, in memory.
        windows (`TokenWindows`): at least two windows; the last one in eight (at least one) is held out, the patches
            are fitted on the others.
        num_layers (`int`): the depth of every block.
        progress (`bool`, *optional*, defaults to `False`): progress bars.

    Returns:
        `dict`: `num_layers`, `patch` (the kind fitted: the Hadamard patch, or `diag` for a width without a Hadamard
        matrix; both need only the per-layer statistics), `dense_perplexity` on the held-out windows, `windows`
        (fit, held out) and `cuts`: per block start, `start`, `end`, `cosine`, and the held-out `plain_kl`,
        `patched_kl` (nats per token, to the dense model) and `plain_perplexity`, `patched_perplexity`.
    """
    fit, held = split_holdout(windows, default_holdout(len(windows.input_ids)))
    total = dense.config.num_hidden_layers
    statistics = calibrate(dense, fit, distances=(1, num_layers), progress=progress)
    cosine = candidate_scores(statistics, num_layers, "cosine")
    variant = PatchVariant("hadamard" if hadamard_supported(dense.config.hidden_size) else "diag")
    starts = range(total - num_layers + 1)
    scorer = HeldOutScorer(dense, held.input_ids, progress=progress, closeness=True)
    scorer.prepare(starts)
    cuts = []
    for start in starts:
        end = start + num_layers
        plain, patched = scorer.measure_many(start, end, [None, variant.fit(statistics, start, end)])
        cuts.append(
            dict(
                start=start,
                end=end,
                cosine=cosine[start],
                plain_kl=plain["kl"],
                patched_kl=patched["kl"],
                plain_perplexity=plain["loss"],
                patched_perplexity=patched["loss"],
            )
        )
    return dict(
        num_layers=num_layers,
        patch=variant.label,
        dense_perplexity=scorer.dense_perplexity,
        windows=[len(fit.input_ids), len(held.input_ids)],
        cuts=cuts,
    )


def checkpoint_closeness(dense, windows: TokenWindows, pruned_layers, progress: bool = False) -> dict | None:
    """[`closeness_by_cut`] at a checkpoint's depth (all its removed layers as one block), for its figures; `None`
    for a single window, which leaves none to hold out."""
    if len(windows.input_ids) < 2:
        return None
    return closeness_by_cut(dense, windows, len(pruned_layers), progress)


__all__ = ["checkpoint_closeness", "closeness_by_cut"]
