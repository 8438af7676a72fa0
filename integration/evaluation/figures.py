"""`linearpatch report`: the figures of a saved checkpoint (see `measurement/figures.py`), written beside it."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from linearpatch.common.names import PLOTS_RECORD, PRUNE_RECORD

from ..measurement.figures import (
    CLOSENESS_FILE,
    DEPTH_CURVE_FILE,
    PLOT_FILES,
    cosine_matrix,
    cut_mismatch,
    kept_positions,
    layer_magnitudes,
    plot_closeness_by_cut,
    plot_cosine_heatmap,
    plot_cut_mismatch,
    plot_depth_curve,
    plot_layer_magnitudes,
    write_report_plots,
)
from ..pruning.cuts import checkpoint_closeness
from ..requests import ReportRequest


@dataclass
class FiguresReport:
    r"""
    What `linearpatch report` wrote.

    Args:
        folder (`str`): the checkpoint folder the figures were written beside.
        files (`list[str]`): the figures' file names.
        data (`dict`): what the figures show (as `linearpatch_plots.json` holds it).
        skipped (`list[str]`): figures not drawn, each with why.
    """

    folder: str
    files: list[str]
    data: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    record = PLOTS_RECORD

    def to_json(self) -> str:
        return json.dumps(self.data)

    def summary(self) -> str:
        return "\n".join([f"Wrote {', '.join(self.files)} to {self.folder}", *self.skipped])


def plot_checkpoint(request: ReportRequest | str, **options) -> FiguresReport:
    """`linearpatch report`: the figures of a saved checkpoint, written beside it (see [`write_report_plots`]).

    Args:
        request ([`ReportRequest`] or `str`): the request, or the checkpoint folder (then `options`, the request's
            other fields, make the request: `dense` (default: the `base_model` it records, if it can be resolved),
            `data`, `num_samples`, `seq_len`, `seed`, `device`, `overwrite`, `progress`).

    Returns:
        [`FiguresReport`]: the files written.
    """
    from linearpatch.common.errors import LinearPatchError
    from linearpatch.common.files import check_output

    from ..data import token_windows
    from ..defaults import Sizes
    from ..models import (
        check_model_files,
        check_same_base,
        embedded_name_for,
        load_model,
        load_tokenizer,
        resolve_device,
    )

    if not isinstance(request, ReportRequest):
        request = ReportRequest(checkpoint=request, **options)
    checkpoint = request.checkpoint
    device = resolve_device(request.device)
    config = check_model_files(checkpoint, kind="checkpoint")
    dense = request.dense or embedded_name_for(config.base_model)
    if not dense:
        raise LinearPatchError(f"{checkpoint} does not record its dense model; pass --dense MODEL.")
    check_same_base(config, check_model_files(dense, kind="dense"), dense, "dense model")
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise LinearPatchError(f"{checkpoint} is not a local folder: pull it first (`linearpatch pull`).")
    report_file = folder / PRUNE_RECORD
    prune_report = json.loads(report_file.read_text()) if report_file.is_file() else None
    sizes = Sizes.resolve("figures", device, request.num_samples, request.seq_len, config)
    written = list(PLOT_FILES) + ([DEPTH_CURVE_FILE] if prune_report and prune_report.get("depth_curve") else [])
    skipped = []
    if sizes.num_samples >= 2:
        written.append(CLOSENESS_FILE)
    else:
        skipped.append(f"Not drawn: {CLOSENESS_FILE}, which holds out windows from the fit (--num-samples 2 or more).")
    for name in written:
        check_output(folder / name, request.overwrite)
    windows = token_windows(request.data, load_tokenizer(checkpoint), sizes.num_samples, sizes.seq_len, request.seed)
    patched, _ = load_model(checkpoint, device=device, kind="checkpoint")
    dense_model, _ = load_model(dense, device=device, kind="dense")
    closeness = checkpoint_closeness(dense_model, windows, config.pruned_layers, request.progress)
    data = write_report_plots(
        dense_model,
        patched,
        windows.input_ids,
        folder,
        progress=request.progress,
        prune_report=prune_report,
        closeness=closeness,
    )
    return FiguresReport(str(folder), written, data, skipped)


__all__ = [
    "FiguresReport",
    "cosine_matrix",
    "cut_mismatch",
    "kept_positions",
    "layer_magnitudes",
    "plot_checkpoint",
    "plot_closeness_by_cut",
    "plot_cosine_heatmap",
    "plot_cut_mismatch",
    "plot_depth_curve",
    "plot_layer_magnitudes",
    "write_report_plots",
]
