"""Training-free LinearPatch end to end: calibrate, choose the layers, estimate one patch per gap, prune.

[`prune`] works on a model in memory (the Python API); [`prune_checkpoint`] is the `linearpatch prune` command: it
checks every input before the first forward pass, then runs one pipeline chosen by size ([`InMemoryPrune`] or
[`SequentialPrune`]), optionally evaluates and plots, and saves atomically. Both take a [`PruneRequest`] whole.
"""

import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import atomic_directory
from linearpatch.modeling import prune_layers

from ..data import TokenWindows, local_text_file, token_windows
from ..defaults import Sizes
from ..layerwise import choose_sequential
from ..measurement.calibration import CalibrationStatistics
from ..measurement.holdout import split_holdout
from ..requests import PruneRequest
from ..resolution import ModelRef
from ..shards import SafetensorsCheckpoint, compute_dtype, dtype_record, parse_size, stored_dtype
from .plan import PruningPlan, check_prune_arguments, patch_check_windows, plan_pruning
from .report import PruneReport, plan_report


def prune(
    model, tokenizer, statistics: CalibrationStatistics | None = None, **options
) -> tuple[PreTrainedModel, PruneReport]:
    r"""
    Prune a dense model of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text) with LinearPatch,
    training-free.

    Args:
        model: the dense causal LM (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...; not modified).
        tokenizer: its tokenizer (to cut calibration windows).
        statistics (`CalibrationStatistics`, *optional*): reuse a previous pass on the same model and data.
        options: the fields of [`PruneRequest`] (`num_layers`, `layers` or `target_ppl_ratio`; `metric`, `patch`,
            `holdout`, `candidates`, `calibration` (a text source or ready `TokenWindows`), `num_samples`,
            `seq_len`, `seed`, `batch_size`, `base_model`, `progress`), which hold every default: cosine (the
            paper's) and auto (every patch kind and none, scored on held-out windows), 32 x 512 calibration tokens
            on a CPU and 128 x 2048 on a GPU.

    Returns:
        `tuple[PreTrainedModel, PruneReport]`: the family's LinearPatch causal LM and the report.
    """
    request = PruneRequest(model=getattr(model.config, "_name_or_path", "") or "(in memory)", **options)
    return prune_model(model, tokenizer, request, statistics=statistics)


def prune_model(
    model,
    tokenizer,
    request: PruneRequest,
    windows: TokenWindows | None = None,
    statistics: CalibrationStatistics | None = None,
    check_windows: TokenWindows | None = None,
) -> tuple[PreTrainedModel, PruneReport]:
    """[`prune`] with its request made: `windows` (cut by the job) stand in for the request's calibration text, and
    `check_windows` for the windows a fixed patch is checked on against none (cut here when not given)."""
    from ..models import portable_model_id

    started = time.perf_counter()
    config = model.config
    explicit = check_prune_arguments(request, config)
    base_model = request.base_model or portable_model_id(getattr(config, "_name_or_path", None))

    sizes = Sizes.resolve("calibration", next(model.parameters()).device, request.num_samples, request.seq_len, config)

    def calibration_windows() -> TokenWindows:
        if windows is not None:
            return windows
        if isinstance(request.calibration, TokenWindows):
            return request.calibration
        return token_windows(request.calibration, tokenizer, sizes.num_samples, sizes.seq_len, seed=request.seed)

    if check_windows is None and windows is None and statistics is None:
        check_windows = patch_check_windows(request, tokenizer, sizes)
    plan = plan_pruning(model, calibration_windows, request, explicit, statistics, check_windows)
    pruned = _prune_with(model, plan, base_model)
    return pruned, plan_report(base_model, config.num_hidden_layers, plan, started)


def _prune_with(model, plan: PruningPlan, base_model: str | None) -> PreTrainedModel:
    plan.check_finite()
    metadata = dict(base_model=base_model, selection_metric=plan.metric, patch_kind=plan.patch_kind)
    return prune_layers(model, plan.layers, patches=plan.patches, add_patches=plan.patches is not None, **metadata)


