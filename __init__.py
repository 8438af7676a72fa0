"""linearpatch: make layer-pruned Llama-family LLMs good enough to ship (LinearPatch, NeurIPS 2025)."""

from linearpatch.modeling import (
    LinearPatchConfig,
    LinearPatchForCausalLM,
    LinearPatchModel,
    prune_layers,
)

__version__ = "0.1.0"

__all__ = ["LinearPatchConfig", "LinearPatchForCausalLM", "LinearPatchModel", "__version__", "prune_layers"]
