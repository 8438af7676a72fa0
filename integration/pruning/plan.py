"""The pruning plan: which layers go and which patch each gap gets, chosen by a proxy from one calibration pass or by
outcome on held-out windows ([`search_by_outcome`]). A plan is made from a request and a model (in memory, or run
layer by layer for the proxies), before anything is written."""

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import contiguous_gaps, normalize_pruned_layers

from ..choices import OUTCOMES
from ..data import TokenWindows
from ..measurement.calibration import CalibrationStatistics, calibrate
from ..measurement.hadamard import factor_hidden_size
from ..measurement.holdout import default_holdout, split_holdout
from ..requests import PruneRequest
from .patches import estimate_patch
from .search import (
    GapChoice,
    HeldOutScorer,
    LayerwiseHeldOutScorer,
    fixed_variant,
    patch_variants,
    score_gap,
    scoring_bar,
)
from .selection import candidate_scores, select_layers

logger = logging.getLogger("linearpatch")


def check_prune_arguments(request: PruneRequest, config) -> list[int] | None:
    """Check `request` against the dense model's `config` (its depth and width); return the explicit layers (sorted)
    if given. The request checked its own options when it was made.

    Raises:
        LinearPatchError: naming the bad argument and the valid choices.
    """
    total = config.num_hidden_layers
    if request.patch_kind == "hadamard":
        factor_hidden_size(config.hidden_size)  # an unsupported width fails here, not after calibration
    if request.layers is not None:
        return normalize_pruned_layers(request.layers, total)
    if request.num_layers is not None and not request.num_layers < total:
        raise LinearPatchError(f"Cannot prune {request.num_layers} of {total} layers: choose 1..{total - 1}.")
    return None


@dataclass
class PruningPlan:
    r"""
    What [`plan_pruning`] decided.

    Args:
        layers (`list[int]`): the layers to drop.
        metric (`str`): how they were chosen (`manual` for explicit layers).
        patch (`str`): the patch kind requested (`auto` included).
        patches (`list[torch.Tensor]` or `None`): one patch per gap, None for plain pruning.
        statistics (`CalibrationStatistics` or `None`): the calibration pass (on the fit windows).
        candidate_scores (`dict[int, float]`): the metric's score of every candidate (held-out perplexity for
            `loss`).
        choices (`list[GapChoice]`): per gap, the patch variant kept and every variant's held-out perplexity, when
            chosen by outcome.
        candidate_patches (`dict[int, dict[str, float]]`): for `loss`, every scored block start's variants.
        holdout (`dict`): the held-out calibration windows and the dense model's perplexity on them.
        depth_curve (`list[dict]`): for a target ratio, each depth tried with its plain, fixed-patch and chosen
            perplexity ratios.
        patch_check (`list[dict]`): for a fixed patch kind, per gap: its held-out perplexity and that of no patch
            (see [`check_against_no_patch`]).
    """

    layers: list[int]
    metric: str
    patch: str
    patches: list | None
    statistics: CalibrationStatistics | None
    candidate_scores: dict[int, float] = field(default_factory=dict)
    choices: list[GapChoice] = field(default_factory=list)
    candidate_patches: dict[int, dict[str, float]] = field(default_factory=dict)
    holdout: dict = field(default_factory=dict)
    depth_curve: list[dict] = field(default_factory=list)
    patch_check: list[dict] = field(default_factory=list)

    def check_finite(self) -> None:
        """Refuse a patch with NaN or inf entries (activations of corrupt weights), before anything is written.

        Raises:
            LinearPatchError: naming the gap.
        """
        for (start, end), patch in zip(contiguous_gaps(self.layers), self.patches or [], strict=False):
            if not torch.isfinite(patch).all():
                raise LinearPatchError(
                    f"The patch for layers {start}..{end - 1} holds NaN or inf: the dense model's activations do (its "
                    "weights are likely corrupt; download them again). Nothing was written."
                )

    @property
    def patch_kind(self) -> str:
        """The kind stored in the config: the one chosen (per gap, comma-separated when gaps differ)."""
        if not self.choices:
            return self.patch
        kinds = [choice.variant.kind for choice in self.choices]
        return kinds[0] if len(set(kinds)) == 1 else ",".join(kinds)


