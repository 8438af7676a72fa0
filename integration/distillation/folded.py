"""`linearpatch distill --export`: distil the export's fold maps instead of the patches, and write a stock model.

The stock export replaces each patch by a map `T` on the MLP output of the kept layer before its gap (see
`folding.py`), which folds exactly into that layer's `down_proj`. Here those maps are what is trained: the student is
the pruned checkpoint with its patches bypassed and the best training-free maps attached (the export's `--fold auto`,
fitted to the teacher, which is the dense model), with the frames `R = c Q` of a `down-proj-rotated` fold; the maps
and the frames are the only trainable parameters, under the same PEFT LN-tuning adapter, teacher cache and Trainer as
`distill`; the trained maps and frames are folded into the stock weights. A frame trains as a scale and a rotation
(`folding.FoldFrame`), so it still folds exactly: on SmolLM2 at the stress cut, training the frame as well as the map
lowered the distilled export's held-out perplexity by 5% / 8% (wiki / news, 128 steps). Every other writer of the
`--export-layers` kept layers before each gap (their attention and MLP outputs) trains a map too, from the identity,
folded exactly into its `o_proj` or `down_proj` (`folding.writer_sites`): what a stock model cannot put on the stream
at the gap, those layers learn to write (a further 8% / 6% at 128 steps, to 1.05x / 1.08x the distilled patch). A gap
at layer 0 trains its map on the token embeddings (started from the patch itself) and folds it exactly into them; a
gap that reaches the last layer trains the map on the last kept layer's MLP output. A gap whose scalar patch folds
exactly (Prune&Comp) keeps that fold and is not trained.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import family_of

from ..data import token_windows
from ..defaults import Sizes
from ..export.folding import (
    FOLD_HOLDERS,
    attach_fold_maps,
    attached_frames,
    attached_maps,
    attached_writers,
    detach_fold_maps,
    writer_sites,
)
from ..export.gguf import GgufPlan, export_gguf
from ..export.plan import fold_models, plan_model_folds
from ..requests import DEFAULT_CALIBRATION, DistillRequest
from ..resolution import ModelRef
from .generated import GENERATED

log = logging.getLogger("linearpatch")


def training_free_plan(checkpoint: str, teacher: str, windows, device: str, sequential: bool, progress: bool = True):
    """The export's best training-free fold of `checkpoint` (`--fold auto`, dense objectives fitted to `teacher`) on
    the calibration `windows`: a [`FoldPlan`]. The checkpoint and the teacher are held only while it is planned (run
    layer by layer when `sequential`)."""
    from ..models import resolve_model

    with fold_models(resolve_model(checkpoint), teacher, device, sequential, progress) as (model, dense):
        return plan_model_folds(model, "auto", windows.input_ids, dense)


def target_modules(model) -> list[str]:
    """The PEFT target names of the maps, frames and writers' maps attached to `model` (`fold_maps.20`,
    `fold_frames.20`, `fold_writers.17-self_attn-o_proj`, ...): what `distill --export` trains."""
    return [f"{holder}.{key}" for holder in FOLD_HOLDERS for key in getattr(model, holder, {})]


@torch.no_grad()
def fold_trained(merged, handles: list, plan, check_ids: torch.Tensor | None = None):
    """The stock model of the student with its trained maps folded in, and the largest logit difference between the
    two on `check_ids` (fp32 compute: the fold is exact, so this is rounding).

    Args:
        merged: the student after `merge_and_unload()` (the maps and frames hold their trained values).
        handles (`list`): from [`attach_fold_maps`]; removed here.
        plan (`FoldPlan`): the training-free plan (its scalar folds are kept).
        check_ids (`torch.LongTensor`, *optional*): windows to compare the student and the export on.

    Returns:
        `(stock, maps, max_difference)`
    """
    maps, frames, writers = attached_maps(merged), attached_frames(merged), attached_writers(merged)
    reference = None
    if check_ids is not None:
        device = next(merged.parameters()).device
        reference = merged(check_ids.to(device), use_cache=False).logits.float().cpu()
    detach_fold_maps(merged, handles)
    stock = plan.stock(merged, maps, frames, writers)
    difference = None
    if reference is not None:
        device = next(stock.parameters()).device
        logits = stock(check_ids.to(device), use_cache=False).logits.float().cpu()
        difference = float((logits - reference).abs().max())
    return stock, maps, difference


@dataclass
class FoldedExport:
    """`distill --export`'s state: the training-free plan it starts from, the writers mapped besides (see
    `folding.writer_sites`) and, once attached, the maps' hooks."""

    plan: object
    calibration: dict
    source: str | None
    writers: list[str] = field(default_factory=list)
    handles: list = field(default_factory=list)
    gguf: GgufPlan | None = None

    def attach(self, student) -> None:
        """Attach the plan's maps and frames to `student`, and an identity map on each of the writers."""
        size = student.config.hidden_size
        writers = {site: torch.eye(size) for site in self.writers}
        self.handles = attach_fold_maps(student, self.plan.maps, self.plan.frames, writers)

    def write(
        self, staging: Path, merged, tokenizer, report, windows, request: DistillRequest, storage: torch.dtype
    ) -> None:
        """Fold the trained maps into a stock model, compare it on held-out text, and write it in `storage` (the
        dtype written) with both records; the GGUF files are measured against the model as written."""
        from ..export.report import ExportReport
        from ..export.stock import plain_model
        from ..measurement.perplexity import held_out_windows, perplexity_table
        from ..models import write_checkpoint_files

        config = merged.config
        stock, maps, difference = fold_trained(merged, self.handles, self.plan, windows.input_ids[:1])
        perplexity, sizes = {}, None
        if request.eval_windows != 0:
            device = next(merged.parameters()).device
            sizes = Sizes.resolve("perplexity", device.type, request.eval_windows, None, config)
            evaluation = held_out_windows(tokenizer, request.eval_corpora, sizes.num_samples, sizes.seq_len)
            start = self.plan.stock(merged)
            models = {"patched": merged, "training-free export": start, "export": stock, "plain": plain_model(merged)}
            perplexity = perplexity_table(models, evaluation, progress=True)
            report.perplexity = perplexity
        described = [
            dict(entry, how=entry["how"] + " (distilled)") if entry["position"] in maps else entry
            for entry in self.plan.described
        ]
        record = ExportReport(
            source=self.source,
            fold="auto",
            base_model=config.base_model,
            pruned_layers=list(config.pruned_layers),
            patch_positions=list(config.patch_positions),
            folds=described,
            perplexity=perplexity,
            calibration=self.calibration,
            architecture=family_of(config).dense_causal_lm_class.__name__,
            output=report.output,
            num_layers=config.num_hidden_layers,
            dense=report.teacher,
            distilled=dict(
                training={key: value for key, value in report.to_dict().items() if key != "log"},
                fold_check_max_logit_difference=difference,
                writer_maps=list(self.writers),
            ),
        )
        write_checkpoint_files(staging, stock, tokenizer, dtype=storage)
        if self.gguf is not None:
            measured = (request.eval_corpora, sizes) if sizes is not None and sizes.num_samples else None
            # The importance matrix runs on the windows the maps were trained on.
            name = Path(report.output).name
            record.gguf = export_gguf(staging, name, self.gguf, tokenizer, measured, stock, imatrix_windows=windows)
            report.gguf = record.gguf
        for written in (report, record):
            (staging / written.record).write_text(written.to_json())


