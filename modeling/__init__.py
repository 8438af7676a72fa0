"""The LinearPatch checkpoint format: config, model classes (registered with the Auto classes) and pruning."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_linearpatch import LinearPatchConfig, contiguous_gaps, patch_positions_for
from .modeling_linearpatch import LinearPatch, LinearPatchForCausalLM, LinearPatchModel, LinearPatchPreTrainedModel
from .pruning import normalize_pruned_layers, patch_state_dict, prune_layers, prune_state_dict, pruned_config

AutoConfig.register(LinearPatchConfig.model_type, LinearPatchConfig, exist_ok=True)
AutoModel.register(LinearPatchConfig, LinearPatchModel, exist_ok=True)
AutoModelForCausalLM.register(LinearPatchConfig, LinearPatchForCausalLM, exist_ok=True)
# With these, `save_pretrained` writes `auto_map` and copies the two Hub-side files into the checkpoint, so that
# `trust_remote_code=True` loads it where linearpatch is not installed.
LinearPatchConfig.register_for_auto_class()
LinearPatchModel.register_for_auto_class("AutoModel")
LinearPatchForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LinearPatch",
    "LinearPatchConfig",
    "LinearPatchForCausalLM",
    "LinearPatchModel",
    "LinearPatchPreTrainedModel",
    "contiguous_gaps",
    "normalize_pruned_layers",
    "patch_positions_for",
    "patch_state_dict",
    "prune_layers",
    "prune_state_dict",
    "pruned_config",
]
