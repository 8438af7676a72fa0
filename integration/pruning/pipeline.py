"""Training-free LinearPatch end to end: calibrate, choose the layers, estimate one patch per gap, prune.

`prune` works on a model in memory (the Python API); `prune_checkpoint` is the `linearpatch prune` command: it checks
every input before the first forward pass, then loads, prunes, optionally evaluates and plots, and saves atomically.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import atomic_directory, check_output, refuse_overlap
from linearpatch.modeling import contiguous_gaps, normalize_pruned_layers, prune_layers

from ..data import TokenWindows, token_windows
from ..defaults import calibration_sizes, figure_sizes, perplexity_sizes
from ..layerwise import choose_sequential
from ..shards import SafetensorsCheckpoint, parse_size
from .calibration import CalibrationStatistics, calibrate
from .hadamard import factor_hidden_size
from .patches import PATCH_KINDS, estimate_patch, scale_summary
from .selection import METRICS, candidate_scores, select_layers

DEFAULT_CALIBRATION = "wikipedia-calibration"
DEFAULT_EVAL_CORPORA = ("wikipedia-eval", "lee-news")


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
        patch (`str`): patch kind.
        candidate_scores (`dict[int, float]`): score of every candidate block start (or layer, for
            block influence); empty for explicit layers.
        scales (`list[dict]`): per-gap statistics of the channel scales, rotated and not.
        calibration (`dict`): the calibration data (source, windows, seq_len, seed, sha256, tokens/s).
        seconds (`float`): total wall time.
        evaluation (`dict`): held-out perplexity per model (`dense`, `pruned`) and corpus, when asked for.
        output (`str`): the folder the checkpoint was saved to, when saved by `prune_checkpoint`.
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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def top_candidates(self, count: int = 5) -> list[tuple[int, float]]:
        """The best candidates by the report's metric (highest cosine, lowest angular distance or influence)."""
        reverse = self.metric == "cosine"
        return sorted(self.candidate_scores.items(), key=lambda item: item[1], reverse=reverse)[:count]


