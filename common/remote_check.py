"""Load checkpoints the way a user without linearpatch does: `trust_remote_code=True` in a process that cannot
import the package (`load_without_package.py`, run by file path)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import LinearPatchError

LOAD_WITHOUT_PACKAGE = Path(__file__).with_name("load_without_package.py")


def _absolute(checkpoint: str) -> str:
    kind, separator, target = checkpoint.partition(":")
    prefix = f"{kind}:" if separator and kind in ("adapter", "base-bf16", "stock") else ""
    target = checkpoint[len(prefix) :]
    return prefix + (str(Path(target).resolve()) if Path(target).exists() else target)


def _run_without_package(
    arguments: list[str], scratch: str, env: dict | None, timeout: float, python: str | None = None
):
    # A private modules cache: a stale copy of the modeling files from an earlier checkpoint must not be reused.
    process_env = {**os.environ, "HF_MODULES_CACHE": str(Path(scratch) / "modules"), **(env or {})}
    return subprocess.run(
        [python or sys.executable, str(LOAD_WITHOUT_PACKAGE), *arguments],
        capture_output=True,
        text=True,
        cwd=scratch,  # local folders are passed absolute, repo ids stay as they are
        env=process_env,
        timeout=timeout,
    )


def logits_without_package(
    checkpoints: list[str | Path],
    input_ids: torch.Tensor,
    env: dict | None = None,
    timeout: float = 900,
    python: str | Path | None = None,
) -> list[torch.Tensor]:
    """Load each checkpoint with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` in a fresh
    Python process where `linearpatch` cannot be imported, and return its logits for `input_ids` (as fp32).

    `checkpoints` may be local folders, Hub repo ids (resolved by that process, e.g. through `HF_ENDPOINT` or the HF
    cache), `adapter:PATH` for a PEFT adapter (loaded with stock PEFT and merged), `base-bf16:PATH` for the base
    model in bf16 (its last hidden state is returned), or `stock:PATH` for an exported folder loaded without
    `trust_remote_code`. `python` is the interpreter to use (default: this one), e.g. another environment's, to
    check the remote-code files against its transformers version.

    Raises:
        RuntimeError: with the child's output if loading fails there.
    """
    with tempfile.TemporaryDirectory(prefix="linearpatch-remote-check-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.safetensors", Path(scratch) / "logits.safetensors"
        save_file({"input_ids": input_ids.contiguous()}, str(inputs))
        targets = [_absolute(str(c)) for c in checkpoints]
        arguments = [str(inputs), str(outputs), *targets]
        result = _run_without_package(arguments, scratch, env, timeout, str(python) if python else None)
        if result.returncode != 0:
            raise RuntimeError(
                f"Loading without linearpatch failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        loaded = load_file(str(outputs))
    return [loaded[f"logits_{index}"] for index in range(len(checkpoints))]


def check_remote_code_imports(path: str | Path) -> None:
    """Import a local folder's `auto_map` classes with `trust_remote_code` in a process without linearpatch.

    Raises:
        LinearPatchError: with the end of the child's error output.
    """
    with tempfile.TemporaryDirectory(prefix="linearpatch-remote-check-") as scratch:
        result = _run_without_package(["--import-only", str(Path(path).resolve())], scratch, None, 300)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise LinearPatchError(
            f"The modeling files in {path} do not import without linearpatch ({last[0]}); re-save the checkpoint "
            "with this linearpatch version."
        )


__all__ = ["LOAD_WITHOUT_PACKAGE", "check_remote_code_imports", "logits_without_package"]
