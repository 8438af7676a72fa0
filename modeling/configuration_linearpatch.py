# Hub-side file: `save_pretrained` copies it into every checkpoint, where it is imported by `trust_remote_code` on
# machines that have never installed `linearpatch`. It may import only torch / transformers / huggingface_hub.
"""Configurations of layer-pruned models carrying LinearPatch matrices: one per supported family (Llama, Mistral,
Qwen2, Qwen3, Gemma 3 text), each the family's own config plus the pruning fields."""

import transformers

# transformers 4.x lacks what this file and modeling_linearpatch.py build on (dataclass configs, `initialization`,
# layers that return tensors): say so instead of failing deep inside an import. This file is what `trust_remote_code`
# imports first, for AutoConfig.
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"This LinearPatch checkpoint needs transformers>=5.0 (found {transformers.__version__}): "
        "run `pip install -U 'transformers>=5,<6'`."
    )

from huggingface_hub.dataclasses import strict  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    Qwen2Config,
    Qwen3Config,
)


def contiguous_gaps(pruned_layers: list[int]) -> list[tuple[int, int]]:
    """Split sorted pruned layer indices into maximal contiguous half-open blocks `[start, end)`.

    Example: `[0, 1, 5, 6, 7]` -> `[(0, 2), (5, 8)]`.
    """
    gaps: list[tuple[int, int]] = []
    for index in sorted(pruned_layers):
        if gaps and gaps[-1][1] == index:
            gaps[-1] = (gaps[-1][0], index + 1)
        else:
            gaps.append((index, index + 1))
    return gaps


def patch_positions_for(pruned_layers: list[int]) -> list[int]:
    """Where each gap's patch sits, in the numbering of the kept layers.

    The patch of gap `[s, e)` transforms the residual stream that enters original layer `e`, i.e. kept layer
    `e - (number of pruned layers before e)`. A position equal to the number of kept layers means "the input of the
    final norm" (the gap reaches the last layer).
    """
    positions = []
    removed_before = 0
    for start, end in contiguous_gaps(pruned_layers):
        removed_before += end - start
        positions.append(end - removed_before)
    return positions


@strict
class LinearPatchConfigMixin(PreTrainedConfig):
    r"""
    The pruning fields every LinearPatch configuration adds to its family's own config (mixed in before it): a model
    from which whole decoder layers were removed, with one LinearPatch matrix per contiguous gap. `num_hidden_layers`
    is the number of *kept* layers, so the model's KV cache and layer indices are those of the pruned model. Every
    per-layer field of the family (`layer_types`, ...) describes the kept layers.

    Args:
        original_num_hidden_layers (`int`, *optional*):
            Number of decoder layers of the dense model. Defaults to `num_hidden_layers + len(pruned_layers)`.
        pruned_layers (`list[int]`, *optional*, defaults to `[]`):
            Original (dense) indices of the removed decoder layers.
        patch_positions (`list[int]`, *optional*):
            Kept-layer indices whose input is multiplied by a patch; `num_hidden_layers` means the input of the final
            norm. Defaults to one patch after each contiguous gap of `pruned_layers`. An empty list means plain
            pruning (no patch).
        keep_patch_in_fp32 (`bool`, *optional*, defaults to `True`):
            Keep the patch weights in fp32 and apply them in fp32 when the rest of the model is bf16/fp16.
        base_model (`str`, *optional*):
            Identifier of the dense model the checkpoint was pruned from (metadata only).
        selection_metric (`str`, *optional*):
            How the pruned layers were chosen, e.g. `cosine`, `block-influence`, `manual` (metadata only).
        patch_kind (`str`, *optional*):
            How the patches were made, e.g. `hadamard`, `diag`, `identity`, `distilled` (metadata only).
    """

    original_num_hidden_layers: int | None = None
    pruned_layers: list[int] | None = None
    patch_positions: list[int] | None = None
    keep_patch_in_fp32: bool = True
    base_model: str | None = None
    selection_metric: str | None = None
    patch_kind: str | None = None

    def __post_init__(self, **kwargs):
        if self.pruned_layers is None:
            self.pruned_layers = []
        self.pruned_layers = sorted(self.pruned_layers)
        if self.original_num_hidden_layers is None:
            self.original_num_hidden_layers = self.num_hidden_layers + len(self.pruned_layers)
        if self.patch_positions is None:
            self.patch_positions = patch_positions_for(self.pruned_layers)
        super().__post_init__(**kwargs)

    def validate_pruning(self):
        """Part of `@strict` validation: the pruning metadata must describe a model that can exist."""
        total = self.original_num_hidden_layers
        pruned = self.pruned_layers
        if len(set(pruned)) != len(pruned):
            raise ValueError(f"`pruned_layers` has duplicate indices: {pruned}. List each removed layer once.")
        bad = [index for index in pruned if not 0 <= index < total]
        if bad:
            raise ValueError(
                f"`pruned_layers` has indices {bad} outside the dense model's layers 0..{total - 1} "
                f"(`original_num_hidden_layers`={total})."
            )
        if len(pruned) >= total:
            raise ValueError(f"`pruned_layers` removes all {total} layers; keep at least one decoder layer.")
        if self.num_hidden_layers != total - len(pruned):
            raise ValueError(
                f"`num_hidden_layers`={self.num_hidden_layers} but `original_num_hidden_layers`={total} minus "
                f"{len(pruned)} `pruned_layers` leaves {total - len(pruned)}: the config disagrees with itself."
            )
        positions = self.patch_positions
        if len(set(positions)) != len(positions):
            raise ValueError(f"`patch_positions` has duplicates: {positions}.")
        bad = [p for p in positions if not 0 <= p <= self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"`patch_positions` {bad} do not exist: valid positions are 0..{self.num_hidden_layers} "
                f"(kept layer inputs, and {self.num_hidden_layers} for the final norm's input)."
            )


