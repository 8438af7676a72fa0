"""How a request's fields become command-line flags: [`option`] (a field with its flag's metadata), the [`Request`]
base, the flag types, and the layer-list syntax. Importable without torch."""

import argparse
from dataclasses import MISSING, dataclass, field, fields

from .choices import COMPUTE_DTYPE, DTYPE_HELP, DTYPES

# The options of every command that opens a model (`compute_dtype`: `--dtype` of one that writes none).
MODEL_OPTIONS = dict(
    dtype=dict(choices=DTYPES, help=DTYPE_HELP),
    compute_dtype=dict(choices=DTYPES, help=f"compute dtype (auto: {COMPUTE_DTYPE})"),
    device=dict(help="cpu, cuda, cuda:1 ... (default: cuda when available)"),
    max_memory=dict(help="memory a model may use on the device, e.g. 80GB (default: its free memory)"),
)


def positive_int(text: str) -> int:
    """Flag type: an integer >= 1 (`--num-samples 0` is a mistake, not a request for the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """Flag type: an integer >= 0 (0 switches the feature off)."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def parse_layers(text: str) -> list[int]:
    """Parse a layer list as written on the command line: `20-24` (inclusive), `3,7,9`, or `0-1,28-29`."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                first, last = (int(value) for value in part.split("-", 1))
                if last < first:
                    raise ValueError
                layers.extend(range(first, last + 1))
            elif part:
                layers.append(int(part))
    except ValueError as error:
        raise ValueError(f"Cannot read layers {text!r}: write e.g. '20-24', '3,7,9' or '0-1,28-29'.") from error
    return layers


def option(default=MISSING, help: str = "", **flag):
    r"""
    A request field and its command-line flag.

    Args:
        default (*optional*): the field's default (none: a required argument).
        help (`str`): what the flag's `--help` says.
        flag: how the flag is made: `flag` (its name, default `--field-name`), `positional`, `type`, `choices`,
            `nargs`, `metavar`, `group` (a mutually exclusive group, required), `required`, `negatable`
            (`--x/--no-x`), `cli=False` (a Python API option only).
    """
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class Request:
    """A command's options; `options()` gives them as keywords (for a function outside the package, e.g. the Hub's)."""

    def options(self) -> dict:
        return {item.name: getattr(self, item.name) for item in fields(self)}


__all__ = ["MODEL_OPTIONS", "Request", "non_negative_int", "option", "parse_layers", "positive_int"]
