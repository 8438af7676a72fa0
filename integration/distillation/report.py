"""What `distill` did: the report saved as `linearpatch_distill.json` beside the result (the model card reads it)."""

import json
from dataclasses import asdict, dataclass, field

from linearpatch.common.names import DISTILL_RECORD
from linearpatch.common.reporting import values_table

from ..export.report import gguf_lines


@dataclass
class DistillReport:
    r"""
    What `distill_checkpoint` did (saved as `linearpatch_distill.json` beside the result; the model card reads it).

    Args:
        teacher (`str`): the dense model. top_k (`int`): K. data (`dict`): the training windows.
        epochs (`float`), lr (`float`), batch_size (`int`), gradient_accumulation_steps (`int`),
        temperature (`float`): the recipe.
        cache (`str`): the teacher cache's key. bytes_per_token (`int`): its size per token.
        output (`str`): where the result was written. kind (`str`): `merged`, `adapter` or `export`.
        train_loss (`float`): mean training loss. steps (`int`): optimiser steps.
        perplexity (`dict`): with `export`, held-out perplexity per corpus of the patched checkpoint, the
            training-free and the distilled export, and plain pruning.
        gguf (`dict`): with `export` and `gguf`, the GGUF files written (as `ExportReport.gguf`).
        dtype (`dict`): the dtype trained in (`compute`) and the one the weights were written in (`stored`: the
            checkpoint's own unless `--dtype` named one; an adapter's patches are float32 whatever it says).
        stream (`dict`): with the stream cache, the layer every step started at, the cached stream's bytes, and what
            each step saved: the layers before it not run (`layers_skipped`), their weights not read
            (`bytes_saved_per_step`, in the compute dtype) and their multiply-adds (`flops_saved_per_step`).
        streamed (`bool`): whether the student was trained with its layers read from the shards.
    """

    teacher: str
    top_k: int
    data: dict
    epochs: float
    lr: float
    batch_size: int
    gradient_accumulation_steps: int
    temperature: float
    cache: str
    bytes_per_token: int
    output: str = ""
    kind: str = "merged"
    train_loss: float | None = None
    steps: int = 0
    log: list[dict] = field(default_factory=list)
    perplexity: dict = field(default_factory=dict)
    gguf: dict = field(default_factory=dict)
    dtype: dict = field(default_factory=dict)
    stream: dict = field(default_factory=dict)
    streamed: bool = False

    record = DISTILL_RECORD

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What was trained and written: what `linearpatch distill` prints."""
        loss = f", final loss {self.train_loss:.4f}" if self.train_loss is not None else ""
        lines = []
        if self.perplexity:
            lines.append(values_table(self.perplexity))
        lines += gguf_lines(self.gguf)
        what = "a stock model (no remote code)" if self.kind == "export" else self.kind
        lines.append(
            f"Distilled {self.data['num_windows']} windows in {self.steps} steps{loss} "
            f"({self.bytes_per_token} cache bytes/token); {what} written to {self.output}"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


__all__ = ["DistillReport"]
