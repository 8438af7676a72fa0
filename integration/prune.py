"""Training-free LinearPatch end to end: calibrate, choose the layers, estimate one patch per gap, prune."""

import json
import time
from dataclasses import asdict, dataclass, field

from linearpatch.modeling import LinearPatchForCausalLM, contiguous_gaps, normalize_pruned_layers, prune_layers

from .calibration import CalibrationStatistics, calibrate
from .data import TokenWindows, token_windows
from .patches import PATCH_KINDS, estimate_patch, scale_summary
from .selection import METRICS, candidate_scores, select_layers

DEFAULT_CALIBRATION = "wikipedia-calibration"


@dataclass
class PruneReport:
    r"""
    What `prune` decided and why.

    Args:
        base_model (`str`): the dense model's identifier.
        num_dense_layers (`int`): L.
        pruned_layers (`list[int]`): removed layers (dense indices).
        gaps (`list[list[int]]`): contiguous gaps `[start, end)`, one patch each.
        metric (`str`): selection metric, or `manual` for explicit layers.
        patch (`str`): patch kind.
        candidate_scores (`dict[int, float]`): score of every candidate block start (or layer, for
            block influence); empty for explicit layers.
        scales (`list[dict]`): per-gap statistics of the channel scales, rotated and not.
        calibration (`dict`): the calibration data (source, windows, seq_len, seed, sha256, tokens/s).
        seconds (`float`): total wall time.
    """

    base_model: str
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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def prune(
    model,
    tokenizer,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    metric: str = "cosine",
    patch: str = "hadamard",
    calibration: str | TokenWindows = DEFAULT_CALIBRATION,
    num_samples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 1,
    base_model: str | None = None,
    statistics: CalibrationStatistics | None = None,
    progress: bool = True,
) -> tuple[LinearPatchForCausalLM, PruneReport]:
    r"""
    Prune a dense Llama with LinearPatch, training-free.

    Args:
        model: the dense `LlamaForCausalLM` (not modified).
        tokenizer: its tokenizer (to cut calibration windows).
        num_layers (`int`, *optional*): how many layers to drop, chosen by `metric`.
        layers (`list[int]`, *optional*): drop exactly these layers instead (then `metric` is `manual`).
        metric (`str`, *optional*, defaults to `"cosine"`): `cosine` (LLM-Streamline), `angular` (Gromov et al.)
            or `block-influence` (ShortGPT, may be non-contiguous).
        patch (`str`, *optional*, defaults to `"hadamard"`): `hadamard`, `diag`, `scalar`, `lstsq` or `none`.
        calibration (`str` or `TokenWindows`, *optional*): text source (embedded corpus, file, `datasets` name) or
            ready windows.
        num_samples (`int`, *optional*, defaults to 64), seq_len (`int`, *optional*, defaults to 512),
        seed (`int`, *optional*, defaults to 0): calibration windows (the paper uses 128 x 2048).
        batch_size (`int`, *optional*, defaults to 1): windows per calibration forward.
        base_model (`str`, *optional*): identifier recorded in the config and report.
        statistics (`CalibrationStatistics`, *optional*): reuse a previous pass on the same model and data.
        progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `tuple[LinearPatchForCausalLM, PruneReport]`
    """
    started = time.perf_counter()
    if (num_layers is None) == (layers is None):
        raise ValueError("Give exactly one of `num_layers` (chosen by the metric) or `layers` (explicit).")
    if patch not in PATCH_KINDS:
        raise ValueError(f"Unknown patch kind {patch!r}: choose one of {', '.join(PATCH_KINDS)}.")
    if layers is None and metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}: choose one of {', '.join(METRICS)}.")
    total = model.config.num_hidden_layers
    base_model = base_model or getattr(model.config, "_name_or_path", None) or "unknown"
    explicit = normalize_pruned_layers(layers, total) if layers is not None else None
    if explicit is None and not 1 <= num_layers < total:
        raise ValueError(f"Cannot prune {num_layers} of {total} layers: choose 1..{total - 1}.")

    def calibration_windows() -> TokenWindows:
        if isinstance(calibration, TokenWindows):
            return calibration
        return token_windows(calibration, tokenizer, num_samples, seq_len, seed=seed, sampling="random")

    needs_statistics = explicit is None or patch != "none"
    windows = None
    if statistics is None and needs_statistics:
        windows = calibration_windows()
        regression = [tuple(g) for g in contiguous_gaps(explicit)] if explicit and patch == "lstsq" else []
        distances = (1, num_layers) if explicit is None else (1,)
        statistics = calibrate(model, windows, distances, regression, batch_size=batch_size, progress=progress)

    if explicit is None:
        chosen = select_layers(statistics, num_layers, metric)
        scores = candidate_scores(statistics, num_layers, metric)
    else:
        chosen, scores, metric = explicit, {}, "manual"
    gaps = contiguous_gaps(chosen)

    if patch == "lstsq" and any(gap not in statistics.gram for gap in gaps):
        # The gaps were only known after selection: a second, shorter pass for their Gram matrices.
        extra = calibrate(
            model,
            windows or calibration_windows(),
            (1,),
            gaps,
            batch_size=batch_size,
            progress=progress,
            last_layer=max(e for _, e in gaps),
        )
        statistics.gram.update(extra.gram)

    metadata = dict(base_model=base_model, selection_metric=metric, patch_kind=patch)
    if patch == "none":
        pruned = prune_layers(model, chosen, add_patches=False, **metadata)
    else:
        patches = [estimate_patch(statistics, start, end, patch) for start, end in gaps]
        pruned = prune_layers(model, chosen, patches=patches, **metadata)

    calibration_info = {}
    if statistics is not None:
        calibration_info = dict(statistics.data, tokens=statistics.num_tokens, seconds=round(statistics.seconds, 2))
    report = PruneReport(
        base_model=base_model,
        num_dense_layers=total,
        pruned_layers=chosen,
        gaps=[list(gap) for gap in gaps],
        metric=metric,
        patch=patch,
        candidate_scores=scores,
        scales=[dict(gap=list(gap), **scale_summary(statistics, *gap)) for gap in gaps] if statistics else [],
        calibration=calibration_info,
        seconds=round(time.perf_counter() - started, 2),
    )
    return pruned, report


__all__ = ["DEFAULT_CALIBRATION", "PruneReport", "prune"]
