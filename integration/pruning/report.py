"""What `prune` decided and why: the report saved as `linearpatch_report.json` beside the checkpoint."""

import json
import time
from dataclasses import asdict, dataclass, field

from linearpatch.common.names import PRUNE_RECORD
from linearpatch.modeling import contiguous_gaps

from ..choices import METRIC_SCORES
from .patches import scale_summary
from .plan import PruningPlan


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
        scales (`list[dict]`): per-gap statistics of the channel scales, rotated and not, and the gap's
            massive-activation channels (scaled on their own by the Hadamard patch).
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
        plots (`bool`): whether the figures were written beside the checkpoint.
        patch_check (`list[dict]`): for a fixed patch kind, per gap: its perplexity and no patch's on held-out
            calibration windows, and whether it is worse than none (`worse_than_none`).
        dtype (`dict`): the dtype the job computed in (`compute`) and the one the weights were written in
            (`stored`: the dense model's own unless `--dtype` named one), when saved by `prune_checkpoint`.
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
    plots: bool = False
    patch_check: list[dict] = field(default_factory=list)
    dtype: dict = field(default_factory=dict)

    record = PRUNE_RECORD

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def top_candidates(self, count: int = 5) -> list[tuple[int, float]]:
        """The best candidates by the report's metric (highest cosine; lowest angular distance, influence, held-out
        perplexity or KL)."""
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
            if any(c.get("heldout_kl") is not None for c in self.patch_choices):
                kls = ", ".join(f"{c['label']} {c['heldout_kl']:.4f}" for c in self.patch_choices)
                lines.append(f"Held-out KL to the dense model (nats per token): {kls}")
        for check in self.patch_check:
            verdict = "WORSE than no patch" if check["worse_than_none"] else "better than no patch"
            lines.append(
                f"Held-out check, layers {check['gap'][0]}..{check['gap'][1] - 1}: {check['patch']} "
                f"{check['perplexity']:.4g}, no patch {check['none_perplexity']:.4g} ({verdict})"
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
        if self.output:
            plots = ", plots" if self.plots else ""
            lines.append(f"Saved to {self.output} (report: {PRUNE_RECORD}{plots})")
        return "\n".join(lines)


def plan_report(base_model: str | None, total: int, plan: PruningPlan, started: float) -> PruneReport:
    """The report of `plan` on a dense model of `total` layers, timed from `started`."""
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
        patch_check=plan.patch_check,
    )


__all__ = ["PruneReport", "plan_report"]
