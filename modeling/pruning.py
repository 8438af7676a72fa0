"""Depth pruning as a pure function: a dense state dict (any supported family) in, a re-indexed state dict plus patches
out; and the pruned config, with everything the family keeps per layer re-indexed to the kept layers."""

import re

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from .configuration_linearpatch import LinearPatchConfigMixin, contiguous_gaps
from .families import Family, family_of

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)\.(?P<rest>.+)$")


def normalize_pruned_layers(layers: list[int] | range | tuple[int, ...], num_layers: int) -> list[int]:
    """Validate user-given layer indices against a dense model of `num_layers` layers; return them sorted.

    Raises:
        ValueError: on duplicates, out-of-range indices, an empty selection, or pruning every layer.
    """
    layers = [int(index) for index in layers]
    if not layers:
        raise ValueError("No layers to prune: pass at least one layer index (e.g. `layers=[20, 21, 22]`).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layer indices {layers} contain duplicates; list each layer once.")
    bad = [index for index in layers if not 0 <= index < num_layers]
    if bad:
        raise ValueError(f"Layer indices {bad} are out of range: the model has layers 0..{num_layers - 1}.")
    if len(layers) >= num_layers:
        raise ValueError(f"Pruning all {num_layers} layers leaves no model; keep at least one layer.")
    return sorted(layers)


def prune_state_dict(
    state_dict: dict[str, torch.Tensor], pruned_layers: list[int], num_layers: int
) -> dict[str, torch.Tensor]:
    """Drop the decoder layers `pruned_layers` and renumber the kept ones `0..n-1` (`layers.{old}` -> `layers.{new}`).

    Keys that do not belong to a decoder layer are passed through. The input is not modified; tensors are shared.

    Args:
        state_dict (`dict[str, torch.Tensor]`): a dense state dict (`model.layers.{i}.…` keys).
        pruned_layers (`list[int]`): original indices of the layers to drop.
        num_layers (`int`): number of decoder layers in `state_dict`.
    """
    pruned = set(normalize_pruned_layers(pruned_layers, num_layers))
    new_index = {}
    for old in range(num_layers):
        if old not in pruned:
            new_index[old] = len(new_index)
    out = {}
    for key, tensor in state_dict.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = tensor
            continue
        old = int(match["index"])
        if old in pruned:
            continue
        out[f"{match['prefix']}{new_index[old]}.{match['rest']}"] = tensor
    return out


def pruned_config_values(values: dict, pruned_layers: list[int], family: Family) -> dict:
    """Re-index a dense config's per-layer entries (the family's, see `PER_LAYER_FIELDS`) to the kept layers (pure, on
    `to_dict()` values).

    - `layer_types` (sliding/full attention in Qwen2/Qwen3/Gemma 3/Mistral-style configs) and other per-layer lists
      keep the entries of the kept layers;
    - `max_window_layers` (Qwen2/Qwen3: the first N layers use full attention) counts the kept layers below it;
    - a periodic `sliding_window_pattern` (Gemma 3) no longer describes the kept layers and is dropped, the sliced
      `layer_types` being explicit.
    """
    num_layers = values["num_hidden_layers"]
    kept = [index for index in range(num_layers) if index not in set(pruned_layers)]
    values = dict(values)
    for key in family.per_layer_fields:
        if values.get(key) is not None:
            if len(values[key]) != num_layers:
                raise ValueError(
                    f"The dense config's `{key}` has {len(values[key])} entries for {num_layers} layers: "
                    "fix the config."
                )
            values[key] = [values[key][index] for index in kept]
    for key in family.layer_count_fields:
        if values.get(key) is not None:
            values[key] = sum(1 for index in kept if index < values[key])
    for key in family.layer_pattern_fields:
        values.pop(key, None)
    values["num_hidden_layers"] = len(kept)
    return values


def pruned_config(
    dense_config, pruned_layers: list[int], add_patches: bool = True, **metadata
) -> LinearPatchConfigMixin:
    """The LinearPatch config of `dense_config` (its family's, e.g. `LinearPatchQwen3Config`) with `pruned_layers`
    removed (one patch per gap if `add_patches`).

    Raises:
        ValueError: if the family is not supported (naming those that are), or the layers are invalid.
    """
    family = family_of(dense_config)
    if dense_config.model_type != family.dense_model_type:
        raise ValueError(
            f"{dense_config.model_type!r} is already a pruned LinearPatch checkpoint; prune its dense model instead."
        )
    num_layers = dense_config.num_hidden_layers
    pruned_layers = normalize_pruned_layers(pruned_layers, num_layers)
    values = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config"):
        values.pop(key, None)
    values = pruned_config_values(values, pruned_layers, family)
    values.update(
        original_num_hidden_layers=num_layers,
        pruned_layers=pruned_layers,
        patch_positions=None if add_patches else [],
    )
    values.update({key: value for key, value in metadata.items() if value is not None})
    config = family.config_class(**values)
    config.architectures = [family.causal_lm_class.__name__]
    # save_pretrained adds the entries of the saved class (AutoConfig, AutoModelForCausalLM) to this map; naming
    # the base model too lets `AutoModel.from_pretrained(..., trust_remote_code=True)` work without the package.
    config.auto_map = {"AutoModel": f"modeling_linearpatch.{family.model_class.__name__}"}
    return config


