"""Out-of-core pruning: write the pruned checkpoint tensor by tensor from the dense safetensors shards.

The tensor names come from the same pure [`prune_state_dict`] that `prune_layers` applies to a model in memory,
here applied to a name -> name map, so both paths keep, drop and renumber exactly the same tensors. No model is
materialised: large tensors are copied in blocks of rows, so peak memory is a few MB whatever the model.
"""

import logging
from pathlib import Path

import torch
from transformers import GenerationConfig

from linearpatch.common.errors import CheckpointMismatchError
from linearpatch.modeling import family_of, patch_state_dict, prune_state_dict

from ..models import write_streamed_model
from ..shards import PendingTensor, SafetensorsCheckpoint

logger = logging.getLogger("linearpatch")


def pruned_weight_plan(
    checkpoint: SafetensorsCheckpoint,
    config,
    patches: list[torch.Tensor],
    num_dense_layers: int,
    dtype: torch.dtype,
) -> list[tuple[str, PendingTensor]]:
    r"""
    What the pruned checkpoint's weights file holds, each tensor read from the dense shards only when written.

    Args:
        checkpoint (`SafetensorsCheckpoint`): the dense weights.
        config: the pruned LinearPatch config (from `pruned_config`).
        patches (`list[torch.Tensor]`): one C x C matrix per gap (empty for plain pruning).
        num_dense_layers (`int`): L of the dense model.
        dtype (`torch.dtype`): dtype of the floating weights (the patches stay fp32 when `keep_patch_in_fp32`).

    Raises:
        CheckpointMismatchError: when the dense weights lack tensors the pruned model needs.
    """
    with torch.device("meta"):
        expected = family_of(config).causal_lm_class(config).state_dict().keys()
    names = prune_state_dict({name: name for name in checkpoint.keys()}, config.pruned_layers, num_dense_layers)
    plan = []
    for new, old in names.items():
        if new not in expected:
            logger.info("linearpatch: %s is not a weight of the pruned model; not copied.", old)
            continue
        plan.append((new, checkpoint.pending(old, dtype)))
    patch_dtype = torch.float32 if config.keep_patch_in_fp32 else dtype
    for name, patch in patch_state_dict(config, patches).items():
        patch = patch.detach().to("cpu", patch_dtype)
        plan.append((name, PendingTensor(patch_dtype, tuple(patch.shape), lambda patch=patch: patch)))
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - tied - {name for name, _ in plan})
    if missing:
        raise CheckpointMismatchError(
            f"{checkpoint.folder} lacks weights the pruned model needs (first: {missing[0]!r}, {len(missing)} in "
            "all): the checkpoint does not match its config."
        )
    return [(name, pending) for name, pending in plan if name not in tied]


def write_pruned_checkpoint(
    folder: str | Path,
    checkpoint: SafetensorsCheckpoint,
    config,
    patches: list[torch.Tensor],
    dtype: torch.dtype = torch.float32,
    generation_config: GenerationConfig | None = None,
    max_shard_size: int = 5 * 1024**3,
    progress: bool = True,
) -> list[str]:
    r"""
    Write a pruned LinearPatch checkpoint (weights, config, remote-code files, generation config) into the existing
    (staging) `folder`, streaming the kept tensors from the dense shards.

    Args:
        folder (`str` or `Path`): the staging folder.
        checkpoint, config, patches, dtype: as for [`pruned_weight_plan`] (the dense depth is the pruned config's
            `original_num_hidden_layers`).
        generation_config (`GenerationConfig`, *optional*): the dense model's.
        max_shard_size (`int`, *optional*, defaults to 5 GB): bytes per weights shard; more shards get an index.

    Returns:
        `list[str]`: the weight files written.
    """
    plan = pruned_weight_plan(checkpoint, config, patches, config.original_num_hidden_layers, dtype)
    config.dtype = dtype
    return write_streamed_model(Path(folder), config, plan, generation_config, max_shard_size, progress)


__all__ = ["pruned_weight_plan", "write_pruned_checkpoint"]
