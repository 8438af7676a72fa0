"""The LinearPatch checkpoint format: configs and model classes per family (registered with the Auto classes) and
pruning."""

from .configuration_linearpatch import (
    LinearPatchConfig,
    LinearPatchConfigMixin,
    LinearPatchGemma3TextConfig,
    LinearPatchMistralConfig,
    LinearPatchQwen2Config,
    LinearPatchQwen3Config,
    contiguous_gaps,
    patch_positions_for,
)
from .families import FAMILIES, Family, checkpoint_model_types, family_of, register_family, supported_model_types
from .modeling_linearpatch import (
    LinearPatch,
    LinearPatchForCausalLM,
    LinearPatchGemma3TextForCausalLM,
    LinearPatchGemma3TextModel,
    LinearPatchMistralForCausalLM,
    LinearPatchMistralModel,
    LinearPatchModel,
    LinearPatchQwen2ForCausalLM,
    LinearPatchQwen2Model,
    LinearPatchQwen3ForCausalLM,
    LinearPatchQwen3Model,
)
from .pruning import normalize_pruned_layers, patch_state_dict, prune_layers, prune_state_dict, pruned_config

__all__ = [
    "FAMILIES",
    "Family",
    "LinearPatch",
    "LinearPatchConfig",
    "LinearPatchConfigMixin",
    "LinearPatchForCausalLM",
    "LinearPatchGemma3TextConfig",
    "LinearPatchGemma3TextForCausalLM",
    "LinearPatchGemma3TextModel",
    "LinearPatchMistralConfig",
    "LinearPatchMistralForCausalLM",
    "LinearPatchMistralModel",
    "LinearPatchModel",
    "LinearPatchQwen2Config",
    "LinearPatchQwen2ForCausalLM",
    "LinearPatchQwen2Model",
    "LinearPatchQwen3Config",
    "LinearPatchQwen3ForCausalLM",
    "LinearPatchQwen3Model",
    "checkpoint_model_types",
    "contiguous_gaps",
    "family_of",
    "normalize_pruned_layers",
    "patch_positions_for",
    "patch_state_dict",
    "prune_layers",
    "prune_state_dict",
    "pruned_config",
    "register_family",
    "supported_model_types",
]