def check_prune_arguments(
    num_layers: int | None,
    layers: list[int] | None,
    metric: str,
    patch: str,
    total_layers: int,
    hidden_size: int,
) -> list[int] | None:
    """Validate the pruning request against a dense model of `total_layers` layers and width `hidden_size`; return
    the explicit layers (sorted) if given.

    Raises:
        LinearPatchError: naming the bad argument and the valid choices.
    """
    if (num_layers is None) == (layers is None):
        raise LinearPatchError("Give exactly one of `num_layers` (chosen by the metric) or `layers` (explicit).")
    if patch not in PATCH_KINDS:
        raise LinearPatchError(f"Unknown patch kind {patch!r}: choose one of {', '.join(PATCH_KINDS)}.")
    if layers is None and metric not in METRICS:
        raise LinearPatchError(f"Unknown metric {metric!r}: choose one of {', '.join(METRICS)}.")
    if patch == "hadamard":
        factor_hidden_size(hidden_size)  # an unsupported width fails here, not after calibration
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
    metric: str = "cosine",
    patch: str = "hadamard",
    calibration: str | TokenWindows = DEFAULT_CALIBRATION,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    base_model: str | None = None,
    statistics: CalibrationStatistics | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PruneReport]:
    r"""
    Prune a dense model of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) with LinearPatch,
    training-free.

    Args:
        model: the dense causal LM (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...; not modified).
        tokenizer: its tokenizer (to cut calibration windows).
        num_layers (`int`, *optional*): how many layers to drop, chosen by `metric`.
        layers (`list[int]`, *optional*): drop exactly these layers instead (then `metric` is `manual`).
        metric (`str`, *optional*, defaults to `"cosine"`): `cosine` (LLM-Streamline), `angular` (Gromov et al.)
            or `block-influence` (ShortGPT, may be non-contiguous).
        patch (`str`, *optional*, defaults to `"hadamard"`): `hadamard`, `diag`, `scalar`, `lstsq` or `none`.
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
    from ..models import portable_model_id

    started = time.perf_counter()
    total = model.config.num_hidden_layers
    explicit = check_prune_arguments(num_layers, layers, metric, patch, total, model.config.hidden_size)
    base_model = base_model or portable_model_id(getattr(model.config, "_name_or_path", None))
    sizes = calibration_sizes(next(model.parameters()).device)

    def calibration_windows() -> TokenWindows:
        if isinstance(calibration, TokenWindows):
            return calibration
        return token_windows(
            calibration,
            tokenizer,
            sizes.num_samples if num_samples is None else num_samples,
            sizes.seq_len if seq_len is None else seq_len,
            seed=seed,
        )

    chosen, scores, metric, patches, statistics = plan_pruning(
        model, calibration_windows, explicit, num_layers, metric, patch, batch_size, statistics, progress
    )
    metadata = dict(base_model=base_model, selection_metric=metric, patch_kind=patch)
    pruned = prune_layers(model, chosen, patches=patches, add_patches=patch != "none", **metadata)
    report = _report(base_model, total, chosen, metric, patch, scores, statistics, started)
    return pruned, report


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
) -> tuple[list[int], dict[int, float], str, list | None, CalibrationStatistics | None]:
    """Calibrate (unless `statistics` are given or nothing needs them), choose the layers and estimate the patches.

    `model` is a dense model in memory or a [`layerwise_model`] (then every window goes through each layer at once);
    `windows` is `TokenWindows` or a function that makes them (called only when a pass is needed).

    Returns:
        `(chosen layers, candidate scores, metric, patches or None for plain pruning, statistics)`.
    """
    layerwise = getattr(model, "layerwise", None) is not None

    def get_windows() -> TokenWindows:
        return windows() if callable(windows) else windows

    def run(windows_: TokenWindows, *args, **kwargs) -> CalibrationStatistics:
        size = len(windows_.input_ids) if layerwise else batch_size
        return calibrate(model, windows_, *args, batch_size=size, progress=progress, **kwargs)

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
    return chosen, scores, metric, patches, statistics


def _report(base_model, total, chosen, metric, patch, scores, statistics, started) -> PruneReport:
    gaps = contiguous_gaps(chosen)
    calibration_info = {}
    if statistics is not None:
        calibration_info = dict(statistics.data, tokens=statistics.num_tokens, seconds=round(statistics.seconds, 2))
    return PruneReport(
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


def prune_checkpoint(
    model: str,
    output: str | Path,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    metric: str = "cosine",
    patch: str = "hadamard",
    calibration: str = DEFAULT_CALIBRATION,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    dtype: str = "float32",
    device: str | None = None,
    base_model: str | None = None,
    eval_windows: int = 0,
    eval_seq_len: int | None = None,
    eval_corpora: list[str] | tuple[str, ...] = DEFAULT_EVAL_CORPORA,
    plots: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    sequential: bool | None = None,
    max_memory: str | int | None = None,
    max_shard_size: str | int = "5GB",
) -> PruneReport:
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
        Other arguments: as for [`prune`] and [`load_model`].

    Returns:
        `PruneReport` (with `output` and `evaluation` filled in).
    """
    from ..evaluation.perplexity import chunked_perplexity
    from ..models import (
        load_config,
        load_model,
        load_tokenizer,
        portable_model_id,
        resolve_device,
        resolve_model,
        write_checkpoint_files,
    )

    output = Path(output)
    check_output(output, overwrite)
    device = resolve_device(device)
    config = load_config(model, kind="dense")
    refuse_overlap(output, {"dense model": resolve_model(model)})
    explicit = check_prune_arguments(num_layers, layers, metric, patch, config.num_hidden_layers, config.hidden_size)
    # Every shard is checked (present, complete) before anything is computed or written.
    checkpoint = SafetensorsCheckpoint(resolve_model(model))
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    sequential = choose_sequential(checkpoint.nbytes(torch_dtype), device, sequential, max_memory)
    if sequential and (eval_windows or plots):
        raise LinearPatchError(
            "--eval-windows and --plots run the dense and pruned models whole, which a sequential prune avoids: "
            "drop them and run `linearpatch eval` on the output where it fits, or prune in memory."
        )
    sizes = calibration_sizes(device)
    num_samples = sizes.num_samples if num_samples is None else num_samples
    seq_len = sizes.seq_len if seq_len is None else seq_len
    tokenizer = load_tokenizer(model)
    needs_calibration = explicit is None or patch != "none"
    windows = token_windows(calibration, tokenizer, num_samples, seq_len, seed=seed) if needs_calibration else None
    eval_seq_len = perplexity_sizes(device).seq_len if eval_seq_len is None else eval_seq_len
    evaluation_windows = {}
    if eval_windows:
        evaluation_windows = {
            corpus: token_windows(corpus, tokenizer, eval_windows, eval_seq_len, sampling="chunked")
            for corpus in eval_corpora
        }
    figures = figure_sizes(device)
    plot_windows = None
    if plots:
        plot_windows = token_windows("wikipedia-eval", tokenizer, figures.num_samples, figures.seq_len, seed=seed)

    if sequential:
        # The tokenizer is not needed while the layers run: its memory is returned first, and it is loaded again
        # to be saved.
        del tokenizer
        return _prune_sequentially(
            checkpoint,
            config,
            lambda: load_tokenizer(model),
            output,
            explicit,
            num_layers,
            metric,
            patch,
            windows,
            base_model or portable_model_id(model),
            torch_dtype,
            device,
            parse_size(max_shard_size),
            overwrite,
            progress,
        )

    dense, tokenizer = load_model(model, dtype=dtype, device=device, kind="dense")
    pruned, report = prune(
        dense,
        tokenizer,
        num_layers=num_layers,
        layers=explicit,
        metric=metric,
        patch=patch,
        calibration=windows if windows is not None else calibration,
        seed=seed,
        batch_size=batch_size,
        base_model=base_model or portable_model_id(model),
        progress=progress,
    )
    for name, candidate in (("dense", dense), ("pruned", pruned)):
        if evaluation_windows:
            report.evaluation[name] = {
                corpus: chunked_perplexity(candidate, windows_, progress=progress)
                for corpus, windows_ in evaluation_windows.items()
            }
    report.output = str(output)
    with atomic_directory(output, overwrite) as staging:
        write_checkpoint_files(staging, pruned, tokenizer, {"linearpatch_report.json": report.to_json()})
        if plot_windows is not None:  # inside the staging folder: the checkpoint appears complete or not at all
            from ..evaluation.figures import write_report_plots

            write_report_plots(dense, pruned, plot_windows.input_ids, staging, progress=progress)
    return report


