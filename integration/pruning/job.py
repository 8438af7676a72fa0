"""Training-free LinearPatch end to end: calibrate, choose the layers, estimate one patch per gap, prune.

`prune` works on a model in memory (the Python API); `prune_checkpoint` is the `linearpatch prune` command: it checks
every input before the first forward pass, then loads, prunes, optionally evaluates and plots, and saves atomically.
"""

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import atomic_directory
from linearpatch.common.names import PRUNE_RECORD, is_repo_id
from linearpatch.modeling import contiguous_gaps, normalize_pruned_layers, prune_layers

from ..choices import METRIC_SCORES
from ..data import TokenWindows, local_text_file, token_windows
from ..defaults import calibration_sizes, figure_sizes, perplexity_sizes
from ..layerwise import choose_sequential
from ..measurement.calibration import CalibrationStatistics, calibrate
from ..measurement.hadamard import factor_hidden_size
from ..requests import DEFAULT_CALIBRATION, PruneRequest
from ..shards import SafetensorsCheckpoint, parse_size
from .patches import PATCH_CHOICES, estimate_patch, scale_summary
from .search import (
    DEFAULT_CANDIDATES,
    GapChoice,
    HeldOutScorer,
    fixed_variant,
    patch_variants,
    score_gap,
    scoring_bar,
    split_holdout,
)
from .selection import SELECTION_METRICS, candidate_scores, select_layers