def prune_checkpoint(request: PruneRequest | str, output: str | Path | None = None, **options) -> PruneReport:
    r"""
    `linearpatch prune`: load a dense model by name, prune it with LinearPatch and save the checkpoint folder
    (weights, remote-code files, tokenizer, `linearpatch_report.json`, optionally plots).

    Every input is checked before the first forward pass: the output (exists? inside an input?), the device, the
    model's family and depth, the layers, the patch kind against the hidden size, and every text source (calibration
    and evaluation corpora are tokenised up front). A model that does not fit `max_memory` (default: the device's
    free memory) is calibrated layer by layer from its safetensors shards and streamed to the output, never held
    whole ([`SequentialPrune`]).

    Args:
        request ([`PruneRequest`] or `str`): the request, or the dense model's name (then `output` and `options`,
            the request's other fields, make the request).

    Returns:
        `PruneReport` (with `output` and `evaluation` filled in).
    """
    if not isinstance(request, PruneRequest):
        request = PruneRequest(model=request, output=output, **options)
    from ..measurement.perplexity import held_out_windows
    from ..models import load_tokenizer
    from ..opening import open_job

    if request.output is None:
        raise LinearPatchError("prune_checkpoint needs an output folder (--output).")
    inputs = {"calibration text": local_text_file(request.calibration)}
    if request.eval_windows:
        inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in request.eval_corpora}
    job = open_job(request.model, "dense", request.output, request.overwrite, request.device, inputs)
    device, config = job.device, job.config
    explicit = check_prune_arguments(request, config)
    # Every shard is checked (present, complete) before anything is computed or written.
    checkpoint = SafetensorsCheckpoint(job.model_path)
    storage = stored_dtype(request.dtype, checkpoint)
    sequential = choose_sequential(
        checkpoint.nbytes(compute_dtype(request.dtype)), device, request.sequential, request.max_memory
    )
    if sequential and (request.eval_windows or request.plots):
        raise LinearPatchError(
            "--eval-windows and --plots run the dense and pruned models whole, which a sequential prune avoids: "
            "drop them and run `linearpatch eval` on the output where it fits, or prune in memory."
        )
    sizes = Sizes.resolve("calibration", device, request.num_samples, request.seq_len, config)
    tokenizer = load_tokenizer(job.model)
    windows = None
    if explicit is None or request.patch_kind != "none" or request.chooses_by_outcome:
        windows = token_windows(request.calibration, tokenizer, sizes.num_samples, sizes.seq_len, seed=request.seed)
    if request.chooses_by_outcome:
        split_holdout(windows, request.holdout)  # too few windows to hold some out fails here, before the model loads
    check_windows = None if sequential else patch_check_windows(request, tokenizer, sizes)
    evaluation_windows = {}
    if request.eval_windows:
        length = Sizes.resolve("perplexity", device, None, request.eval_seq_len, config, "--eval-seq-len").seq_len
        evaluation_windows = held_out_windows(tokenizer, request.eval_corpora, request.eval_windows, length)
    plot_windows = None
    if request.plots:
        figures = Sizes.resolve("figures", device)
        plot_windows = token_windows("wikipedia-eval", tokenizer, figures.num_samples, figures.seq_len, request.seed)

    base_model = request.base_model or job.model.origin
    if sequential:
        # The tokenizer is not needed while the layers run: its memory is returned first, and it is loaded again
        # to be saved.
        del tokenizer
        pipeline = SequentialPrune(request, job.model, checkpoint, device, storage)
    else:
        pipeline = InMemoryPrune(request, job.model, device, storage)
    report = pipeline.prune(windows, explicit, base_model, check_windows)
    if evaluation_windows:
        report.evaluation |= pipeline.compare(evaluation_windows)
    report.output, report.plots = str(job.output), request.plots
    report.dtype = dtype_record(request.dtype, storage)
    with atomic_directory(job.output, request.overwrite) as staging:
        pipeline.write(staging, report, plot_windows)
    return report