def patch_check_windows(request: PruneRequest, tokenizer, sizes) -> TokenWindows | None:
    """The windows a fixed patch kind is checked on against no patch ([`check_against_no_patch`]): one in eight more
    (at least one), drawn after the calibration windows from the same text with the same seed, so that the
    calibration windows (the first `sizes.num_samples` of that draw) are exactly the ones a prune without the check
    fits on. `None` where nothing is checked: no patch, a choice by outcome (which scores the identity itself), or
    calibration given as ready windows."""
    if request.patch_kind == "none" or request.chooses_by_outcome or isinstance(request.calibration, TokenWindows):
        return None
    from ..data import token_windows

    count = default_holdout(sizes.num_samples)
    drawn = token_windows(request.calibration, tokenizer, sizes.num_samples + count, sizes.seq_len, seed=request.seed)
    return dataclasses.replace(drawn, input_ids=drawn.input_ids[sizes.num_samples :])


def check_against_no_patch(model, plan: "PruningPlan", held: TokenWindows, progress: bool = False) -> list[dict]:
    """Score each gap's patch and no patch on `held` (windows no estimate saw), from the dense model's stored stream
    ([`HeldOutScorer`]); log one warning line for each gap whose patch is worse than none (a patch kind whose
    statistic does not fit the block: Gemma-3-270M's Hadamard patch at 6..11 raises perplexity 10^14-fold). The
    patch is kept: it is what was asked for; the line names `--patch auto`, which keeps none where none is better."""
    scorer = HeldOutScorer(model, held.input_ids, progress=progress)
    gaps = contiguous_gaps(plan.layers)
    scorer.prepare([start for start, _ in gaps])
    checked = []
    for (start, end), patch in zip(gaps, plan.patches, strict=True):
        patched, plain = (outcome["loss"] for outcome in scorer.measure_many(start, end, [patch, None]))
        worse = patched > plain
        checked.append(
            dict(gap=[start, end], patch=plan.patch, perplexity=patched, none_perplexity=plain, worse_than_none=worse)
        )
        if worse:
            logger.warning(
                "linearpatch: the %s patch at layers %d..%d scores worse than no patch on %d held-out windows "
                "(perplexity %.4g against %.4g): use --patch auto, which keeps no patch where none is better.",
                plan.patch,
                start,
                end - 1,
                len(held.input_ids),
                patched,
                plain,
            )
    return checked


def plan_pruning(
    model,
    windows,
    request: PruneRequest,
    explicit: list[int] | None,
    statistics: CalibrationStatistics | None = None,
    check_windows: TokenWindows | None = None,
) -> PruningPlan:
    """Calibrate (unless `statistics` are given or nothing needs them), choose the layers and estimate the patches
    that `request` asks for (`explicit`: its layers, checked by [`check_prune_arguments`]). With `check_windows`
    (from [`patch_check_windows`]) and a model in memory, a fixed patch is checked against none on them.

    `model` is a dense model in memory or a [`layerwise_model`] (then every window goes through each layer at once);
    `windows` is `TokenWindows` or a function that makes them (called only when a pass is needed). A choice by
    outcome (`metric="loss"` or `"kl"`, `patch="auto"` or a `target_ppl_ratio`) holds out the last `holdout` windows,
    fits on the others and scores candidates on them with [`HeldOutScorer`] (in memory only).
    """
    layerwise = getattr(model, "layerwise", None) is not None
    num_layers, metric, patch = request.num_layers, request.selection_metric, request.patch_kind

    def get_windows() -> TokenWindows:
        return windows() if callable(windows) else windows

    def run(windows_: TokenWindows, *args, **kwargs) -> CalibrationStatistics:
        size = len(windows_.input_ids) if layerwise else request.batch_size
        return calibrate(model, windows_, *args, batch_size=size, progress=request.progress, **kwargs)

    if request.chooses_by_outcome:
        if statistics is not None:
            raise LinearPatchError("Reused statistics may have seen the held-out windows: do not pass `statistics`.")
        return search_by_outcome(OutcomeSearch(model, get_windows(), run, request, explicit))

    resolved = None
    if statistics is None and (explicit is None or patch != "none"):
        resolved = get_windows()
        regression = [tuple(g) for g in contiguous_gaps(explicit)] if explicit and patch == "lstsq" else []
        distances = (1, num_layers) if explicit is None else (1,)
        statistics = run(resolved, distances, regression)

    if explicit is None:
        chosen = select_layers(statistics, num_layers, metric)
        scores = candidate_scores(statistics, num_layers, metric)
    else:
        chosen, scores, metric = explicit, {}, "manual"
    gaps = contiguous_gaps(chosen)

    if patch == "lstsq" and any(gap not in statistics.gram for gap in gaps):
        # The gaps were only known after selection: a second, shorter pass for their Gram matrices.
        extra = run(resolved or get_windows(), (1,), gaps, last_layer=max(e for _, e in gaps))
        statistics.gram.update(extra.gram)

    patches = None if patch == "none" else [estimate_patch(statistics, start, end, patch) for start, end in gaps]
    plan = PruningPlan(chosen, metric, patch, patches, statistics, scores)
    if patches is not None and check_windows is not None and not layerwise:
        plan.patch_check = check_against_no_patch(model, plan, check_windows, request.progress)
    return plan


