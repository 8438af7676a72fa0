"""The family's stock architecture (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...) that an export writes: its config,
its model, and the state dict of a LinearPatch model with a fold plan's per-tensor functions applied."""

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import family_of

from .folding import FOLD_HOLDERS

# Config fields that only a LinearPatch checkpoint has.
_LINEARPATCH_FIELDS = (
    "original_num_hidden_layers",
    "pruned_layers",
    "patch_positions",
    "keep_patch_in_fp32",
    "base_model",
    "selection_metric",
    "patch_kind",
    "auto_map",
    "architectures",
    "model_type",
    "transformers_version",
)


def stock_config(config, untie: bool = False) -> PreTrainedConfig:
    """The family's own config (`LlamaConfig`, `Qwen3Config`, ...) of a LinearPatch config: same kept layers (and
    per-layer fields), no LinearPatch fields, no remote code; with `untie` (a frame, or the embeddings folded: a map at
    layer 0) the head keeps its own copy."""
    family = family_of(config)
    values = {key: value for key, value in config.to_dict().items() if key not in _LINEARPATCH_FIELDS}
    stock = family.dense_config_class(**values)
    stock.architectures = [family.dense_causal_lm_class.__name__]
    stock.tie_word_embeddings = config.tie_word_embeddings and not untie
    return stock


def stock_model(config) -> PreTrainedModel:
    """An uninitialised stock causal LM of `config`'s family (build it under `no_init_weights`)."""
    return family_of(config).dense_causal_lm_class(config)


def apply_folds(tensor: torch.Tensor, functions: list) -> torch.Tensor:
    for function in functions:
        tensor = function(tensor)
    return tensor


def apply_plan(model, transforms: dict[str, list]) -> dict:
    """`model`'s state dict without patches (the head's own copy where it is tied), with `transforms` applied."""
    state = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if ".linear_patch." not in key and not key.startswith(tuple(f"{name}." for name in FOLD_HOLDERS))
    }
    if model.config.tie_word_embeddings:  # the head's own copy: a fold at layer 0 or a frame makes them differ
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    for key, functions in transforms.items():
        if key in state:
            state[key] = apply_folds(state[key], functions)
    return state


def stock_from_state(state: dict, config, untie: bool, generation_config=None) -> PreTrainedModel:
    """The stock causal LM of the LinearPatch `config`'s family holding the folded `state`; its head keeps its own
    copy when `untie` (a map at layer 0 folded into the embeddings, or a frame into the head)."""
    stock_configuration = stock_config(config, untie)
    stock_configuration.dtype = state["model.embed_tokens.weight"].dtype
    with torch.device(state["model.embed_tokens.weight"].device), no_init_weights():
        stock = stock_model(stock_configuration)
    missing, unexpected = stock.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise LinearPatchError(
            f"Folded weights do not fit a stock {type(stock).__name__}: missing {missing}, unexpected {unexpected}."
        )
    if stock_configuration.tie_word_embeddings:
        stock.tie_weights()
    if generation_config is not None:
        stock.generation_config = generation_config
    return stock.eval()


def plain_model(patched) -> PreTrainedModel:
    """Plain pruning of a LinearPatch model: a stock model of its family with its weights and no patches."""
    return stock_from_state(apply_plan(patched, {}), patched.config, untie=False)


__all__ = ["apply_folds", "apply_plan", "plain_model", "stock_config", "stock_from_state", "stock_model"]
