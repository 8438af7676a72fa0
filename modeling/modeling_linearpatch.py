# Hub-side file: `save_pretrained` copies it (and configuration_linearpatch.py) into every checkpoint, where it is
# imported by `trust_remote_code` on machines that have never installed `linearpatch`. It may import only
# torch / transformers / huggingface_hub. Each family's classes are a diff against that family's own transformers
# classes: mixins that add the patches, over the family's decoder layer, final norm, base model and causal LM.
"""Layer-pruned Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (text) models with one LinearPatch matrix on the residual
stream after each gap."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3RMSNorm,
    Gemma3TextModel,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralModel,
    MistralRMSNorm,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model, Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model, Qwen3RMSNorm

from .configuration_linearpatch import (
    LinearPatchConfig,
    LinearPatchGemma3TextConfig,
    LinearPatchMistralConfig,
    LinearPatchQwen2Config,
    LinearPatchQwen3Config,
)


class LinearPatch(nn.Module):
    r"""
    One C x C matrix on the residual stream: `y = h @ weight` (row vectors, the paper's `h <- h P`).

    Note the convention differs from `nn.Linear` (`x @ W.T`): `weight` *is* P. A training-free patch
    `P = H diag(d) H^T` is symmetric so both readings agree, but a distilled P is not.

    Args:
        hidden_size (`int`):
            Width C of the residual stream.
        compute_in_fp32 (`bool`, *optional*, defaults to `True`):
            Multiply in fp32 (and cast back) when the hidden states are bf16/fp16: the patch rescales channels whose
            magnitudes span several orders, which half precision rounds badly.
    """

    def __init__(self, hidden_size: int, compute_in_fp32: bool = True):
        super().__init__()
        # fp32 whatever the default dtype (a model built in bf16 included), as `_keep_in_fp32_modules_strict` promises.
        dtype = torch.float32 if compute_in_fp32 else None
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size, dtype=dtype))
        self.compute_in_fp32 = compute_in_fp32

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.compute_in_fp32:
            return (hidden_states.float() @ self.weight.float()).to(hidden_states.dtype)
        return hidden_states @ self.weight.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, compute_in_fp32={self.compute_in_fp32}"


class LinearPatchLayerMixin:
    """Mixed into a family's decoder layer: first applies the patch of the gap just before the layer, if any."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.linear_patch = (
            LinearPatch(config.hidden_size, config.keep_patch_in_fp32) if layer_idx in config.patch_positions else None
        )

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.linear_patch is not None:
            hidden_states = self.linear_patch(hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


class LinearPatchNormMixin:
    """Mixed into a family's final RMSNorm: the patch comes first when the pruned block reaches the last layer."""

    def __init__(self, config):
        super().__init__(config.hidden_size, eps=config.rms_norm_eps)
        self.linear_patch = (
            LinearPatch(config.hidden_size, config.keep_patch_in_fp32)
            if config.num_hidden_layers in config.patch_positions
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.linear_patch is not None:
            hidden_states = self.linear_patch(hidden_states)
        return super().forward(hidden_states)


class LinearPatchPreTrainedMixin:
    """What every LinearPatch model class (base and causal LM) adds: fp32 patches, identity init, strict loading."""

    def post_init(self):
        # Every LinearPatch class (the base model that vLLM builds, too) keeps its patches in fp32 when loaded in
        # bf16/fp16, unless the config opts out. A model without patches (nothing pruned, or plain pruning) names no
        # such module: transformers checks that every name listed there exists.
        keep = self.config.keep_patch_in_fp32 and bool(self.config.patch_positions)
        self._keep_in_fp32_modules_strict = ["linear_patch"] if keep else []
        super().post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        # A checkpoint without a patch would be refused by `from_pretrained`; a fresh model starts as plain pruning.
        # `copy_` of an eye made on the weight's own device also works on `meta` (`eye_` builds on the CPU).
        if isinstance(module, LinearPatch):
            weight = module.weight
            init.copy_(weight, torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        # transformers only warns about missing/unexpected weights and initialises the missing ones at random. For the
        # decoder and its patches that is silent corruption (a truncated file, or a config that does not match the
        # weights), so refuse it unless `allow_missing_weights=True` asks for exactly that. The head follows
        # transformers' contract: a base-model checkpoint loaded with a head reports the new head as missing, a
        # causal-LM checkpoint loaded as the base model drops its head, and `ignore_mismatched_sizes=True`
        # re-initialises a resized embedding or head.
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        resizable = ("lm_head.", "embed_tokens.") if kwargs.get("ignore_mismatched_sizes") else ()
        problems = []
        missing = sorted(key for key in info["missing_keys"] if not key.startswith("lm_head."))
        if missing and not allow_missing_weights:
            problems.append(f"{len(missing)} weights missing from the checkpoint ({_first(missing)})")
        unexpected = sorted(key for key in info["unexpected_keys"] if not key.startswith("lm_head."))
        if unexpected:
            problems.append(f"{len(unexpected)} weights the config has no place for ({_first(unexpected)})")
        mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in info["mismatched_keys"]]
        mismatched = sorted(key for key in mismatched if not any(part in key for part in resizable))
        if mismatched:
            problems.append(f"{len(mismatched)} weights of the wrong shape ({_first(mismatched)})")
        if problems:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            hint = (
                " To load it anyway with the missing weights initialised at random, pass "
                "`allow_missing_weights=True` to from_pretrained."
                if missing and not (unexpected or mismatched)
                else ""
            )
            raise ValueError(
                f"The LinearPatch checkpoint {source!r} does not match its config "
                f"(num_hidden_layers={model.config.num_hidden_layers}, pruned_layers={model.config.pruned_layers}, "
                f"patch_positions={model.config.patch_positions}): " + "; ".join(problems) + ". The files are "
                "truncated or mixed from different checkpoints; re-export the model with `linearpatch prune`." + hint
            )
        return (model, info) if want_info else model


def _first(keys: list[str], count: int = 5) -> str:
    """The first `count` of `keys`, and how many more there are."""
    shown = ", ".join(keys[:count])
    return shown + (f", and {len(keys) - count} more" if len(keys) > count else "")


class LinearPatchModelMixin(LinearPatchPreTrainedMixin):
    """Mixed into a family's base model, whose own `__init__` runs unchanged (embedding scale, rotary, sliding-window
    bookkeeping included). Only the layers that carry a patch, and the final norm when a gap reaches the end, are
    rebuilt with the patch mixins: one layer per gap, not the whole decoder."""

    patched_layer_class: type[nn.Module]
    patched_norm_class: type[nn.Module]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Keep each patch on the device of the layer it feeds when `device_map` splits the model.
        if "patched_layer_class" in cls.__dict__:
            inherited = super(cls, cls)._no_split_modules or []
            family_layers = [name for name in inherited if not name.startswith("LinearPatch")]
            cls._no_split_modules = [*family_layers, cls.patched_layer_class.__name__]

    def post_init(self):
        # The family's `__init__` calls `post_init` last, after building its plain layers and norm.
        for position in self.config.patch_positions:
            if position < len(self.layers):
                self.layers[position] = self.patched_layer_class(self.config, position)
            else:
                self.norm = self.patched_norm_class(self.config)
        super().post_init()


class LinearPatchCausalLMMixin(LinearPatchPreTrainedMixin):
    """Mixed into a family's causal LM. `base_model_class` is the family's LinearPatch base model."""

    base_model_class: type[PreTrainedModel]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "base_model_class" in cls.__dict__:
            cls._no_split_modules = cls.base_model_class._no_split_modules

    def __init__(self, config):
        # The `__init__` of every supported family's causal LM, with the LinearPatch base model: calling the family's
        # own would first build its plain base model, only to replace it.
        PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def linearpatch_model_classes(
    config_class: type,
    decoder_layer: type[nn.Module],
    final_norm: type[nn.Module],
    base_model: type[PreTrainedModel],
    causal_lm: type[PreTrainedModel],
    name: str,
) -> tuple[type[PreTrainedModel], type[PreTrainedModel]]:
    """The LinearPatch base model and causal LM of a family registered at run time (`register_family`), from that
    family's transformers classes: what the class statements below write out for the built-in families.

    The family must have the Llama residual structure: `model.layers[i](hidden_states, ...)` returns the residual
    stream, `model.norm(hidden_states)` is the final RMSNorm built as `final_norm(hidden_size, eps=rms_norm_eps)`, and
    the causal LM is `model` + an `lm_head` Linear.

    Returns:
        `(LinearPatch{name}Model, LinearPatch{name}ForCausalLM)`.
    """
    module = {"__module__": __name__}
    layer = type(f"LinearPatch{name}DecoderLayer", (LinearPatchLayerMixin, decoder_layer), dict(module))
    norm = type(f"LinearPatch{name}FinalNorm", (LinearPatchNormMixin, final_norm), dict(module))
    namespace = {**module, "config_class": config_class, "patched_layer_class": layer, "patched_norm_class": norm}
    model = type(f"LinearPatch{name}Model", (LinearPatchModelMixin, base_model), namespace)
    lm = type(
        f"LinearPatch{name}ForCausalLM",
        (LinearPatchCausalLMMixin, causal_lm),
        {**module, "config_class": config_class, "base_model_class": model},
    )
    return model, lm


# The built-in families, one block each: the family's decoder layer and final norm with the patch mixins, its base
# model and causal LM with the LinearPatch ones. Llama keeps the v0.1 class names, which `auto_map` and
# `architectures` of existing checkpoints refer to.
class LinearPatchDecoderLayer(LinearPatchLayerMixin, LlamaDecoderLayer):
    pass


class LinearPatchFinalNorm(LinearPatchNormMixin, LlamaRMSNorm):
    pass


class LinearPatchModel(LinearPatchModelMixin, LlamaModel):
    r"""A layer-pruned `LlamaModel` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchConfig
    patched_layer_class = LinearPatchDecoderLayer
    patched_norm_class = LinearPatchFinalNorm


class LinearPatchForCausalLM(LinearPatchCausalLMMixin, LlamaForCausalLM):
    r"""A layer-pruned `LlamaForCausalLM` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchConfig
    base_model_class = LinearPatchModel


class LinearPatchMistralDecoderLayer(LinearPatchLayerMixin, MistralDecoderLayer):
    pass


class LinearPatchMistralFinalNorm(LinearPatchNormMixin, MistralRMSNorm):
    pass


class LinearPatchMistralModel(LinearPatchModelMixin, MistralModel):
    r"""A layer-pruned `MistralModel` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchMistralConfig
    patched_layer_class = LinearPatchMistralDecoderLayer
    patched_norm_class = LinearPatchMistralFinalNorm


class LinearPatchMistralForCausalLM(LinearPatchCausalLMMixin, MistralForCausalLM):
    r"""A layer-pruned `MistralForCausalLM` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchMistralConfig
    base_model_class = LinearPatchMistralModel


class LinearPatchQwen2DecoderLayer(LinearPatchLayerMixin, Qwen2DecoderLayer):
    pass


class LinearPatchQwen2FinalNorm(LinearPatchNormMixin, Qwen2RMSNorm):
    pass


class LinearPatchQwen2Model(LinearPatchModelMixin, Qwen2Model):
    r"""A layer-pruned `Qwen2Model` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchQwen2Config
    patched_layer_class = LinearPatchQwen2DecoderLayer
    patched_norm_class = LinearPatchQwen2FinalNorm


class LinearPatchQwen2ForCausalLM(LinearPatchCausalLMMixin, Qwen2ForCausalLM):
    r"""A layer-pruned `Qwen2ForCausalLM` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchQwen2Config
    base_model_class = LinearPatchQwen2Model


class LinearPatchQwen3DecoderLayer(LinearPatchLayerMixin, Qwen3DecoderLayer):
    pass


class LinearPatchQwen3FinalNorm(LinearPatchNormMixin, Qwen3RMSNorm):
    pass


class LinearPatchQwen3Model(LinearPatchModelMixin, Qwen3Model):
    r"""A layer-pruned `Qwen3Model` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchQwen3Config
    patched_layer_class = LinearPatchQwen3DecoderLayer
    patched_norm_class = LinearPatchQwen3FinalNorm


class LinearPatchQwen3ForCausalLM(LinearPatchCausalLMMixin, Qwen3ForCausalLM):
    r"""A layer-pruned `Qwen3ForCausalLM` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchQwen3Config
    base_model_class = LinearPatchQwen3Model


class LinearPatchGemma3TextDecoderLayer(LinearPatchLayerMixin, Gemma3DecoderLayer):
    pass


class LinearPatchGemma3TextFinalNorm(LinearPatchNormMixin, Gemma3RMSNorm):
    pass


class LinearPatchGemma3TextModel(LinearPatchModelMixin, Gemma3TextModel):
    r"""A layer-pruned `Gemma3TextModel` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchGemma3TextConfig
    patched_layer_class = LinearPatchGemma3TextDecoderLayer
    patched_norm_class = LinearPatchGemma3TextFinalNorm


class LinearPatchGemma3TextForCausalLM(LinearPatchCausalLMMixin, Gemma3ForCausalLM):
    r"""A layer-pruned `Gemma3ForCausalLM` with a LinearPatch matrix after each gap."""

    config_class = LinearPatchGemma3TextConfig
    base_model_class = LinearPatchGemma3TextModel


__all__ = [
    "LinearPatch",
    "LinearPatchCausalLMMixin",
    "LinearPatchDecoderLayer",
    "LinearPatchFinalNorm",
    "LinearPatchForCausalLM",
    "LinearPatchGemma3TextDecoderLayer",
    "LinearPatchGemma3TextFinalNorm",
    "LinearPatchGemma3TextForCausalLM",
    "LinearPatchGemma3TextModel",
    "LinearPatchLayerMixin",
    "LinearPatchMistralDecoderLayer",
    "LinearPatchMistralFinalNorm",
    "LinearPatchMistralForCausalLM",
    "LinearPatchMistralModel",
    "LinearPatchModel",
    "LinearPatchModelMixin",
    "LinearPatchNormMixin",
    "LinearPatchPreTrainedMixin",
    "LinearPatchQwen2DecoderLayer",
    "LinearPatchQwen2FinalNorm",
    "LinearPatchQwen2ForCausalLM",
    "LinearPatchQwen2Model",
    "LinearPatchQwen3DecoderLayer",
    "LinearPatchQwen3FinalNorm",
    "LinearPatchQwen3ForCausalLM",
    "LinearPatchQwen3Model",
    "linearpatch_model_classes",
]
