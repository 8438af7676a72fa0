"""The opening every checkpoint job shares (`prune_checkpoint`, `distill_checkpoint`, `export_checkpoint`), in one
order, before any weights are read: the output is free (or `overwrite` says to replace it), the device exists, the
model's config names a supported family of the expected kind, and no output is, holds or sits inside an input."""

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedConfig

from linearpatch.common.files import check_output, refuse_overlap

from .models import ModelRef, open_model, resolve_device


@dataclass(frozen=True)
class JobOpening:
    r"""
    What a job knows once its inputs are checked.

    Args:
        output (`Path`): the folder the job will create.
        device (`str`): the resolved device (`cuda` when available and none was asked for).
        model (`ModelRef`): the model, opened once (dense or LinearPatch, as `kind` asked); the job passes it down.
    """

    output: Path
    device: str
    model: ModelRef

    @property
    def config(self) -> PreTrainedConfig:
        """The model's config."""
        return self.model.config

    @property
    def model_path(self) -> str:
        """Where the model's files are (a folder, or a Hub id)."""
        return self.model.path


def open_job(
    model: str | ModelRef,
    kind: str,
    output: str | Path,
    overwrite: bool,
    device: str | None,
    inputs: dict[str, str | Path | None] | None = None,
    role: str | None = None,
) -> JobOpening:
    """Check a job's output, device, model and other inputs, cheaply and in this order.

    Args:
        model (`str` or `ModelRef`): the model the job reads (`smollm2-135m`, a folder or a Hub id).
        kind (`str`): `dense` or `checkpoint` (see `load_config`).
        output (`str` or `Path`), overwrite (`bool`): the folder to create, and whether it may replace one.
        device (`str`, *optional*): as given by the user.
        inputs (`dict`, *optional*): every other file or folder the job reads, by what it is (`None` values skipped).
        role (`str`, *optional*): what the model is, in messages (default: `dense model` or `checkpoint`).

    Raises:
        LinearPatchError: naming the problem and the fix.
    """
    output = Path(output)
    check_output(output, overwrite)
    device = resolve_device(device)
    opened = open_model(model, kind=kind, check_files=False)
    role = role or ("dense model" if kind == "dense" else "checkpoint")
    refuse_overlap(output, {role: opened.path, **(inputs or {})})
    return JobOpening(output, device, opened)


__all__ = ["JobOpening", "open_job"]
