"""`linearpatch export`: one job that opens the checkpoint, chooses its pipeline by size ([`InMemoryExport`] or
[`SequentialExport`]), plans the folds ([`plan_model_folds`]), compares the export with the patched model and plain
pruning, and writes the stock folder atomically."""

import logging
import time
from pathlib import Path

import torch

from linearpatch.common.errors import LinearPatchError, first_line
from linearpatch.common.files import atomic_directory
from linearpatch.modeling import family_of

from ..choices import DENSE_OBJECTIVES
from ..data import local_text_file, token_windows
from ..defaults import Sizes
from ..layerwise import choose_sequential
from ..measurement.holdout import split_fit_heldout
from ..requests import ExportRequest
from ..resolution import ModelRef
from ..shards import SafetensorsCheckpoint, compute_dtype, dtype_record, parse_size, stored_dtype
from .gguf import export_gguf, plan_gguf, prune_calibration
from .plan import FoldPlan, fold_models, plan_model_folds
from .report import ExportReport
from .stock import apply_folds, plain_model, stock_config, stock_model

logger = logging.getLogger("linearpatch")


def export_checkpoint(request: ExportRequest | str, output: str | Path | None = None, **options) -> ExportReport:
    r"""
    `linearpatch export`: write a folder of the family's stock architecture (`model_type: llama`, `qwen3`, ...; no
    `auto_map`, no remote code) that any engine loads, with the patches folded into the weights, and measure what
    the fold costs.

    A checkpoint that does not fit `max_memory` (default: the device's free memory) is never held whole: the fit
    runs the layers one at a time from the shards, and the folded tensors are streamed to the output in shards of
    `max_shard_size` (with an index); the held-out comparison, which needs whole models, is then skipped (logged).

    Args:
        request ([`ExportRequest`] or `str`): the request, or the checkpoint's name (then `output` and `options`, the
            request's other fields, make the request: `fold` defaults to `auto`, each objective fitted and the best
            on held-out calibration windows kept).

    Returns:
        `ExportReport`
    """
    if not isinstance(request, ExportRequest):
        request = ExportRequest(checkpoint=request, output=output, **options)
    from ..measurement.perplexity import held_out_windows
    from ..models import load_tokenizer
    from ..opening import open_job

    started = time.perf_counter()
    fold = request.fold
    inputs = {"calibration text": local_text_file(request.calibration)}
    if request.eval_windows != 0:
        inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in request.eval_corpora}
    job = open_job(request.checkpoint, "checkpoint", request.output, request.overwrite, request.device, inputs)
    device, config = job.device, job.config
    # Refused before any work: a family or pattern llama.cpp cannot run.
    gguf_plan = plan_gguf(config, request.gguf, request.imatrix)
    needs_fit = fold != "scalar" and any(p > 0 for p in config.patch_positions)
    dense_model = resolve_dense(config, request.dense, fold) if needs_fit else None
    if request.score != "loss" and (fold != "auto" or dense_model is None):
        raise LinearPatchError(
            f"--score {request.score} ranks --fold auto's candidates by their KL to the dense model: use --fold auto "
            "with the dense model (--dense MODEL, or a checkpoint whose base_model can be opened)."
        )
    tokenizer = load_tokenizer(job.model)
    windows = None

    def calibration_windows():
        sizes = Sizes.resolve("calibration", device, request.num_samples, request.seq_len, config)
        return token_windows(request.calibration, tokenizer, sizes.num_samples, sizes.seq_len, seed=request.seed)

    if needs_fit:
        windows = calibration_windows()
        if fold == "auto" and dense_model is not None:
            split_fit_heldout(windows.input_ids)  # refuse too few windows before any model is loaded
    weights = SafetensorsCheckpoint(job.model_path)
    storage = stored_dtype(request.dtype, weights)
    compute = compute_dtype(request.dtype)
    sequential = choose_sequential(
        weights.nbytes(compute), device, request.sequential, request.max_memory, "checkpoint"
    )
    evaluation = {}
    held_out = Sizes.resolve("perplexity", device, request.eval_windows, None, config)
    if held_out.num_samples and not sequential:
        evaluation = held_out_windows(tokenizer, request.eval_corpora, held_out.num_samples, held_out.seq_len)
    pipeline = (
        SequentialExport(request, weights, config, device, storage)
        if sequential
        else InMemoryExport(request, job.model, device, storage)
    )
    described = pipeline.fold(windows, dense_model)
    report = ExportReport(
        source=job.model.origin,
        fold=fold,
        base_model=config.base_model,
        pruned_layers=list(config.pruned_layers),
        patch_positions=list(config.patch_positions),
        folds=described,
        perplexity=pipeline.compare(evaluation),
        calibration=windows.describe() if windows is not None else {},
        architecture=family_of(config).dense_causal_lm_class.__name__,
        output=str(job.output),
        num_layers=config.num_hidden_layers,
        dense=dense_model,
        dtype=dtype_record(request.dtype, storage),
    )
    with atomic_directory(job.output, request.overwrite) as staging:
        pipeline.write(staging, tokenizer, {report.record: report.to_json()})
        if gguf_plan is not None:
            measured = (request.eval_corpora, held_out) if evaluation else None
            stock = pipeline.stock if evaluation else None
            matrix_windows = None
            if gguf_plan.imatrix_types:  # the windows `prune` calibrated on, else this export's calibration text
                matrix_windows = prune_calibration(job.model.path, tokenizer, lambda: windows or calibration_windows())
            report.gguf = export_gguf(
                staging, job.output.name, gguf_plan, tokenizer, measured, stock, imatrix_windows=matrix_windows
            )
        report.seconds = round(time.perf_counter() - started, 2)
        (staging / report.record).write_text(report.to_json())
    return report


