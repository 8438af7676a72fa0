"""linearpatch: make layer-pruned Llama-family LLMs good enough to ship (LinearPatch, NeurIPS 2025)."""

from linearpatch.integration.prune import PruneReport, prune
from linearpatch.modeling import LinearPatchConfig, LinearPatchForCausalLM, LinearPatchModel, prune_layers

__version__ = "0.1.0"

__all__ = [
    "LinearPatchConfig",
    "LinearPatchForCausalLM",
    "LinearPatchModel",
    "PruneReport",
    "__version__",
    "prune",
    "prune_layers",
]
