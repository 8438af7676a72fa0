"""The model families linearpatch prunes, keyed by the dense model's `model_type`: one entry per family holds every
fact about it that the package needs (its classes, residual layout, logit soft-cap, per-layer config fields). Adding a
family is an entry here (or a `register_family` call) and, for `trust_remote_code` loading, its class statements in
the Hub-side files."""

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
class ResidualLayout:
    r"""
    Where a family's decoder layer reads and writes the residual stream, by module name inside the layer: what the
    stock export folds a patch into.

    Args:
        after_attention (`str`): the module whose input is the stream after the attention block.
        mlp_output (`str`): the module whose output is the MLP's contribution to the stream.
        writers (`tuple[str, str]`): the modules whose outputs are added to the stream: the attention's, then the
            MLP's.
        writer_norm_offset (`float`, *optional*): `None` when the writers are Linear layers; when they are RMSNorms
            applied to each block's output before it is added, the offset of their weight (`1.0` for Gemma's
            `(1 + w)`, `0.0` for a plain `w`, as in OLMo 2).
        reads_through_norms (`bool`, *optional*, defaults to `True`): every block reads the stream through an
            RMSNorm, so a scalar on the stream moves into the writers exactly (up to eps). OLMo 2's blocks read the
            stream as it is: its scalar folds are approximations.
        readers (`tuple[tuple[str, tuple[str, ...]], ...]`, *optional*): each RMSNorm (plain weight `w`) that reads
            the stream and the Linear layers that read its output (Llama's: `input_layernorm` -> q, k, v;
            `post_attention_layernorm` -> gate, up). With Linear writers, a rotation of the stream then folds exactly
            into every layer (`down-proj-rotated`); `()` where it cannot (Gemma 3's `(1 + w)` norms and normalised
            writers).
    """

    after_attention: str = "post_attention_layernorm"
    mlp_output: str = "mlp"
    writers: tuple[str, str] = ("self_attn.o_proj", "mlp.down_proj")
    writer_norm_offset: float | None = None
    reads_through_norms: bool = True
    readers: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )

    @property
    def rotatable(self) -> bool:
        """Whether a rotation and scale of the stream folds into the layers exactly (up to RMSNorm's eps): every block
        reads it through a plain-weight RMSNorm into Linear layers, and writes it through Linear layers."""
        return bool(self.readers) and self.writer_norm_offset is None and self.reads_through_norms


LLAMA_RESIDUAL = ResidualLayout()
# Gemma 3 normalises each block's output before adding it: the writers are the post norms, the MLP's input norm is
# `pre_feedforward_layernorm`.
GEMMA3_RESIDUAL = ResidualLayout(
    after_attention="pre_feedforward_layernorm",
    mlp_output="post_feedforward_layernorm",
    writers=("post_attention_layernorm", "post_feedforward_layernorm"),
    writer_norm_offset=1.0,
    readers=(),
)


@dataclass(frozen=True)
class LlamaCppLayout:
    r"""
    What llama.cpp assumes of a family that its converter takes (`export --gguf`), where that differs from
    transformers for a pruned model.

    Args:
        period_key (`str`, *optional*): the GGUF key of the period of a sliding/global layer pattern that llama.cpp
            assumes (`period - 1` sliding layers, then a global one) and the converter does not write: Gemma 3's.
        default_period (`int`, *optional*): the period llama.cpp assumes when the GGUF does not say.
        head_scale_from_width_at (`int`, *optional*): the depth at which llama.cpp scales attention by
            1 / sqrt(hidden / heads) instead of 1 / sqrt(head_dim) (Gemma 3 27B's 62 layers), whatever
            `query_pre_attn_scalar` says.
        runs_sliding_window (`bool`, *optional*, defaults to `False`): llama.cpp runs the family's sliding windows;
            otherwise it attends to the whole context, and the GGUF equals transformers only up to the window.
        window_on_every_layer (`bool`, *optional*, defaults to `False`): a `sliding_window` in a config without
            `layer_types` slides on every layer (Mistral's).
    """

    period_key: str | None = None
    default_period: int | None = None
    head_scale_from_width_at: int | None = None
    runs_sliding_window: bool = False
    window_on_every_layer: bool = False


LLAMA_CPP = LlamaCppLayout()
GEMMA3_LLAMA_CPP = LlamaCppLayout(
    period_key="gemma3.attention.sliding_window_pattern",
    default_period=6,
    head_scale_from_width_at=62,
    runs_sliding_window=True,
)
# Config fields that describe the decoder layers: lists with one entry per layer (sliced to the kept layers), counts
# of the first layers (`max_window_layers`: the first N use full attention; recounted over the kept layers), and
# periodic patterns that a family recomputes from the depth (dropped: the sliced `layer_types` is explicit). Every
# field any built-in family has; a config without one skips it.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
LAYER_COUNT_FIELDS = ("max_window_layers",)
LAYER_PATTERN_FIELDS = ("sliding_window_pattern", "_sliding_window_pattern")