def resolve_dense(config, dense: str | None, fold: str) -> str | None:
    """The dense model for the dense fold objectives: `dense`, else the one the checkpoint was pruned from
    (`base_model`). `None` for a fold that needs none, and for `auto` when the default cannot be found (logged: the
    dense objectives are then left out of the comparison).

    Raises:
        LinearPatchError: when a given `dense`, or the default that a dense objective needs, cannot be found or is
            not the checkpoint's base.
    """
    from ..models import check_same_base, embedded_name_for, open_model

    if fold != "auto" and fold not in DENSE_OBJECTIVES:
        return None
    name = dense or embedded_name_for(config.base_model)
    try:
        if not name:
            raise LinearPatchError("the checkpoint records no base_model")
        opened = open_model(name, kind="dense", check_files=False)
    except (LinearPatchError, OSError) as error:
        if dense is None and fold == "auto":
            logger.warning(
                "linearpatch: --fold auto: the dense model %s cannot be opened (%s), so only the folds that need none "
                "are compared; pass --dense MODEL to add the dense objectives (usually much better).",
                name,
                first_line(error),
            )
            return None
        raise LinearPatchError(
            f"--fold {fold} fits the fold to the dense model's stream, but {name or 'the dense model'} cannot be "
            f"opened ({first_line(error)}): pass --dense with the model the checkpoint was pruned from."
        ) from error
    check_same_base(config, opened.config, name, "dense model")
    return opened.path


class InMemoryExport:
    """The export job's pipeline for a checkpoint that fits: loaded whole, folded into a stock model by its
    [`FoldPlan`], compared side by side with the patched model and plain pruning, saved in `storage` (the dtype
    written; the GGUF files are measured against the model as written)."""

    def __init__(self, request: ExportRequest, checkpoint: ModelRef, device: str, storage: torch.dtype):
        from ..models import load_model

        self.request, self.device, self.storage = request, device, storage
        self.dtype = compute_dtype(request.dtype)
        self.patched, _ = load_model(checkpoint, dtype=self.dtype, device=device, kind="checkpoint")
        self.stock: torch.nn.Module | None = None
        self.plan: FoldPlan | None = None

    def fold(self, windows, dense: str | None = None) -> list[dict]:
        """Fold every patch; `dense` (a model path) is loaded whole while the fold is planned, then released."""
        import contextlib

        from ..models import load_model

        input_ids = windows.input_ids if windows is not None else None
        with contextlib.ExitStack() as stack:
            dense_model = None
            if dense is not None:
                dense_model, _ = load_model(dense, dtype=self.dtype, device=self.device, kind="dense")
                stack.callback(dense_model.to, "meta")  # free its memory as soon as the fold is planned
            self.plan = plan_model_folds(
                self.patched, self.request.fold, input_ids, dense_model, score=self.request.score
            )
        self.stock = self.plan.stock(self.patched)
        return self.plan.described

    def compare(self, evaluation: dict) -> dict:
        """Held-out perplexity of the patched model, the export and plain pruning (the patched weights, no patch)."""
        from ..measurement.perplexity import perplexity_table

        if not evaluation:
            return {}
        models = {"patched": self.patched, "export": self.stock, "plain": plain_model(self.patched)}
        return perplexity_table(models, evaluation, self.request.progress)

    def write(self, staging: Path, tokenizer, records: dict[str, str]) -> None:
        from ..models import write_checkpoint_files

        write_checkpoint_files(staging, self.stock, tokenizer, records, dtype=self.storage)


