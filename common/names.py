"""Names of things on the Hugging Face Hub."""

import re
from pathlib import Path

# Written by `linearpatch export` beside a stock-architecture model; read by serving, push and pull.
EXPORT_RECORD = "linearpatch_export.json"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(value: str | None) -> bool:
    """`org/name` as on the Hub, and not an existing local path."""
    return bool(value) and bool(REPO_ID.match(value)) and not Path(value).exists()


__all__ = ["EXPORT_RECORD", "REPO_ID", "is_repo_id"]