# Depths whose Gram matrices (for lstsq) one extra calibration pass collects when searching for a target ratio.
_GRAM_DEPTHS = 4
# A target search stops after this many depths in a row above the target.
_PATIENCE = 2


def _ranked_starts(statistics: CalibrationStatistics, num_layers: int, candidates: int) -> list[int]:
    """Block starts for `--metric loss`, best cosine first: the top `candidates` (0: every start)."""
    scores = candidate_scores(statistics, num_layers, "cosine")
    ranked = sorted(scores, key=lambda start: (-scores[start], start))
    return ranked if candidates == 0 else ranked[:candidates]


@dataclass
class OutcomeSearch:
    r"""
    A choice by outcome to make (see [`search_by_outcome`]).

    Args:
        model: the dense model, in memory.
        windows (`TokenWindows`): the calibration windows, the held-out ones included.
        run (`callable`): `(windows, distances, gaps, last_layer=None) -> CalibrationStatistics`, the calibration pass.
        request (`PruneRequest`): what to choose (depth or target ratio, metric, patch kinds, held-out windows).
        explicit (`list[int]`, *optional*): the layers to drop, when the request names them.
    """

    model: object
    windows: TokenWindows
    run: Callable
    request: PruneRequest
    explicit: list[int] | None


def search_by_outcome(search: OutcomeSearch) -> PruningPlan:
    """Hold out windows, calibrate on the others, and choose the block (`loss`), the patch per gap (`auto`) or the
    depth (a target ratio) by the held-out perplexity of each pruned, patched candidate ([`HeldOutScorer`])."""
    started = time.perf_counter()
    model, run, explicit, request = search.model, search.run, search.explicit, search.request
    num_layers, metric, patch = request.num_layers, request.selection_metric, request.patch_kind
    target, candidates, progress = request.target_ppl_ratio, request.candidates, request.progress
    # How a block is chosen among candidates (`metric`), and a patch among variants (`score`).
    score = request.score if len(patch_variants(patch)) > 1 else "loss"
    fit, held = split_holdout(search.windows, request.holdout)
    total = model.config.num_hidden_layers
    variants = patch_variants(patch, model.config.hidden_size)
    fixed_patch = fixed_variant(model.config.hidden_size)  # what a depth curve compares against
    needs_gram = any(variant.kind == "lstsq" for variant in variants)
    explicit_gaps = contiguous_gaps(explicit) if explicit else []
    if target is not None:
        distances = tuple(range(1, total))
    else:
        distances = (1,) if explicit else (1, num_layers)
    statistics = run(fit, distances, explicit_gaps if needs_gram else [])
    # Layer by layer, every candidate of a gap runs in one pass over the layers after it.
    scorer_class = LayerwiseHeldOutScorer if getattr(model, "layerwise", None) is not None else HeldOutScorer
    scorer = scorer_class(model, held.input_ids, progress=progress, closeness="kl" in (metric, score))

    @functools.cache  # asked for by the Gram pass, the progress bar and the scoring of each depth
    def blocks_of(n: int) -> list[tuple[int, int]]:
        if metric in OUTCOMES:
            return [(start, start + n) for start in _ranked_starts(statistics, n, candidates)]
        return contiguous_gaps(select_layers(statistics, n, metric))

    def cosine_block(n: int) -> tuple[int, int]:
        start = select_layers(statistics, n, "cosine")[0]
        return start, start + n

    def collect_grams(blocks) -> None:
        missing = sorted({block for block in blocks if block not in statistics.gram})
        if missing:
            # The blocks are only known after the first pass: a second pass over the fit windows, up to the last.
            extra = run(fit, (1,), missing, last_layer=max(end for _, end in missing))
            statistics.gram.update(extra.gram)

    def plan_depth(n: int | None, bar) -> tuple[list[int], list[GapChoice], dict[int, GapChoice]]:
        if explicit:
            return explicit, [score_gap(scorer, statistics, gap, variants, bar, score) for gap in explicit_gaps], {}
        if metric not in OUTCOMES:
            layers = select_layers(statistics, n, metric)
            gaps = contiguous_gaps(layers)
            return layers, [score_gap(scorer, statistics, gap, variants, bar, score) for gap in gaps], {}
        table = {gap[0]: score_gap(scorer, statistics, gap, variants, bar, score) for gap in blocks_of(n)}
        best = min(table.values(), key=lambda choice: choice.outcome(metric))  # the first (best cosine) on a tie
        return list(range(best.start, best.end)), [best], table

    curve = []
    if target is None:
        if needs_gram:
            collect_grams(blocks_of(num_layers) if not explicit else explicit_gaps)
        starts = [s for s, _ in (explicit_gaps or blocks_of(num_layers))]
        scorer.prepare(starts)
        with scoring_bar(len(starts) * len(variants), progress) as bar:
            layers, choices, table = plan_depth(num_layers, bar)
    else:
        if metric == "block-influence":
            raise LinearPatchError(
                "--target-ppl-ratio compares one block per depth: use --metric loss, cosine or angular."
            )
        scorer.prepare(range(total))  # every start: each depth's candidates come from the same dense forward
        best, misses = None, 0
        for n in range(1, total):
            if (n - 1) % _GRAM_DEPTHS == 0:
                depths = range(n, min(n + _GRAM_DEPTHS, total))
                blocks = [block for m in depths for block in blocks_of(m)] if needs_gram else []
                blocks += [cosine_block(m) for m in depths] if fixed_patch.kind == "lstsq" else []
                collect_grams(blocks)
            with scoring_bar(len(blocks_of(n)) * len(variants) + 2, progress, f"depth {n}") as bar:
                layers, choices, table = plan_depth(n, bar)
                start, end = cosine_block(n)
                plain = scorer.perplexity(start, end, None)
                scored = table[start].scores if start in table else {}
                fixed = scored.get(fixed_patch.label) or scorer.perplexity(
                    start, end, fixed_patch.fit(statistics, start, end)
                )
                bar.update(2)
            dense = scorer.dense_perplexity
            ratio = choices[0].perplexity / dense
            curve.append(
                dict(
                    num_layers=n,
                    layers=[layers[0], layers[-1]],
                    patch=choices[0].variant.label,
                    perplexity=choices[0].perplexity,
                    ratio=ratio,
                    plain_layers=[start, end - 1],
                    plain_ratio=plain / dense,
                    fixed_patch=fixed_patch.label,
                    fixed_ratio=fixed / dense,
                )
            )
            if ratio <= target:
                best, misses = (layers, choices, table), 0
            else:
                misses += 1
                if misses >= _PATIENCE:
                    break
        if best is None:
            raise LinearPatchError(
                f"No depth keeps the held-out perplexity within {target}x the dense model's: removing one layer "
                f"already gives {curve[0]['ratio']:.2f}x. Raise --target-ppl-ratio."
            )
        layers, choices, table = best
        num_layers = len(layers)

    if explicit:
        metric, scores = "manual", {}
    elif metric in OUTCOMES:
        scores = {start: choice.outcome(metric) for start, choice in table.items()}
    else:
        scores = candidate_scores(statistics, num_layers, metric)
    # A choice among patches (auto) keeps a patch module at every gap, the identity where no patch scored best:
    # the output is the plain cut's, and `distill` can still train the patch from there.
    patches = None
    if len(variants) > 1 or any(choice.variant.kind != "none" for choice in choices):
        patches = [choice.variant.fit_matrix(statistics, choice.start, choice.end) for choice in choices]
    holdout_info = dict(
        held.describe(),
        windows=f"the last {len(held.input_ids)} of the calibration sample, never used to fit",
        dense_perplexity=scorer.dense_perplexity,
        scored_models=scorer.forwards,
        search_seconds=round(time.perf_counter() - started - statistics.seconds, 2),
    )
    if target is not None:
        holdout_info["target_ppl_ratio"] = target
    return PruningPlan(
        layers,
        metric,
        patch,
        patches,
        statistics,
        scores,
        choices,
        {start: choice.scores for start, choice in table.items()},
        holdout_info,
        curve,
    )


__all__ = [
    "OutcomeSearch",
    "PruningPlan",
    "check_against_no_patch",
    "check_prune_arguments",
    "patch_check_windows",
    "plan_pruning",
    "search_by_outcome",
]
