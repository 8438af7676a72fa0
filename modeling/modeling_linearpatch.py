# Hub-side file: `save_pretrained` copies it (and configuration_linearpatch.py) into every checkpoint, where it is
# imported by `trust_remote_code` on machines that have never installed `linearpatch`. It may import only
# torch / transformers / huggingface_hub. It is written as a diff against Llama: only what differs is overridden.
"""A layer-pruned Llama with one LinearPatch matrix on the residual stream after each gap."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_linearpatch import LinearPatchConfig


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


class LinearPatchDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer that first applies the patch of the gap just before it, if there is one."""

    def __init__(self, config: LinearPatchConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.linear_patch = (
            LinearPatch(config.hidden_size, config.keep_patch_in_fp32) if layer_idx in config.patch_positions else None
        )

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.linear_patch is not None:
            hidden_states = self.linear_patch(hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


class LinearPatchFinalNorm(LlamaRMSNorm):
    """The final RMSNorm, preceded by a patch when the pruned block reaches the last layer."""

    def __init__(self, config: LinearPatchConfig):
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


class LinearPatchPreTrainedModel(LlamaPreTrainedModel):
    config: LinearPatchConfig
    _no_split_modules = ["LinearPatchDecoderLayer"]
    _can_record_outputs = {"hidden_states": LinearPatchDecoderLayer, "attentions": LlamaAttention}

    def __init__(self, config: LinearPatchConfig, *inputs, **kwargs):
        # Not `super().__init__`: in the subclasses' MRO that is LlamaModel/LlamaForCausalLM, which would build every
        # Llama layer only for it to be replaced.
        PreTrainedModel.__init__(self, config, *inputs, **kwargs)
        # Every LinearPatch class (the base `LinearPatchModel` that vLLM builds, too) keeps its patches in fp32 when
        # loaded in bf16/fp16, unless the config opts out.
        self._keep_in_fp32_modules_strict = ["linear_patch"] if config.keep_patch_in_fp32 else []

    def _init_weights(self, module):
        super()._init_weights(module)
        # A checkpoint without a patch would be refused by `from_pretrained`; a fresh model starts as plain pruning.
        # `copy_` of an eye made on the weight's own device also works on `meta` (`eye_` builds on the CPU).
        if isinstance(module, LinearPatch):
            weight = module.weight
            init.copy_(weight, torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers only warns about missing/unexpected weights and initialises the missing ones at random. For the
        # decoder and its patches that is silent corruption (a truncated file, or a config that does not match the
        # weights), so refuse it. The head follows transformers' contract: a base-model checkpoint loaded with a head
        # reports the new head as missing, a causal-LM checkpoint loaded as the base model drops its head, and
        # `ignore_mismatched_sizes=True` re-initialises a resized embedding or head.
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        resizable = ("lm_head.", "embed_tokens.") if kwargs.get("ignore_mismatched_sizes") else ()
        problems = []
        missing = [key for key in info["missing_keys"] if not key.startswith("lm_head.")]
        if missing:
            problems.append(f"weights missing from the checkpoint: {sorted(missing)[:8]}")
        unexpected = [key for key in info["unexpected_keys"] if not key.startswith("lm_head.")]
        if unexpected:
            problems.append(f"weights the config has no place for: {sorted(unexpected)[:8]}")
        mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in info["mismatched_keys"]]
        mismatched = [key for key in mismatched if not any(part in key for part in resizable)]
        if mismatched:
            problems.append(f"weights of the wrong shape: {sorted(mismatched)[:8]}")
        if problems:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(
                f"The LinearPatch checkpoint {source!r} does not match its config "
                f"(num_hidden_layers={model.config.num_hidden_layers}, pruned_layers={model.config.pruned_layers}, "
                f"patch_positions={model.config.patch_positions}): " + "; ".join(problems) + ". The files are "
                "truncated or mixed from different checkpoints; re-export the model with `linearpatch prune`."
            )
        return (model, info) if want_info else model


class LinearPatchModel(LinearPatchPreTrainedModel, LlamaModel):
    def __init__(self, config: LinearPatchConfig):
        # Same as LlamaModel.__init__ with the patch-carrying layer and norm (not calling it avoids building every
        # layer twice).
        LinearPatchPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LinearPatchDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LinearPatchFinalNorm(config)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class LinearPatchForCausalLM(LinearPatchPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: LinearPatchConfig):
        LinearPatchPreTrainedModel.__init__(self, config)
        self.model = LinearPatchModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["LinearPatch", "LinearPatchForCausalLM", "LinearPatchModel", "LinearPatchPreTrainedModel"]
