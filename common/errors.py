"""The errors that mean "the input is wrong": the CLI prints their message as one line, never a traceback."""


class LinearPatchError(ValueError):
    """Bad input to linearpatch; the message names the problem and the fix."""


class OutputExistsError(LinearPatchError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class ModelNotFoundError(LinearPatchError, FileNotFoundError):
    """A model name that is neither embedded, a local folder, nor reachable on the Hub."""


class UnsupportedModelError(LinearPatchError):
    """The model's architecture is not one linearpatch can prune."""


class CheckpointMismatchError(LinearPatchError):
    """Weights, adapter or teacher that do not belong to the model they are loaded with."""


class OutputWriteError(LinearPatchError, OSError):
    """The output could not be written (no space left, a read-only place, a file too large)."""


def first_line(error: BaseException, mark_more: bool = False) -> str:
    """The first line of an error's message (its type when it has none), to quote it in one line; `mark_more` adds
    " (...)" when lines were dropped."""
    lines = (str(error).strip() or type(error).__name__).splitlines()
    return lines[0] + (" (...)" if mark_more and len(lines) > 1 else "")


__all__ = [
    "CheckpointMismatchError",
    "LinearPatchError",
    "ModelNotFoundError",
    "OutputExistsError",
    "OutputWriteError",
    "UnsupportedModelError",
    "first_line",
]
