"""Writing outputs without losing anything: build in a temporary sibling folder, then rename into place."""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LOAD_WITHOUT_PACKAGE = Path(__file__).with_name("load_without_package.py")


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any expensive work) if `path` exists and `overwrite` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it.")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename.

    If the block fails, the temporary folder is removed and an existing `path` is left as it was.
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(retired / "old")
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_files_atomically(directory: str | Path, files: dict[str, str], overwrite: bool = False) -> None:
    """Write text files into `directory` (created if needed), each through a temporary file and a rename; refuse to
    replace an existing file unless `overwrite`. Nothing is written if any target exists."""
    directory = Path(directory)
    for name in files:
        check_output(directory / name, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        staging = directory / f".{name}.{os.getpid()}.tmp"
        staging.write_text(text)
        staging.replace(directory / name)


def save_checkpoint(
    model, tokenizer, output: str | Path, overwrite: bool = False, extra_files: dict | None = None
) -> Path:
    """Save a model (safetensors, with the Hub-side modeling files), its tokenizer and extra text files atomically."""
    with atomic_directory(output, overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return Path(output)


def _absolute(checkpoint: str) -> str:
    prefix = "adapter:" if checkpoint.startswith("adapter:") else ""
    target = checkpoint[len(prefix) :]
    return prefix + (str(Path(target).resolve()) if Path(target).exists() else target)


def logits_without_package(
    checkpoints: list[str | Path], input_ids: torch.Tensor, env: dict | None = None, timeout: float = 900
) -> list[torch.Tensor]:
    """Load each checkpoint with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` in a fresh
    Python process where `linearpatch` cannot be imported, and return its logits for `input_ids` (as fp32).

    This is the check that a checkpoint works for users who never installed linearpatch. `checkpoints` may be
    local folders or Hub repo ids (resolved by that process, e.g. through `HF_ENDPOINT` / the HF cache).

    Raises:
        RuntimeError: with the child's output if loading fails there.
    """
    with tempfile.TemporaryDirectory(prefix="linearpatch-remote-check-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.safetensors", Path(scratch) / "logits.safetensors"
        save_file({"input_ids": input_ids.contiguous()}, str(inputs))
        # A private modules cache: a stale copy of the modeling files from an earlier checkpoint must not be reused.
        process_env = {**os.environ, "HF_MODULES_CACHE": str(Path(scratch) / "modules"), **(env or {})}
        # The child runs in `scratch`: local folders must be absolute, repo ids stay as they are.
        targets = [_absolute(str(c)) for c in checkpoints]
        result = subprocess.run(
            [sys.executable, str(LOAD_WITHOUT_PACKAGE), str(inputs), str(outputs), *targets],
            capture_output=True,
            text=True,
            cwd=scratch,
            env=process_env,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Loading without linearpatch failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        loaded = load_file(str(outputs))
    return [loaded[f"logits_{index}"] for index in range(len(checkpoints))]


__all__ = [
    "OutputExistsError",
    "atomic_directory",
    "check_output",
    "logits_without_package",
    "save_checkpoint",
    "sha256_file",
    "write_files_atomically",
]
