"""Names of the files in a checkpoint folder, and of things on the Hugging Face Hub: one place, read by every stage,
by `push` and `pull`, and by the tests."""

import re
from pathlib import Path

# Written by transformers (and read by every engine).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# A PEFT adapter holding only the patches (`distill`, `save_patch_adapter`): PEFT's two files, and ours, which names
# the checkpoint the adapter was trained on.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_RECORD = "linearpatch_adapter.json"

# What each command records beside the model it writes.
PRUNE_RECORD = "linearpatch_report.json"  # `prune`; `report` reads it
DISTILL_RECORD = "linearpatch_distill.json"  # `distill`
EXPORT_RECORD = "linearpatch_export.json"  # `export`: a stock-architecture model; serving, push and pull read it
EVAL_FILES = ("linearpatch_eval.json", "linearpatch_eval.md")  # `eval`: the results and their table
PLOTS_RECORD = "linearpatch_plots.json"  # `report`: the numbers behind the figures
TEACHER_CACHE_MANIFEST = "manifest.json"  # a top-K teacher cache folder

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(value: str | None) -> bool:
    """`org/name` as on the Hub, and not an existing local path."""
    return bool(value) and bool(REPO_ID.match(value)) and not Path(value).exists()


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_RECORD",
    "ADAPTER_WEIGHTS",
    "CONFIG_FILE",
    "DISTILL_RECORD",
    "EVAL_FILES",
    "EXPORT_RECORD",
    "PLOTS_RECORD",
    "PRUNE_RECORD",
    "REPO_ID",
    "TEACHER_CACHE_MANIFEST",
    "TOKENIZER_FILES",
    "WEIGHTS_FILE",
    "is_repo_id",
]