@dataclass(frozen=True)
class Family:
    r"""
    One supported family: every fact about it that linearpatch needs, in one entry.

    Args:
        dense_config_class, dense_causal_lm_class: the family's stock (dense) classes.
        config_class, model_class, causal_lm_class: the LinearPatch classes of its pruned checkpoints (the Hub-side
            files).
        residual (`ResidualLayout`): where its layers write the residual stream (the export's folds).
        logit_softcap_field (`str`, *optional*): the config field of a `tanh` soft-cap its causal LM applies to the
            logits after the head (Gemma's `final_logit_softcapping`), for code that runs the head itself.
        llama_cpp (`LlamaCppLayout`, *optional*): what llama.cpp assumes of it; `None` where llama.cpp's converter
            does not take the family (`export --gguf` refuses it).
        per_layer_fields, layer_count_fields, layer_pattern_fields: its config fields that describe the decoder layers
            (see `PER_LAYER_FIELDS`), re-indexed when layers are removed.
    """

    dense_config_class: type[PreTrainedConfig]
    dense_causal_lm_class: type[PreTrainedModel]
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    causal_lm_class: type[PreTrainedModel]
    residual: ResidualLayout = LLAMA_RESIDUAL
    logit_softcap_field: str | None = None
    llama_cpp: LlamaCppLayout | None = None
    per_layer_fields: tuple[str, ...] = PER_LAYER_FIELDS
    layer_count_fields: tuple[str, ...] = LAYER_COUNT_FIELDS
    layer_pattern_fields: tuple[str, ...] = LAYER_PATTERN_FIELDS

    @property
    def dense_model_type(self) -> str:
        return self.dense_config_class.model_type

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def logit_softcap(self, config) -> float | None:
        """The soft-cap of `config`'s logits (`logits = tanh(logits / cap) * cap`), or `None`."""
        return getattr(config, self.logit_softcap_field, None) if self.logit_softcap_field else None


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
    *,
    residual: ResidualLayout = LLAMA_RESIDUAL,
    logit_softcap_field: str | None = None,
    llama_cpp: LlamaCppLayout | None = None,
) -> Family:
    r"""
    Teach linearpatch a family with the Llama residual structure (each decoder layer maps the residual stream to the
    residual stream, the base model ends with an RMSNorm built as `final_norm(hidden_size, eps=rms_norm_eps)`, and the
    causal LM is `model` + `lm_head`). `prune`, `distill`, `eval` and `push` then accept its dense checkpoints, whose
    pruned checkpoints get `model_type: linearpatch_{model_type}`.

    Checkpoints of a family registered this way load with linearpatch installed (and this call made); the Hub-side
    files only define the built-in families, so loading them with `trust_remote_code` alone needs the family added
    there. A built-in family is the same entry, written out in `FAMILIES` below, with its class statements in the
    Hub-side files.

    Args:
        dense_config_class, dense_causal_lm_class, decoder_layer, final_norm, base_model: the family's own classes.
        residual (`ResidualLayout`, *optional*): where its layers write the residual stream, when not as Llama's.
        logit_softcap_field (`str`, *optional*): the config field of a soft-cap on the logits, if it has one.
        llama_cpp (`LlamaCppLayout`, *optional*): what llama.cpp assumes of it, if its converter takes the family.

    Example:

    ```python
    >>> from transformers.models.olmo2 import modeling_olmo2 as olmo2
    >>> from linearpatch.modeling import ResidualLayout, register_family
    >>> post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")  # OLMo 2 normalises block outputs
    >>> layout = ResidualLayout("mlp", post_norms[1], post_norms, writer_norm_offset=0.0, reads_through_norms=False)
    >>> family = register_family(
    ...     olmo2.Olmo2Config, olmo2.Olmo2ForCausalLM, olmo2.Olmo2DecoderLayer, olmo2.Olmo2RMSNorm, olmo2.Olmo2Model,
    ...     residual=layout,
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
    family = Family(
        dense_config_class,
        dense_causal_lm_class,
        config_class,
        model_class,
        causal_lm_class,
        residual=residual,
        logit_softcap_field=logit_softcap_field,
        llama_cpp=llama_cpp,
    )
    return _add(family)


for _family in (
    Family(LlamaConfig, LlamaForCausalLM, configs.LinearPatchConfig, models.LinearPatchModel,
           models.LinearPatchForCausalLM, llama_cpp=LLAMA_CPP),
    Family(MistralConfig, MistralForCausalLM, configs.LinearPatchMistralConfig, models.LinearPatchMistralModel,
           models.LinearPatchMistralForCausalLM, llama_cpp=LlamaCppLayout(window_on_every_layer=True)),
    Family(Qwen2Config, Qwen2ForCausalLM, configs.LinearPatchQwen2Config, models.LinearPatchQwen2Model,
           models.LinearPatchQwen2ForCausalLM, llama_cpp=LLAMA_CPP),
    Family(Qwen3Config, Qwen3ForCausalLM, configs.LinearPatchQwen3Config, models.LinearPatchQwen3Model,
           models.LinearPatchQwen3ForCausalLM, llama_cpp=LLAMA_CPP),
    Family(Gemma3TextConfig, Gemma3ForCausalLM, configs.LinearPatchGemma3TextConfig,
           models.LinearPatchGemma3TextModel, models.LinearPatchGemma3TextForCausalLM,
           residual=GEMMA3_RESIDUAL, logit_softcap_field="final_logit_softcapping", llama_cpp=GEMMA3_LLAMA_CPP),
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
    "GEMMA3_LLAMA_CPP",
    "GEMMA3_RESIDUAL",
    "LLAMA_CPP",
    "LLAMA_RESIDUAL",
    "Family",
    "LlamaCppLayout",
    "ResidualLayout",
    "checkpoint_model_types",
    "family_of",
    "register_family",
    "supported_model_types",
]
