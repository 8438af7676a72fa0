"""The model families linearpatch prunes, keyed by the dense model's `model_type`, and how to add one."""

from dataclasses import dataclass

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from . import configuration_linearpatch as configs
from . import modeling_linearpatch as models


@dataclass(frozen=True)
class Family:
    """One supported family: its dense (stock) classes and the LinearPatch classes of its pruned checkpoints."""

    dense_config_class: type[PreTrainedConfig]
    dense_causal_lm_class: type[PreTrainedModel]
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    causal_lm_class: type[PreTrainedModel]

    @property
    def dense_model_type(self) -> str:
        return self.dense_config_class.model_type

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


FAMILIES: dict[str, Family] = {}


def _add(family: Family) -> Family:
    AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
    AutoModel.register(family.config_class, family.model_class, exist_ok=True)
    AutoModelForCausalLM.register(family.config_class, family.causal_lm_class, exist_ok=True)
    # With these, `save_pretrained` writes `auto_map` and copies the Hub-side files into the checkpoint, so that
    # `trust_remote_code=True` loads it where linearpatch is not installed.
    family.config_class.register_for_auto_class()
    family.model_class.register_for_auto_class("AutoModel")
    family.causal_lm_class.register_for_auto_class("AutoModelForCausalLM")
    FAMILIES[family.dense_model_type] = family
    return family


def register_family(
    dense_config_class: type[PreTrainedConfig],
    dense_causal_lm_class: type[PreTrainedModel],
    decoder_layer: type[nn.Module],
    final_norm: type[nn.Module],
    base_model: type[PreTrainedModel],
) -> Family:
    r"""
    Teach linearpatch a family with the Llama residual structure (each decoder layer maps the residual stream to the
    residual stream, the base model ends with an RMSNorm built as `final_norm(hidden_size, eps=rms_norm_eps)`, and the
    causal LM is `model` + `lm_head`). `prune`, `distill`, `eval` and `push` then accept its dense checkpoints, whose
    pruned checkpoints get `model_type: linearpatch_{model_type}`.

    Checkpoints of a family registered this way load with linearpatch installed (and this call made); the Hub-side
    files only define the built-in families, so loading them with `trust_remote_code` alone needs the family added
    there.

    Example:

    ```python
    >>> from transformers.models.olmo2 import modeling_olmo2 as olmo2
    >>> from linearpatch.modeling import register_family
    >>> family = register_family(
    ...     olmo2.Olmo2Config, olmo2.Olmo2ForCausalLM, olmo2.Olmo2DecoderLayer, olmo2.Olmo2RMSNorm, olmo2.Olmo2Model
    ... )
    >>> family.model_type
    'linearpatch_olmo2'
    ```"""
    model_type = dense_config_class.model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    config_class = configs.linearpatch_config_class(dense_config_class, f"linearpatch_{model_type}")
    name = dense_config_class.__name__.removesuffix("Config")
    model_class, causal_lm_class = models.linearpatch_model_classes(
        config_class, decoder_layer, final_norm, base_model, dense_causal_lm_class, name
    )
    return _add(Family(dense_config_class, dense_causal_lm_class, config_class, model_class, causal_lm_class))


for _family in (
    Family(LlamaConfig, LlamaForCausalLM, configs.LinearPatchConfig, models.LinearPatchModel,
           models.LinearPatchForCausalLM),
    Family(MistralConfig, MistralForCausalLM, configs.LinearPatchMistralConfig, models.LinearPatchMistralModel,
           models.LinearPatchMistralForCausalLM),
    Family(Qwen2Config, Qwen2ForCausalLM, configs.LinearPatchQwen2Config, models.LinearPatchQwen2Model,
           models.LinearPatchQwen2ForCausalLM),
    Family(Qwen3Config, Qwen3ForCausalLM, configs.LinearPatchQwen3Config, models.LinearPatchQwen3Model,
           models.LinearPatchQwen3ForCausalLM),
    Family(Gemma3TextConfig, Gemma3ForCausalLM, configs.LinearPatchGemma3TextConfig,
           models.LinearPatchGemma3TextModel, models.LinearPatchGemma3TextForCausalLM),
):  # fmt: skip
    _add(_family)


def supported_model_types() -> tuple[str, ...]:
    """The dense `model_type`s linearpatch prunes (the built-in families and any registered since)."""
    return tuple(FAMILIES)


def checkpoint_model_types() -> tuple[str, ...]:
    """The `model_type`s of LinearPatch checkpoints (`linearpatch_llama`, `linearpatch_qwen3`, ...)."""
    return tuple(family.model_type for family in FAMILIES.values())


def family_of(config: PreTrainedConfig | dict) -> Family:
    """The family of a dense or LinearPatch config (or its dict).

    Raises:
        ValueError: naming the supported families, when the model is of none of them.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    for family in FAMILIES.values():
        if model_type in (family.dense_model_type, family.model_type):
            return family
    raise ValueError(
        f"Model type {model_type!r} is not supported: linearpatch prunes {', '.join(FAMILIES)} models. A family with "
        "the same residual structure can be added with `linearpatch.modeling.register_family(...)`."
    )


__all__ = [
    "FAMILIES",
    "Family",
    "checkpoint_model_types",
    "family_of",
    "register_family",
    "supported_model_types",
]