class InMemoryPrune:
    """The prune job's pipeline for a model that fits: loaded whole, pruned by [`prune_model`] (every choice by outcome
    available), compared with the dense model, saved in `storage` (the dtype written) with the figures if asked."""

    def __init__(self, request: PruneRequest, dense: ModelRef, device: str, storage: torch.dtype):
        from ..models import load_model

        self.request, self.storage = request, storage
        self.dense, self.tokenizer = load_model(dense, dtype=request.dtype, device=device, kind="dense")
        self.pruned = None

    def prune(
        self,
        windows: TokenWindows | None,
        explicit: list[int] | None,
        base_model: str | None,
        check_windows: TokenWindows | None = None,
    ) -> PruneReport:
        request = _with_base(self.request, base_model)
        self.pruned, report = prune_model(self.dense, self.tokenizer, request, windows, check_windows=check_windows)
        return report

    def compare(self, windows: dict) -> dict:
        from ..measurement.perplexity import perplexity_table

        return perplexity_table({"dense": self.dense, "pruned": self.pruned}, windows, self.request.progress)

    def write(self, staging: Path, report: PruneReport, plot_windows: TokenWindows | None) -> None:
        from ..models import write_checkpoint_files

        if plot_windows is not None:  # inside the staging folder: the checkpoint appears complete or not at all
            from ..measurement.figures import write_report_plots
            from .cuts import checkpoint_closeness

            progress = self.request.progress
            write_report_plots(
                self.dense,
                self.pruned,
                plot_windows.input_ids,
                staging,
                progress=progress,
                prune_report=report.to_dict(),
                closeness=checkpoint_closeness(self.dense, plot_windows, report.pruned_layers, progress),
            )
        # Last: the figures run the pruned model as it computed; the weights are written in the source's dtype.
        files = {report.record: report.to_json()}
        write_checkpoint_files(staging, self.pruned, self.tokenizer, files, dtype=self.storage)


def _with_base(request: PruneRequest, base_model: str | None) -> PruneRequest:
    """The request with the dense model's portable Hub id as its recorded base (the job resolves it by name)."""
    import dataclasses

    return request if base_model is None else dataclasses.replace(request, base_model=base_model)


class SequentialPrune:
    """The prune job's pipeline for a model that does not fit: calibrated with its layers loaded one at a time from
    the shards ([`layerwise_model`]), then the kept tensors and the patches streamed from the dense shards to the
    output. Choosing by outcome, comparing and plotting need the model whole and are refused before this runs."""

    def __init__(
        self,
        request: PruneRequest,
        dense: ModelRef,
        checkpoint: SafetensorsCheckpoint,
        device: str,
        storage: torch.dtype,
    ):
        self.request, self.dense, self.checkpoint, self.device = request, dense, checkpoint, device
        self.config, self.storage = dense.config, storage
        self.dtype = compute_dtype(request.dtype)
        self.plan = self.pruned_config = None

    def prune(
        self,
        windows: TokenWindows | None,
        explicit: list[int] | None,
        base_model: str | None,
        check_windows: TokenWindows | None = None,
    ) -> PruneReport:
        """Layer by layer, a fixed patch is not checked against none (`check_windows` is ignored): the check would
        read every layer once more."""
        from linearpatch.modeling import pruned_config

        from ..layerwise import layerwise_model

        # One batch is every window: each layer is loaded once and runs them all.
        started = time.perf_counter()
        folder, progress = self.checkpoint.folder, self.request.progress
        opened = layerwise_model(
            folder, self.dtype, self.device, progress=progress, max_memory=self.request.max_memory
        )
        with opened as skeleton:
            plan = plan_pruning(skeleton, windows, self.request, explicit)
        plan.check_finite()
        metadata = dict(base_model=base_model, selection_metric=plan.metric, patch_kind=plan.patch_kind)
        self.pruned_config = pruned_config(self.config, plan.layers, add_patches=plan.patches is not None, **metadata)
        self.plan = plan
        report = plan_report(base_model, self.config.num_hidden_layers, plan, started)
        report.calibration["sequential"] = True
        return report

    def compare(self, windows: dict) -> dict:
        return {}

    def write(self, staging: Path, report: PruneReport, plot_windows: TokenWindows | None) -> None:
        from ..models import generation_config_of, load_tokenizer, write_checkpoint_files
        from .streaming import write_pruned_checkpoint

        write_pruned_checkpoint(
            staging,
            self.checkpoint,
            self.pruned_config,
            self.plan.patches or [],
            dtype=self.storage,
            generation_config=generation_config_of(self.checkpoint.folder),
            max_shard_size=parse_size(self.request.max_shard_size),
            progress=self.request.progress,
        )
        write_checkpoint_files(staging, None, load_tokenizer(self.dense), {report.record: report.to_json()})


__all__ = [
    "InMemoryPrune",
    "PruneReport",
    "PruningPlan",
    "SequentialPrune",
    "prune",
    "prune_checkpoint",
    "prune_model",
]