@dataclass
class PruneReport:
    r"""
    What `prune` decided and why (saved as `linearpatch_report.json` beside the checkpoint).

    Args:
        base_model (`str`): the dense model's identifier (a Hub id when one is known).
        num_dense_layers (`int`): L.
        pruned_layers (`list[int]`): removed layers (dense indices).
        gaps (`list[list[int]]`): contiguous gaps `[start, end)`, one patch each.
        metric (`str`): selection metric, or `manual` for explicit layers.
        patch (`str`): patch kind requested (`auto`: chosen per gap, see `patch_choices`).
        candidate_scores (`dict[int, float]`): score of every candidate block start (or layer, for
            block influence; held-out perplexity for `loss`); empty for explicit layers.
        scales (`list[dict]`): per-gap statistics of the channel scales, rotated and not.
        calibration (`dict`): the calibration data (source, windows, seq_len, seed, sha256, tokens/s).
        seconds (`float`): total wall time.
        evaluation (`dict`): held-out perplexity per model (`dense`, `pruned`) and corpus, when asked for.
        output (`str`): the folder the checkpoint was saved to, when saved by `prune_checkpoint`.
        patch_kind (`str`): the kind stored in the config (the chosen one for `auto`).
        patch_choices (`list[dict]`): per gap, when chosen by outcome: the variant kept and every variant's
            held-out perplexity.
        candidate_patches (`dict[int, dict]`): for `loss`, every scored block start's held-out perplexity per
            variant.
        holdout (`dict`): the held-out calibration windows (never used to fit) and the dense perplexity on them.
        depth_curve (`list[dict]`): for `target_ppl_ratio`, every depth tried: held-out perplexity ratio of the
            chosen block and patch, of plain pruning and of the fixed patch (`fixed_patch`: Hadamard, or lstsq for
            a width without one) at the cosine block.
    """

    base_model: str | None
    num_dense_layers: int
    pruned_layers: list[int]
    gaps: list[list[int]]
    metric: str
    patch: str
    candidate_scores: dict[int, float] = field(default_factory=dict)
    scales: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    evaluation: dict = field(default_factory=dict)
    output: str | None = None
    patch_kind: str | None = None
    patch_choices: list[dict] = field(default_factory=list)
    candidate_patches: dict = field(default_factory=dict)
    holdout: dict = field(default_factory=dict)
    depth_curve: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def top_candidates(self, count: int = 5) -> list[tuple[int, float]]:
        """The best candidates by the report's metric (highest cosine; lowest angular distance, influence or
        held-out perplexity)."""
        reverse = self.metric == "cosine"
        return sorted(self.candidate_scores.items(), key=lambda item: item[1], reverse=reverse)[:count]

    def summary(self) -> str:
        """What was pruned, how it was chosen, and the perplexities measured: what `linearpatch prune` prints."""
        chosen = f" -> {self.patch_kind}" if self.patch_kind != self.patch else ""
        how = f"{self.metric}, patch {self.patch}{chosen}"
        lines = [f"Pruned layers {self.pruned_layers} of {self.num_dense_layers} ({how})"]
        if self.holdout:
            lines.append(
                f"Held-out calibration perplexity (dense {self.holdout['dense_perplexity']:.2f}): "
                + ", ".join(f"{c['label']} {c['heldout_perplexity']:.2f}" for c in self.patch_choices)
            )
        for point in self.depth_curve:
            lines.append(
                f"  {point['num_layers']:>3} layers: {point['ratio']:.3f}x ({point['patch']}, layers "
                f"{point['layers'][0]}-{point['layers'][1]}); plain {point['plain_ratio']:.3f}x, "
                f"{point['fixed_patch']} {point['fixed_ratio']:.3f}x"
            )
        if self.candidate_scores:
            scores = ", ".join(f"{start}: {score:.4f}" for start, score in self.top_candidates())
            lines.append(f"Top candidates ({METRIC_SCORES[self.metric]}): {scores}")
        for name, values in self.evaluation.items():
            lines.append(f"  {name:>6} perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
        return "\n".join(lines)


def check_choice_options(
    layers: list[int] | None,
    metric: str | None,
    patch: str | None,
    target_ppl_ratio: float | None,
    holdout: int | None,
) -> None:
    """Refuse options the request would ignore: a metric for explicit layers (nothing is chosen), a held-out count
    when nothing is scored on held-out windows.

    Raises:
        LinearPatchError: naming the options and what to drop.
    """
    if layers is not None and metric is not None:
        raise LinearPatchError(
            f"--metric {metric} chooses which layers to drop, but --layers names them: drop one of the two (with "
            "--layers, --patch auto still chooses the patch by held-out perplexity)."
        )
    if holdout is not None and not chooses_by_outcome(metric, patch, target_ppl_ratio):
        raise LinearPatchError(
            "--holdout sets the windows that --metric loss, --patch auto and --target-ppl-ratio score on; without one "
            "of them nothing is held out: drop --holdout, or add one of them."
        )


def resolve_choice(metric: str | None, patch: str | None, target_ppl_ratio: float | None) -> tuple[str, str]:
    """The metric and patch to use: given ones win; otherwise `loss` and `auto` when searching for a target ratio
    (the depth is then chosen with the best block and patch), and `cosine` and `hadamard` (the paper's) when not."""
    searching = target_ppl_ratio is not None
    return metric or ("loss" if searching else "cosine"), patch or ("auto" if searching else "hadamard")


def check_prune_arguments(
    num_layers: int | None,
    layers: list[int] | None,
    metric: str,
    patch: str,
    total_layers: int,
    hidden_size: int,
    target_ppl_ratio: float | None = None,
) -> list[int] | None:
    """Validate the pruning request against a dense model of `total_layers` layers and width `hidden_size`; return
    the explicit layers (sorted) if given.

    Raises:
        LinearPatchError: naming the bad argument and the valid choices.
    """
    if sum(value is not None for value in (num_layers, layers, target_ppl_ratio)) != 1:
        raise LinearPatchError(
            "Give exactly one of `num_layers` (chosen by the metric), `layers` (explicit) or `target_ppl_ratio` "
            "(the most layers within that held-out perplexity ratio)."
        )
    if patch not in PATCH_CHOICES:
        raise LinearPatchError(f"Unknown patch kind {patch!r}: choose one of {', '.join(PATCH_CHOICES)}.")
    if layers is None and metric not in SELECTION_METRICS:
        raise LinearPatchError(f"Unknown metric {metric!r}: choose one of {', '.join(SELECTION_METRICS)}.")
    if target_ppl_ratio is not None and not target_ppl_ratio > 1.0:
        raise LinearPatchError(
            f"--target-ppl-ratio {target_ppl_ratio} is not above 1: it bounds pruned / dense perplexity, e.g. 1.5."
        )
    if patch == "hadamard":
        factor_hidden_size(hidden_size)  # an unsupported width fails here, not after calibration
    if target_ppl_ratio is not None:
        return None
    if layers is not None:
        return normalize_pruned_layers(layers, total_layers)
    if not 1 <= num_layers < total_layers:
        raise LinearPatchError(f"Cannot prune {num_layers} of {total_layers} layers: choose 1..{total_layers - 1}.")
    return None


def prune(
    model,
    tokenizer,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    metric: str | None = None,
    patch: str | None = None,
    calibration: str | TokenWindows = DEFAULT_CALIBRATION,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    base_model: str | None = None,
    statistics: CalibrationStatistics | None = None,
    progress: bool = True,
    target_ppl_ratio: float | None = None,
    holdout: int | None = None,
    candidates: int = DEFAULT_CANDIDATES,
) -> tuple[PreTrainedModel, PruneReport]:
    r"""
    Prune a dense model of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) with LinearPatch,
    training-free.

    Args:
        model: the dense causal LM (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...; not modified).
        tokenizer: its tokenizer (to cut calibration windows).
        num_layers (`int`, *optional*): how many layers to drop, chosen by `metric`.
        layers (`list[int]`, *optional*): drop exactly these layers instead (then `metric` is `manual`).
        metric (`str`, *optional*): `cosine` (LLM-Streamline, the default), `angular` (Gromov et al.),
            `block-influence` (ShortGPT, may be non-contiguous) or `loss`: the held-out perplexity of the pruned,
            patched model, for the `candidates` blocks with the best cosine.
        patch (`str`, *optional*): `hadamard` (the default), `diag`, `scalar`, `lstsq`, `none`, or `auto`: per gap,
            every kind (and lstsq with a grid of ridge values) is fitted and the best on the held-out windows kept.
        target_ppl_ratio (`float`, *optional*): instead of `num_layers`/`layers`, drop the most layers whose
            pruned model keeps held-out perplexity within this many times the dense model's (metric `loss` and
            patch `auto` unless given); the report's `depth_curve` shows every depth tried.
        holdout (`int`, *optional*): calibration windows held out for `loss`, `auto` and `target_ppl_ratio`
            (default: one in eight); they are never used to fit.
        candidates (`int`, *optional*, defaults to 4): blocks per depth that `loss` scores (0: every start).
        calibration (`str` or `TokenWindows`, *optional*): text source (embedded corpus, file, `datasets` name) or
            ready windows.
        num_samples (`int`, *optional*), seq_len (`int`, *optional*): calibration windows; default 32 x 512 on a
            CPU and the paper's 128 x 2048 on a GPU (see `linearpatch.integration.defaults`).
        seed (`int`, *optional*, defaults to 0): seed of the calibration window offsets.
        batch_size (`int`, *optional*, defaults to 1): windows per calibration forward.
        base_model (`str`, *optional*): identifier recorded in the config and report; defaults to the Hub id the
            model was loaded from, when there is one.
        statistics (`CalibrationStatistics`, *optional*): reuse a previous pass on the same model and data.
        progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `tuple[PreTrainedModel, PruneReport]`: the family's LinearPatch causal LM and the report.
    """
    from ..models import fit_context, portable_model_id

    started = time.perf_counter()
    total = model.config.num_hidden_layers
    check_choice_options(layers, metric, patch, target_ppl_ratio, holdout)
    metric, patch = resolve_choice(metric, patch, target_ppl_ratio)
    explicit = check_prune_arguments(
        num_layers, layers, metric, patch, total, model.config.hidden_size, target_ppl_ratio
    )
    base_model = base_model or portable_model_id(getattr(model.config, "_name_or_path", None))
    sizes = calibration_sizes(next(model.parameters()).device)

    def calibration_windows() -> TokenWindows:
        if isinstance(calibration, TokenWindows):
            return calibration
        return token_windows(
            calibration,
            tokenizer,
            sizes.num_samples if num_samples is None else num_samples,
            fit_context(model.config, seq_len, sizes.seq_len),
            seed=seed,
        )

    plan = plan_pruning(
        model,
        calibration_windows,
        explicit,
        num_layers,
        metric,
        patch,
        batch_size,
        statistics,
        progress,
        target_ppl_ratio=target_ppl_ratio,
        holdout=holdout,
        candidates=candidates,
    )
    plan.check_finite()
    metadata = dict(base_model=base_model, selection_metric=plan.metric, patch_kind=plan.patch_kind)
    pruned = prune_layers(model, plan.layers, patches=plan.patches, add_patches=plan.patches is not None, **metadata)
    return pruned, _report(base_model, total, plan, started)


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


def chooses_by_outcome(metric: str | None, patch: str | None, target_ppl_ratio: float | None) -> bool:
    """Does this request score pruned models on held-out windows (and so need a held-out split)?"""
    return metric == "loss" or patch == "auto" or target_ppl_ratio is not None


def plan_pruning(
    model,
    windows,
    explicit: list[int] | None,
    num_layers: int | None,
    metric: str,
    patch: str,
    batch_size: int = 1,
    statistics: CalibrationStatistics | None = None,
    progress: bool = True,
    *,
    target_ppl_ratio: float | None = None,
    holdout: int | None = None,
    candidates: int = DEFAULT_CANDIDATES,
) -> PruningPlan:
    """Calibrate (unless `statistics` are given or nothing needs them), choose the layers and estimate the patches.

    `model` is a dense model in memory or a [`layerwise_model`] (then every window goes through each layer at once);
    `windows` is `TokenWindows` or a function that makes them (called only when a pass is needed). A choice by
    outcome (`metric="loss"`, `patch="auto"` or a `target_ppl_ratio`) holds out the last `holdout` windows, fits
    on the others and scores candidates on them with [`HeldOutScorer`] (in memory only).
    """
    layerwise = getattr(model, "layerwise", None) is not None

    def get_windows() -> TokenWindows:
        return windows() if callable(windows) else windows

    def run(windows_: TokenWindows, *args, **kwargs) -> CalibrationStatistics:
        size = len(windows_.input_ids) if layerwise else batch_size
        return calibrate(model, windows_, *args, batch_size=size, progress=progress, **kwargs)

    if chooses_by_outcome(metric, patch, target_ppl_ratio):
        if layerwise:
            raise LinearPatchError(OUTCOME_NEEDS_MEMORY)
        if statistics is not None:
            raise LinearPatchError("Reused statistics may have seen the held-out windows: do not pass `statistics`.")
        return _plan_by_outcome(
            model,
            get_windows(),
            run,
            explicit,
            num_layers,
            metric,
            patch,
            target_ppl_ratio,
            holdout,
            candidates,
            progress,
        )

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
    return PruningPlan(chosen, metric, patch, patches, statistics, scores)


OUTCOME_NEEDS_MEMORY = (
    "--metric loss, --patch auto and --target-ppl-ratio score pruned models on held-out windows, which needs the "
    "dense model in memory; a sequential prune cannot: prune in memory (raise --max-memory or pass "
    "--no-sequential), or choose with --metric cosine and a fixed --patch."
)
# Depths whose Gram matrices (for lstsq) one extra calibration pass collects when searching for a target ratio.
_GRAM_DEPTHS = 4
# A target search stops after this many depths in a row above the target.
_PATIENCE = 2


def _ranked_starts(statistics: CalibrationStatistics, num_layers: int, candidates: int) -> list[int]:
    """Block starts for `--metric loss`, best cosine first: the top `candidates` (0: every start)."""
    scores = candidate_scores(statistics, num_layers, "cosine")
    ranked = sorted(scores, key=lambda start: (-scores[start], start))
    return ranked if candidates == 0 else ranked[:candidates]


def _plan_by_outcome(
    model, windows, run, explicit, num_layers, metric, patch, target, holdout, candidates, progress
) -> PruningPlan:
    started = time.perf_counter()
    fit, held = split_holdout(windows, holdout)
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
    scorer = HeldOutScorer(model, held.input_ids, progress=progress)

    @functools.cache  # asked for by the Gram pass, the progress bar and the scoring of each depth
    def blocks_of(n: int) -> list[tuple[int, int]]:
        if metric == "loss":
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
            return explicit, [score_gap(scorer, statistics, s, e, variants, bar) for s, e in explicit_gaps], {}
        if metric != "loss":
            layers = select_layers(statistics, n, metric)
            return layers, [score_gap(scorer, statistics, s, e, variants, bar) for s, e in contiguous_gaps(layers)], {}
        table = {s: score_gap(scorer, statistics, s, e, variants, bar) for s, e in blocks_of(n)}
        best = min(table.values(), key=lambda choice: choice.perplexity)  # the first (best cosine) on a tie
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
    elif metric == "loss":
        scores = {start: choice.perplexity for start, choice in table.items()}
    else:
        scores = candidate_scores(statistics, num_layers, metric)
    patches = None
    if any(choice.variant.kind != "none" for choice in choices):
        patches = [choice.variant.fit(statistics, choice.start, choice.end) for choice in choices]
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


def _report(base_model, total, plan: PruningPlan, started) -> PruneReport:
    gaps = contiguous_gaps(plan.layers)
    statistics = plan.statistics
    calibration_info = {}
    if statistics is not None:
        calibration_info = dict(statistics.data, tokens=statistics.num_tokens, seconds=round(statistics.seconds, 2))
    return PruneReport(
        base_model=base_model,
        num_dense_layers=total,
        pruned_layers=plan.layers,
        gaps=[list(gap) for gap in gaps],
        metric=plan.metric,
        patch=plan.patch,
        candidate_scores=plan.candidate_scores,
        scales=[dict(gap=list(gap), **scale_summary(statistics, *gap)) for gap in gaps] if statistics else [],
        calibration=calibration_info,
        seconds=round(time.perf_counter() - started, 2),
        patch_kind=plan.patch_kind,
        patch_choices=[choice.to_dict() for choice in plan.choices],
        candidate_patches=plan.candidate_patches,
        holdout=plan.holdout,
        depth_curve=plan.depth_curve,
    )


def prune_checkpoint(model: str, output: str | Path, **options) -> PruneReport:
    r"""
    `linearpatch prune`: load a dense model by name, prune it with LinearPatch and save the checkpoint folder
    (weights, remote-code files, tokenizer, `linearpatch_report.json`, optionally plots).

    Every input is checked before the first forward pass: the output (exists? inside an input?), the device, the
    model's family and depth, the layers, the patch kind against the hidden size, and every text source (calibration
    and evaluation corpora are tokenised up front).

    Args:
        model (`str`): `smollm2-135m`, a folder or a Hub id of a dense model.
        output (`str` or `Path`): the checkpoint folder to create.
        eval_windows (`int`, *optional*, defaults to 0): also measure held-out perplexity of the dense and pruned
            models on this many windows of each of `eval_corpora`.
        plots (`bool`, *optional*, defaults to `False`): also write the figures of [`write_report_plots`].
        sequential (`bool`, *optional*): calibrate layer by layer from the safetensors shards and stream the pruned
            weights to the output, never holding the whole model ([`layerwise_model`]). By default this is chosen
            when the model does not fit `max_memory` (and the choice is logged).
        max_memory (`str` or `int`, *optional*): memory the model may take on the device, e.g. `200MB` or `80GB`;
            defaults to the device's free memory.
        max_shard_size (`str` or `int`, *optional*, defaults to `"5GB"`): weights shard size of a sequential
            output (more than one shard gets a `model.safetensors.index.json`).
        Other keywords: the fields of [`PruneRequest`], which hold every default (the CLI's included).

    Returns:
        `PruneReport` (with `output` and `evaluation` filled in).
    """
    return _prune_checkpoint_job(**PruneRequest(model=model, output=output, **options).options())


def _prune_checkpoint_job(
    *,
    model,
    output,
    num_layers,
    layers,
    metric,
    patch,
    calibration,
    num_samples,
    seq_len,
    seed,
    batch_size,
    dtype,
    device,
    base_model,
    eval_windows,
    eval_seq_len,
    eval_corpora,
    plots,
    overwrite,
    progress,
    sequential,
    max_memory,
    max_shard_size,
    target_ppl_ratio,
    holdout,
    candidates,
) -> PruneReport:
    """The job of [`prune_checkpoint`]: the fields of [`PruneRequest`] as keywords, without defaults."""
    from ..measurement.perplexity import held_out_windows
    from ..models import fit_context, load_tokenizer, portable_model_id
    from ..opening import open_job

    check_choice_options(layers, metric, patch, target_ppl_ratio, holdout)
    if base_model is not None and not is_repo_id(base_model):
        raise LinearPatchError(
            f"--base-model {base_model!r} is not a Hub repo id (org/name): it is recorded so that another machine "
            "can find the dense model."
        )
    inputs = {"calibration text": local_text_file(calibration)}
    inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in eval_corpora if eval_windows}
    job = open_job(model, "dense", output, overwrite, device, inputs)
    output, device, config = job.output, job.device, job.config
    metric, patch = resolve_choice(metric, patch, target_ppl_ratio)
    explicit = check_prune_arguments(
        num_layers, layers, metric, patch, config.num_hidden_layers, config.hidden_size, target_ppl_ratio
    )
    # Every shard is checked (present, complete) before anything is computed or written.
    checkpoint = SafetensorsCheckpoint(job.model_path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    sequential = choose_sequential(checkpoint.nbytes(torch_dtype), device, sequential, max_memory)
    if sequential and chooses_by_outcome(metric, patch, target_ppl_ratio):
        raise LinearPatchError(OUTCOME_NEEDS_MEMORY)
    if sequential and (eval_windows or plots):
        raise LinearPatchError(
            "--eval-windows and --plots run the dense and pruned models whole, which a sequential prune avoids: "
            "drop them and run `linearpatch eval` on the output where it fits, or prune in memory."
        )
    sizes = calibration_sizes(device)
    num_samples = sizes.num_samples if num_samples is None else num_samples
    seq_len = fit_context(config, seq_len, sizes.seq_len)
    if eval_windows:
        eval_seq_len = fit_context(config, eval_seq_len, perplexity_sizes(device).seq_len, "--eval-seq-len")
    tokenizer = load_tokenizer(model)
    needs_calibration = explicit is None or patch != "none" or chooses_by_outcome(metric, patch, target_ppl_ratio)
    windows = token_windows(calibration, tokenizer, num_samples, seq_len, seed=seed) if needs_calibration else None
    if chooses_by_outcome(metric, patch, target_ppl_ratio):
        split_holdout(windows, holdout)  # too few windows to hold some out fails here, before the model loads
    evaluation_windows = held_out_windows(tokenizer, eval_corpora, eval_windows, eval_seq_len) if eval_windows else {}
    figures = figure_sizes(device)
    plot_windows = None
    if plots:
        plot_windows = token_windows("wikipedia-eval", tokenizer, figures.num_samples, figures.seq_len, seed=seed)

    base_model = base_model or portable_model_id(model)
    if sequential:
        # The tokenizer is not needed while the layers run: its memory is returned first, and it is loaded again
        # to be saved.
        del tokenizer
        pipeline = SequentialPrune(
            checkpoint, config, lambda: load_tokenizer(model), torch_dtype, device, parse_size(max_shard_size)
        )
    else:
        pipeline = InMemoryPrune(model, dtype, device)
    report = pipeline.prune(
        windows if windows is not None else calibration,
        explicit,
        num_layers,
        metric,
        patch,
        base_model,
        progress,
        seed=seed,
        batch_size=batch_size,
        target_ppl_ratio=target_ppl_ratio,
        holdout=holdout,
        candidates=candidates,
    )
    if evaluation_windows:
        report.evaluation |= pipeline.compare(evaluation_windows, progress)
    report.output = str(output)
    with atomic_directory(output, overwrite) as staging:
        pipeline.write(staging, {PRUNE_RECORD: report.to_json()}, plot_windows, report, progress)
    return report


class InMemoryPrune:
    """The prune job's pipeline for a model that fits: loaded whole, pruned by [`prune`] (every choice by outcome
    available), compared with the dense model, saved with the figures if asked."""

    def __init__(self, model: str, dtype: str, device: str):
        from ..models import load_model

        self.dense, self.tokenizer = load_model(model, dtype=dtype, device=device, kind="dense")
        self.pruned = None

    def prune(self, calibration, explicit, num_layers, metric, patch, base_model, progress, **choice) -> PruneReport:
        self.pruned, report = prune(
            self.dense,
            self.tokenizer,
            num_layers=num_layers,
            layers=explicit,
            metric=None if explicit is not None else metric,  # explicit layers are chosen by nothing
            patch=patch,
            calibration=calibration,
            base_model=base_model,
            progress=progress,
            **choice,
        )
        return report

    def compare(self, windows: dict, progress: bool) -> dict:
        from ..measurement.perplexity import perplexity_table

        return perplexity_table({"dense": self.dense, "pruned": self.pruned}, windows, progress)

    def write(self, staging: Path, records: dict[str, str], plot_windows, report: PruneReport, progress: bool) -> None:
        from ..models import write_checkpoint_files

        write_checkpoint_files(staging, self.pruned, self.tokenizer, records)
        if plot_windows is not None:  # inside the staging folder: the checkpoint appears complete or not at all
            from ..evaluation.figures import write_report_plots

            write_report_plots(
                self.dense,
                self.pruned,
                plot_windows.input_ids,
                staging,
                progress=progress,
                prune_report=report.to_dict(),
            )


class SequentialPrune:
    """The prune job's pipeline for a model that does not fit: calibrated with its layers loaded one at a time from
    the shards ([`layerwise_model`]), then the kept tensors and the patches streamed from the dense shards to the
    output. Choosing by outcome, comparing and plotting need the model whole and are refused before this runs."""

    def __init__(self, checkpoint, config, load_tokenizer, dtype, device: str, max_shard_size: int):
        self.checkpoint, self.config, self.load_tokenizer = checkpoint, config, load_tokenizer
        self.dtype, self.device, self.max_shard_size = dtype, device, max_shard_size
        self.plan = self.pruned_config = None

    def prune(self, windows, explicit, num_layers, metric, patch, base_model, progress, **choice) -> PruneReport:
        from linearpatch.modeling import pruned_config

        from ..layerwise import layerwise_model

        # `choice` (batch size, choosing by outcome) is the in-memory pipeline's: the windows are already cut, one
        # batch is every window, and choosing by outcome was refused for a sequential prune.
        started = time.perf_counter()
        folder, dtype, device = self.checkpoint.folder, self.dtype, self.device
        with layerwise_model(folder, dtype=dtype, device=device, progress=progress) as skeleton:
            plan = plan_pruning(skeleton, windows, explicit, num_layers, metric, patch, progress=progress)
        plan.check_finite()
        metadata = dict(base_model=base_model, selection_metric=plan.metric, patch_kind=plan.patch_kind)
        self.pruned_config = pruned_config(self.config, plan.layers, add_patches=plan.patches is not None, **metadata)
        self.plan = plan
        report = _report(base_model, self.config.num_hidden_layers, plan, started)
        report.calibration["sequential"] = True
        return report

    def compare(self, windows: dict, progress: bool) -> dict:
        return {}

    def write(self, staging: Path, records: dict[str, str], plot_windows, report: PruneReport, progress: bool) -> None:
        from transformers import GenerationConfig

        from ..models import write_checkpoint_files
        from .streaming import write_pruned_checkpoint

        try:
            generation_config = GenerationConfig.from_pretrained(self.checkpoint.folder)
        except OSError:
            generation_config = None
        write_pruned_checkpoint(
            staging,
            self.checkpoint,
            self.pruned_config,
            self.plan.patches or [],
            self.config.num_hidden_layers,
            dtype=self.dtype,
            generation_config=generation_config,
            max_shard_size=self.max_shard_size,
            progress=progress,
        )
        write_checkpoint_files(staging, None, self.load_tokenizer(), records)


__all__ = [
    "DEFAULT_CALIBRATION",
    "InMemoryPrune",
    "PruneReport",
    "PruningPlan",
    "SequentialPrune",
    "check_choice_options",
    "check_prune_arguments",
    "choose_sequential",
    "chooses_by_outcome",
    "plan_pruning",
    "prune",
    "prune_checkpoint",
]
