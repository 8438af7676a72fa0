"""What `linearpatch export` did: the report saved as `linearpatch_export.json` beside the stock weights."""

import json
from dataclasses import asdict, dataclass, field

from linearpatch.common.names import EXPORT_RECORD
from linearpatch.common.reporting import markdown_table, values_table


@dataclass
class ExportReport:
    r"""
    What `export_checkpoint` did (saved as `linearpatch_export.json`).

    Args:
        source (`str`): the LinearPatch checkpoint's Hub id, when it has one. fold (`str`): one of `FOLDS`.
        base_model (`str`): the dense model the checkpoint was pruned from.
        pruned_layers (`list[int]`), patch_positions (`list[int]`): from the checkpoint.
        folds (`list[dict]`): per patch: position, how it was folded, whether exactly, the objective kept and (for
            `auto`) the held-out calibration perplexity of every candidate.
        perplexity (`dict`): held-out perplexity per corpus of `patched`, `export` and `plain` pruning (empty when
            skipped: a sequential export, or `eval_windows=0`).
        calibration (`dict`): the windows `down-proj` was fitted on.
        architecture (`str`): the stock class written, e.g. `Qwen3ForCausalLM`.
        output (`str`), seconds (`float`).
        num_layers (`int`): the kept layers (a patch at this position acts before the final norm).
        dense (`str`, *optional*): the dense model the dense objectives were fitted to.
        distilled (`dict`): for `distill --export`, the training's report and the held-out perplexity of the
            training-free fold it started from.
        gguf (`dict`): for `--gguf`, each file (name, type, bytes, llama-perplexity per corpus), what llama.cpp was
            told (`overrides`), its limits (`notes`), and transformers' perplexity of the export on the same text
            scored the same way (`reference`).
        dtype (`dict`): the dtype folded in (`compute`) and the one written (`stored`: the checkpoint's own unless
            `--dtype` named one).
    """

    source: str | None
    fold: str
    base_model: str | None
    pruned_layers: list[int]
    patch_positions: list[int]
    folds: list[dict] = field(default_factory=list)
    perplexity: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    architecture: str = ""
    output: str = ""
    seconds: float = 0.0
    num_layers: int = 0
    dense: str | None = None
    distilled: dict = field(default_factory=dict)
    gguf: dict = field(default_factory=dict)
    dtype: dict = field(default_factory=dict)

    record = EXPORT_RECORD

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        """Each fold, the held-out comparison and where the model went: what `linearpatch export` prints."""
        lines = []
        for fold in self.folds:
            exact = "exact" if fold["exact"] else f"approximate (fit error {fold.get('relative_error', 0):.3f})"
            where = "the final norm" if fold["position"] >= self.num_layers else f"kept layer {fold['position']}"
            objective = f" [{fold['objective']}]" if "objective" in fold else ""
            lines.append(f"patch before {where}: {fold['how']}{objective}, {exact}")
            scores = fold.get("heldout_perplexity")
            if scores:
                shown = ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
                lines.append(f"  held-out calibration perplexity: {shown}")
            if fold.get("heldout_kl"):  # `--score kl`: what ranked them
                shown = ", ".join(f"{name} {value:.4f}" for name, value in fold["heldout_kl"].items())
                lines.append(f"  held-out KL to the dense model (ranks them): {shown}")
        if self.perplexity:  # skipped by a sequential export
            lines.append(values_table(self.perplexity))
        lines += gguf_lines(self.gguf)
        lines.append(f"Wrote a stock {self.architecture} (no remote code) to {self.output} (report: {EXPORT_RECORD})")
        return "\n".join(lines)


def gguf_lines(gguf: dict) -> list[str]:
    """The GGUF files written, their sizes and llama-perplexity beside transformers' on the same text."""
    if not gguf:
        return []
    corpora = list(gguf.get("reference") or (gguf["files"][0].get("perplexity") or {}))
    rows = [
        [
            entry["file"],
            f"{entry['bytes'] / 1e6:.1f}",
            "yes" if entry.get("imatrix") else "no",
            *(f"{entry['perplexity'][c]:.2f}" for c in corpora),
        ]
        for entry in gguf["files"]
    ]
    if gguf.get("reference"):
        rows.append(["transformers (the export)", "", "", *(f"{gguf['reference'][c]:.2f}" for c in corpora)])
    if corpora:
        title = (
            f"llama.cpp files, perplexity by llama-perplexity's protocol ({gguf['windows']} windows of "
            f"{gguf['seq_len']} tokens, each scored on its second half):"
        )
    else:
        title = "llama.cpp files (not measured):"
    table = markdown_table(["file", "MB", "imatrix", *corpora], rows)
    matrix = gguf.get("imatrix")
    used = []
    if matrix:
        described = f"{matrix['num_windows']} x {matrix['seq_len']} tokens of {matrix['source']}"
        used = [f"importance matrix: {matrix['file']} ({described})"]
    return [title, table, *used, *(f"note: {note}" for note in gguf.get("notes", []))]


__all__ = ["ExportReport", "gguf_lines"]
