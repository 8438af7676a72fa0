"""linearpatch: make layer-pruned Llama-family LLMs good enough to ship (LinearPatch, NeurIPS 2025).

The names below are imported on first use, so `import linearpatch.modeling` (what a checkpoint needs) does not pull
in the calibration, training and evaluation code.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LinearPatchConfig": "linearpatch.modeling",
    "LinearPatchForCausalLM": "linearpatch.modeling",
    "LinearPatchModel": "linearpatch.modeling",
    "prune_layers": "linearpatch.modeling",
    "PruneReport": "linearpatch.integration.pruning",
    "prune": "linearpatch.integration.pruning",
    "load_model": "linearpatch.integration.models",
    "save_checkpoint": "linearpatch.integration.models",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'linearpatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
