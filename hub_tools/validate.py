"""What a pushable (or freshly pulled) LinearPatch folder must hold, checked before anything leaves the machine."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    EXPORT_RECORD,
    TOKENIZER_FILES,
    is_repo_id,
)
from linearpatch.common.remote_check import check_remote_code_imports
from linearpatch.modeling import checkpoint_model_types

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MODELING_FILES = ("configuration_linearpatch.py", "modeling_linearpatch.py")
_LOCAL_PATH = re.compile(
    r"(?<![\w/.:-])(?:/(?:home|root|tmp|Users|mnt|var|data|work|opt|scratch)\b[^\s\"']*|~/[^\s\"']*|[A-Za-z]:\\[^\s\"']*)"
)


class InvalidCheckpointError(LinearPatchError):
    """The folder cannot be pushed (or a pulled snapshot is not what was pushed)."""


@dataclass
class CheckpointInfo:
    r"""
    What a LinearPatch folder is.

    Args:
        path (`Path`): the folder.
        kind (`str`): `model` (a full LinearPatch checkpoint), `adapter` (a PEFT adapter of one) or `export` (a
            stock-architecture folder written by `linearpatch export`).
        config (`dict`): `config.json` (model) or `adapter_config.json` (adapter).
        files (`list[str]`): every file, relative to `path`.
    """

    path: Path
    kind: str
    config: dict
    files: list[str] = field(default_factory=list)


def find_local_paths(text: str) -> list[str]:
    """Absolute filesystem paths (home, tmp, drive letters ...) mentioned in `text`."""
    return _LOCAL_PATH.findall(text)


def check_gguf_files(path: Path, files: list[str]) -> None:
    """Every `.gguf` in an export folder is one `export --gguf` wrote, whole: listed in its record with this size.

    Raises:
        InvalidCheckpointError: for a GGUF the record does not list (copied in by hand) or whose size differs from
            the one written (truncated, or replaced).
    """
    written = {
        entry["file"]: entry["bytes"]
        for entry in json.loads((path / EXPORT_RECORD).read_text()).get("gguf", {}).get("files", [])
    }
    for name in (f for f in files if f.endswith(".gguf")):
        if name not in written:
            raise InvalidCheckpointError(
                f"{path / name} was not written by `linearpatch export --gguf` (not in {EXPORT_RECORD}): remove it, "
                "or export again with --gguf."
            )
        size = (path / name).stat().st_size
        if size != written[name]:
            raise InvalidCheckpointError(
                f"{path / name} has {size} bytes, not the {written[name]} it was written with (truncated or "
                "replaced): export again with --gguf."
            )


def validate_folder(
    path: str | Path, check_import: bool = True, adapter_config_override: bytes | None = None
) -> CheckpointInfo:
    """Check a LinearPatch checkpoint or adapter folder; return what it is.

    A model needs `config.json` with a LinearPatch `model_type` (`linearpatch_llama`, `linearpatch_qwen3`, ...) and
    `auto_map`, safetensors weights (no pickle files at all), both modeling files importable without linearpatch
    installed, and a tokenizer. An adapter needs
    `adapter_config.json`, `adapter_model.safetensors` and a Hub repo id as `base_model_name_or_path`
    (`adapter_config_override` is the adapter config that will be pushed instead of the file's).

    Raises:
        InvalidCheckpointError: naming what is missing or wrong, and how to fix it.
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidCheckpointError(f"{path} is not a folder.")
    files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and ".cache" not in f.parts)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise InvalidCheckpointError(
            f"{path} holds pickle files {pickles}: only safetensors are pushed (pickles can run code when loaded). "
            "Re-save with `save_pretrained(..., safe_serialization=True)` and delete them."
        )
    if (path / ADAPTER_CONFIG).exists():
        config = json.loads(adapter_config_override or (path / ADAPTER_CONFIG).read_text())
        if ADAPTER_WEIGHTS not in files:
            raise InvalidCheckpointError(f"{path} is an adapter without adapter_model.safetensors.")
        base = config.get("base_model_name_or_path")
        if not is_repo_id(base):
            raise InvalidCheckpointError(
                f"The adapter's base_model_name_or_path is {base!r}, not a Hub repo id: push the pruned model first "
                "and pass its repo id as --base-model ORG/NAME."
            )
        return CheckpointInfo(path, "adapter", config, files)
    if not (path / CONFIG_FILE).exists():
        raise InvalidCheckpointError(f"{path} has no config.json: not a checkpoint.")
    config = json.loads((path / CONFIG_FILE).read_text())
    if EXPORT_RECORD in files:  # `linearpatch export`: a stock architecture, no remote code by design
        if config.get("auto_map") or config.get("model_type") in checkpoint_model_types():
            raise InvalidCheckpointError(f"{path} has {EXPORT_RECORD} but is not a stock-architecture model.")
        if not any(f.endswith(".safetensors") for f in files) or not any(name in files for name in TOKENIZER_FILES):
            raise InvalidCheckpointError(f"{path} lacks safetensors weights or a tokenizer; export it again.")
        check_gguf_files(path, files)
        return CheckpointInfo(path, "export", config, files)
    if config.get("model_type") not in checkpoint_model_types():
        raise InvalidCheckpointError(
            f"{path} is a {config.get('model_type')!r} model, not a LinearPatch checkpoint "
            f"({', '.join(checkpoint_model_types())}): "
            "prune it with `linearpatch prune`."
        )
    if not any(f.endswith(".safetensors") for f in files):
        raise InvalidCheckpointError(f"{path} has no safetensors weights (model.safetensors).")
    missing = [name for name in MODELING_FILES if name not in files]
    auto_map = config.get("auto_map", {})
    if missing or "AutoModelForCausalLM" not in auto_map:
        raise InvalidCheckpointError(
            f"{path} lacks the remote-code files {missing or ''} or auto_map: users without linearpatch could not "
            "load it. Re-save it with linearpatch installed (`save_pretrained` copies them)."
        )
    if not any(name in files for name in TOKENIZER_FILES):
        raise InvalidCheckpointError(f"{path} has no tokenizer: save it with `tokenizer.save_pretrained(path)`.")
    info = CheckpointInfo(path, "model", config, files)
    if check_import:
        check_imports(info)
    return info


def check_imports(info: CheckpointInfo) -> None:
    """For a LinearPatch checkpoint: load it in a clean interpreter that cannot import linearpatch (seconds: a new
    process), as a user without the package would.

    Raises:
        InvalidCheckpointError: if its remote code does not load there.
    """
    if info.kind != "model":
        return
    try:
        check_remote_code_imports(info.path)
    except LinearPatchError as error:
        raise InvalidCheckpointError(str(error)) from error


__all__ = [
    "CheckpointInfo",
    "InvalidCheckpointError",
    "check_gguf_files",
    "check_imports",
    "find_local_paths",
    "validate_folder",
]
