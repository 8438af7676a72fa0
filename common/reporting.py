"""What every stage returns and every table it prints: one [`Report`] protocol (prune, distill, export, eval, report)
that the CLI and the bench print alike, and the one markdown table writer (reports, the model card, the bench)."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Report(Protocol):
    r"""
    What a stage did, as data.

    Attributes:
        record (`str` or `None`): the file it is saved as beside the stage's output (`linearpatch_report.json`, ...);
            `None` when it is not saved.
    """

    record: str | None

    def to_json(self) -> str:
        """The report as JSON (what `record` holds)."""
        ...

    def summary(self) -> str:
        """What the command prints: the figures that matter and where the output went."""
        ...


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table: `header`, a separator, then one line per row (each cell as `str` gives it)."""
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def values_table(values: Mapping[str, Mapping[str, float]], label: str = "model", digits: int = 2) -> str:
    """A table of one figure per name and column (perplexity per model and corpus, ...): `label` heads the names,
    the first row's keys head the columns, each figure rounded to `digits`."""
    columns = list(next(iter(values.values()))) if values else []
    rows = [[name, *(f"{row[column]:.{digits}f}" for column in columns)] for name, row in values.items()]
    return markdown_table([label, *columns], rows)


__all__ = ["Report", "markdown_table", "values_table"]