class SequentialExport:
    """The export job's pipeline for a checkpoint that does not fit: never held whole. The fold is planned from the
    patches (and, for the map folds, from layer-by-layer passes of the checkpoint and the dense model), then every
    tensor is read, folded and written in turn, in shards of `max_shard_size`. The held-out comparison, which needs
    whole models, is skipped."""

    def __init__(
        self, request: ExportRequest, checkpoint: SafetensorsCheckpoint, config, device: str, storage: torch.dtype
    ):
        logger.warning(
            "linearpatch: sequential export: the held-out comparison of patched, export and plain pruning needs whole "
            "models and is skipped; `linearpatch eval OUTPUT CHECKPOINT --baseline DENSE --tasks --max-memory ...` "
            "compares them layer by layer."
        )
        self.request, self.checkpoint, self.config, self.device = request, checkpoint, config, device
        self.pending, self.stock, self.plan = [], None, None
        self.dtype, self.storage = compute_dtype(request.dtype), storage

    def fold(self, windows, dense: str | None = None) -> list[dict]:
        checkpoint, config = self.checkpoint, self.config
        input_ids = windows.input_ids if windows is not None else None
        request = self.request
        opened = fold_models(
            checkpoint.folder, dense, self.device, True, request.progress, self.dtype, request.max_memory
        )
        with opened as (model, dense_model):
            plan = self.plan = plan_model_folds(
                model, self.request.fold, input_ids, dense_model, score=self.request.score
            )
        transforms = plan.transforms()
        untie = plan.unties()
        stock = stock_config(config, untie)
        stock.dtype = self.storage
        with torch.device("meta"):
            expected = stock_model(stock).state_dict().keys()
        sources = {key: key for key in checkpoint.keys() if ".linear_patch." not in key}
        if config.tie_word_embeddings and untie:
            sources["lm_head.weight"] = "model.embed_tokens.weight"  # the head keeps the unfolded embeddings
        for key in expected:
            if key == "lm_head.weight" and stock.tie_word_embeddings:
                continue
            if key not in sources:
                raise LinearPatchError(
                    f"{checkpoint.folder} has no {key!r}: the checkpoint does not match its config."
                )
            # Folded tensors are read whole; the others (most of them) stream in blocks.
            transform = (
                (lambda tensor, functions=transforms[key]: apply_folds(tensor, functions))
                if key in transforms
                else None
            )
            # The vocabulary matrices' folds act on the stream's axis (their columns), row by row: they are folded in
            # blocks, never in float64 whole (a 128k x 4096 head would take 4 GB).
            by_rows = key in ("model.embed_tokens.weight", "lm_head.weight")
            # Read and folded in the compute dtype, written in the stored one.
            pending = checkpoint.pending(sources[key], self.dtype, transform, by_rows)
            self.pending.append((key, pending.cast(self.storage)))
        self.stock = stock
        return plan.described

    def compare(self, evaluation: dict) -> dict:
        return {}

    def write(self, staging: Path, tokenizer, records: dict[str, str]) -> None:
        from ..models import generation_config_of, write_checkpoint_files
        from ..shards import write_sharded_safetensors

        max_shard_size = parse_size(self.request.max_shard_size)
        progress = self.request.progress
        write_sharded_safetensors(staging, self.pending, max_shard_size=max_shard_size, progress=progress)
        self.stock.save_pretrained(staging)
        generation_config = generation_config_of(self.checkpoint.folder)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        write_checkpoint_files(staging, None, tokenizer, records)


__all__ = ["InMemoryExport", "SequentialExport", "export_checkpoint", "resolve_dense"]