def linearpatch_config_class(family_config: type[PreTrainedConfig], model_type: str) -> type[PreTrainedConfig]:
    """The LinearPatch configuration of a family registered at run time (`register_family`): `family_config` plus the
    pruning fields, under its own `model_type` (e.g. `linearpatch_olmo2`). `dense_model_type` names the family it
    was pruned from. The built-in families' configs are the class statements below."""
    name = f"LinearPatch{family_config.__name__}"
    namespace = {"model_type": model_type, "dense_model_type": family_config.model_type, "__module__": __name__}
    namespace["__doc__"] = (
        f"`{family_config.__name__}` of a layer-pruned model, plus the fields of [`LinearPatchConfigMixin`]."
    )
    return strict(type(name, (LinearPatchConfigMixin, family_config), namespace))


@strict
class LinearPatchConfig(LinearPatchConfigMixin, LlamaConfig):
    r"""
    A layer-pruned Llama with LinearPatch matrices: `LlamaConfig` plus the fields of [`LinearPatchConfigMixin`]. Its
    name and `model_type` (`linearpatch_llama`) are those of v0.1 checkpoints.

    Example:

    ```python
    >>> from linearpatch.modeling import LinearPatchConfig
    >>> config = LinearPatchConfig(num_hidden_layers=25, pruned_layers=[20, 21, 22, 23, 24])
    >>> config.original_num_hidden_layers, config.patch_positions
    (30, [20])
    ```"""

    model_type = "linearpatch_llama"
    dense_model_type = "llama"


# One `model_type` per family: each checkpoint's config is its family's own, validated by that family's class, so a
# Qwen3 checkpoint keeps Qwen3's fields and defaults, and engines that pick code by model type see which family it is.
@strict
class LinearPatchMistralConfig(LinearPatchConfigMixin, MistralConfig):
    r"""`MistralConfig` of a layer-pruned model, plus the fields of [`LinearPatchConfigMixin`]."""

    model_type = "linearpatch_mistral"
    dense_model_type = "mistral"


@strict
class LinearPatchQwen2Config(LinearPatchConfigMixin, Qwen2Config):
    r"""`Qwen2Config` of a layer-pruned model, plus the fields of [`LinearPatchConfigMixin`]."""

    model_type = "linearpatch_qwen2"
    dense_model_type = "qwen2"


@strict
class LinearPatchQwen3Config(LinearPatchConfigMixin, Qwen3Config):
    r"""`Qwen3Config` of a layer-pruned model, plus the fields of [`LinearPatchConfigMixin`]."""

    model_type = "linearpatch_qwen3"
    dense_model_type = "qwen3"


@strict
class LinearPatchGemma3TextConfig(LinearPatchConfigMixin, Gemma3TextConfig):
    r"""`Gemma3TextConfig` of a layer-pruned model, plus the fields of [`LinearPatchConfigMixin`]."""

    model_type = "linearpatch_gemma3_text"
    dense_model_type = "gemma3_text"


__all__ = [
    "LinearPatchConfig",
    "LinearPatchConfigMixin",
    "LinearPatchGemma3TextConfig",
    "LinearPatchMistralConfig",
    "LinearPatchQwen2Config",
    "LinearPatchQwen3Config",
    "contiguous_gaps",
    "linearpatch_config_class",
    "patch_positions_for",
]