def patch_key(config: LinearPatchConfigMixin, position: int) -> str:
    """State-dict key of the patch before kept layer `position` (held by the final norm for a gap at the end)."""
    owner = "model.norm" if position == config.num_hidden_layers else f"model.layers.{position}"
    return f"{owner}.linear_patch.weight"


def patch_state_dict(config: LinearPatchConfigMixin, patches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict entries for `patches` (one C x C matrix per position in `config.patch_positions`)."""
    if len(patches) != len(config.patch_positions):
        raise ValueError(
            f"Got {len(patches)} patch matrices for {len(config.patch_positions)} gaps "
            f"({contiguous_gaps(config.pruned_layers)}); pass one per contiguous gap, in layer order."
        )
    size = config.hidden_size
    out = {}
    for position, patch in zip(config.patch_positions, patches, strict=True):
        if tuple(patch.shape) != (size, size):
            raise ValueError(
                f"Patch for position {position} has shape {tuple(patch.shape)}; expected ({size}, {size})."
            )
        out[patch_key(config, position)] = patch
    return out


def prune_layers(
    model: PreTrainedModel,
    layers: list[int] | range,
    patches: list[torch.Tensor] | None = None,
    *,
    add_patches: bool = True,
    copy: bool = False,
    **metadata,
) -> PreTrainedModel:
    r"""
    Build a pruned LinearPatch causal LM (`LinearPatchForCausalLM` for Llama, `LinearPatchQwen3ForCausalLM` for Qwen3,
    ...) from a dense causal LM of a supported family, without touching the dense model.

    The dense state dict is re-indexed by [`prune_state_dict`] and loaded into a fresh model of the pruned config, so
    `num_hidden_layers`, every attention's `layer_idx` and the KV cache all refer to the kept layers. Tied embeddings
    stay tied, and the dtype and device of the dense model are kept (the patches stay fp32 unless
    `keep_patch_in_fp32=False` is given).

    Args:
        model (`PreTrainedModel`):
            A dense causal LM of a supported family (`supported_model_types()`).
        layers (`list[int]`):
            Original indices of the decoder layers to remove; any set, one patch per maximal contiguous gap.
        patches (`list[torch.Tensor]`, *optional*):
            One C x C matrix per gap in layer order, applied as `h @ P`. Identity matrices when not given.
        add_patches (`bool`, *optional*, defaults to `True`):
            `False` gives plain pruning: no patch modules at all.
        copy (`bool`, *optional*, defaults to `False`):
            Clone the kept weights instead of sharing the dense model's tensors.
        **metadata:
            Stored in the config: `base_model`, `selection_metric`, `patch_kind`, `keep_patch_in_fp32`.

    Returns:
        `PreTrainedModel`: the family's LinearPatch causal LM, in eval mode if the dense model was.
    """
    config = pruned_config(model.config, layers, add_patches=add_patches, **metadata)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    config.dtype = dtype
    if patches is None:
        patches = [torch.eye(config.hidden_size) for _ in config.patch_positions]
    elif not add_patches and patches:
        raise ValueError("`patches` were given with `add_patches=False`; drop one of them.")
    patch_dtype = torch.float32 if config.keep_patch_in_fp32 else dtype
    state_dict = prune_state_dict(model.state_dict(), config.pruned_layers, model.config.num_hidden_layers)
    if copy:
        state_dict = {key: tensor.clone() for key, tensor in state_dict.items()}
    for key, patch in patch_state_dict(config, patches).items():
        state_dict[key] = patch.detach().to(device=device, dtype=patch_dtype).clone()
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    with torch.device(device), no_init_weights():
        pruned = family_of(config).causal_lm_class(config)
    # assign=True keeps each tensor's dtype (and shares storage unless `copy`), instead of casting into fresh fp32
    # parameters.
    missing, unexpected = pruned.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"The dense model's weights do not fit a {model.config.model_type} model of its own config: "
            f"missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}."
        )
    pruned.tie_weights()
    pruned.train(model.training)
    pruned.generation_config = model.generation_config
    return pruned


__all__ = [
    "normalize_pruned_layers",
    "patch_key",
    "patch_state_dict",
    "prune_layers",
    "prune_state_dict",
    "pruned_config",
]