def _prune_sequentially(
    checkpoint,
    config,
    load_tokenizer,
    output,
    explicit,
    num_layers,
    metric,
    patch,
    windows,
    base_model,
    dtype,
    device,
    max_shard_size,
    overwrite,
    progress,
) -> PruneReport:
    """The sequential `linearpatch prune`: calibrate with the model's layers loaded one at a time, then stream the
    kept tensors and the patches from the dense shards to the output."""
    from transformers import GenerationConfig

    from linearpatch.modeling import pruned_config

    from ..layerwise import layerwise_model
    from ..models import write_checkpoint_files
    from .streaming import write_pruned_checkpoint

    started = time.perf_counter()
    with layerwise_model(checkpoint.folder, dtype=dtype, device=device, progress=progress) as skeleton:
        chosen, scores, metric, patches, statistics = plan_pruning(
            skeleton, windows, explicit, num_layers, metric, patch, progress=progress
        )
    metadata = dict(base_model=base_model, selection_metric=metric, patch_kind=patch)
    pruned = pruned_config(config, chosen, add_patches=patch != "none", **metadata)
    try:
        generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
    except OSError:
        generation_config = None
    report = _report(base_model, config.num_hidden_layers, chosen, metric, patch, scores, statistics, started)
    report.output = str(output)
    report.calibration["sequential"] = True
    with atomic_directory(output, overwrite) as staging:
        write_pruned_checkpoint(
            staging,
            checkpoint,
            pruned,
            patches or [],
            config.num_hidden_layers,
            dtype=dtype,
            generation_config=generation_config,
            max_shard_size=max_shard_size,
            progress=progress,
        )
        write_checkpoint_files(staging, None, load_tokenizer(), {"linearpatch_report.json": report.to_json()})
    return report


__all__ = [
    "DEFAULT_CALIBRATION",
    "PruneReport",
    "check_prune_arguments",
    "choose_sequential",
    "plan_pruning",
    "prune",
    "prune_checkpoint",
]