def export_start(
    request: DistillRequest,
    student: ModelRef,
    teacher: ModelRef,
    tokenizer,
    device: str,
    spread: dict,
    gguf: GgufPlan | None = None,
) -> FoldedExport:
    """The training-free fold `distill --export` starts from: `--fold auto` on the export's calibration windows of the
    training text, fitted to the teacher (the dense model), held whole only when the student fits the device."""
    config = student.config
    sizes = Sizes.resolve("calibration", device, None, None, config)
    # The fold is fitted on corpus text: the calibration corpus when the training text is the teacher's own.
    text = DEFAULT_CALIBRATION if request.data == GENERATED else request.data
    windows = token_windows(text, tokenizer, sizes.num_samples, sizes.seq_len, seed=request.seed)
    plan = training_free_plan(student.path, teacher.path, windows, device, bool(spread))
    if not plan.maps:
        raise LinearPatchError(
            "Every patch of this checkpoint folds exactly into the stock weights (a scalar patch), so there is no map "
            "to train: run `linearpatch export`, or `linearpatch distill` without --export to train the patches."
        )
    writers = writer_sites(config, plan.maps, request.export_layers)
    return FoldedExport(plan, windows.describe(), student.origin, writers, gguf=gguf)


__all__ = ["FoldedExport", "export_start", "fold_trained", "target_modules", "training_free_plan"]
