"""Distilling a student that does not fit: its decoder layers stay in the safetensors shards, in forward and backward.

Only the patches train, so most of the student is frozen weights that each step needs once forward and once backward,
one layer at a time. [`streamed_student`] builds the checkpoint's own causal LM with empty weights (as
[`layerwise_model`] does) and keeps resident only what is small or always needed: the patches (trainable, fp32),
the final norm and the LM head. Each decoder layer then runs as:

- forward, before the first trainable site: loaded, run without gradients, freed (or not run at all: with the
  teacher cache's stream, each step starts at the first patch);
- forward, from the first patch on: loaded, run, freed, under activation checkpointing (`use_reentrant=False`), so
  that only the layer's input is kept (windows x seq_len x C);
- backward, in reverse order: the checkpoint runs the layer again, which loads it again, and the gradient goes
  through it to the patch and to the layer before. The weights the backward needs are the ones the recomputation
  loaded; they are freed when that layer's backward is done.

While one layer computes, the next one it needs (the following one forward, the previous one backward) is read in a
background thread. So the student's peak memory is about two layers, the head and the kept inputs, whatever its
depth, and the loss, the gradients and every step equal the in-memory student's (tested to 1e-5). The Trainer still
drives the optimizer, the schedule, the checkpoints and the PEFT adapter; neither it nor accelerate moves the model
to the device (`place_model_on_device=False`, and an `hf_device_map` that says where the weights are): it loads
each layer there itself.
"""

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..layerwise import LayerwiseModel, layerwise_model
from ..shards import PendingTensor, SafetensorsCheckpoint

# Modules that stay resident: the patches (trained), and what every step's loss reads.
RESIDENT = ("model.norm", "lm_head")


def _frozen_state(layerwise: LayerwiseModel, name: str) -> dict[str, torch.Tensor]:
    """The frozen weights of module `name` from the shards (its patch, trained in memory, left out)."""
    prefix = name + "."
    return {
        key[len(prefix) :]: layerwise.checkpoint.read(key, layerwise.dtype, layerwise.device)
        for key in layerwise.checkpoint.keys()
        if key.startswith(prefix) and ".linear_patch." not in key
    }


def _load_frozen(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in state.items():
        holder, _, leaf = key.rpartition(".")
        owner = module.get_submodule(holder) if holder else module
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def _release_frozen(module: torch.nn.Module) -> None:
    """Put the frozen weights back on the meta device (new Parameter objects: a backward that still holds the loaded
    tensors keeps them until it is done); the patches, which train, stay."""
    for name, submodule in module.named_modules():
        if "linear_patch" in name:  # the patch and its PEFT copies are resident
            continue
        for leaf, parameter in list(submodule._parameters.items()):
            if parameter is not None and not parameter.requires_grad and parameter.device.type != "meta":
                submodule._parameters[leaf] = torch.nn.Parameter(parameter.to("meta"), requires_grad=False)


class _Reader:
    """The frozen weights of the layer a step needs, with the next one it will need read ahead by the layerwise
    model's reader (`LayerwiseModel.prefetch`): the next layer in the forward, the previous one in the backward,
    which stops at the first trained layer. Off when two layers do not fit `--max-memory` (`read_ahead`)."""

    def __init__(self, layerwise: LayerwiseModel, count: int):
        self.layerwise, self.count = layerwise, count
        self.read = functools.partial(_frozen_state, layerwise)
        self.first_trained = 0  # the first layer the backward runs again (set by the forward)
        self.trains_before = False  # whether the layer that ran last was trained through

    def state(self, index: int, backward: bool) -> dict[str, torch.Tensor]:
        state = self.layerwise.take(f"model.layers.{index}", self.read)
        following = index - 1 if backward else index + 1
        lowest = self.first_trained if backward else 0
        if self.layerwise.read_ahead and lowest <= following < self.count:
            self.layerwise.prefetch(f"model.layers.{following}", self.read)
        return state


def _streamed_forward(reader: _Reader, layer: torch.nn.Module, index: int):
    own_forward = type(layer).forward.__get__(layer)
    forward_pass = [False]  # set while the forward runs the layer; a call of `run` outside it is the recomputation

    def run(hidden_states, *args, **kwargs):
        _load_frozen(layer, reader.state(index, backward=not forward_pass[0]))
        try:
            return own_forward(hidden_states.to(reader.layerwise.device), *args, **kwargs)
        finally:
            _release_frozen(layer)

    def forward(hidden_states, *args, **kwargs):
        trains = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(parameter.requires_grad for parameter in layer.parameters())
        )
        forward_pass[0] = True
        if trains and (index == 0 or not reader.trains_before):
            reader.first_trained = index
        reader.trains_before = trains
        try:
            if not trains:  # before the first patch: nothing to carry a gradient back to
                with torch.no_grad():
                    return run(hidden_states, *args, **kwargs)
            return checkpoint(run, hidden_states, *args, use_reentrant=False, **kwargs)
        finally:
            forward_pass[0] = False

    return forward


@contextlib.contextmanager
def streamed_student(
    path: str | Path, dtype: torch.dtype, device: str | torch.device, max_memory: str | int | None = None
) -> Iterator[torch.nn.Module]:
    r"""
    The LinearPatch checkpoint in the folder `path` as a trainable student whose decoder layers are read from the
    shards as they run, forward and backward (see the module docstring).

    Args:
        path (`str` or `Path`): the checkpoint folder.
        dtype (`torch.dtype`): compute dtype (the patches stay fp32).
        device (`str` or `torch.device`): compute device.
        max_memory (`str` or `int`, *optional*): `--max-memory`, as for [`layerwise_model`].

    Yields:
        `PreTrainedModel`: the student, its patches loaded and trainable, ready for [`get_patch_peft_model`].
    """
    with layerwise_model(path, dtype, device, progress=False, max_memory=max_memory) as model:
        layerwise = model.layerwise
        for name in RESIDENT:
            layerwise.load(name)
        for name, module in model.named_modules():
            if name.endswith("linear_patch") and not name.startswith(RESIDENT):
                prefix = name + "."
                state = {
                    key[len(prefix) :]: layerwise.checkpoint.read(key, None, layerwise.device)
                    for key in layerwise.checkpoint.keys()
                    if key.startswith(prefix)
                }
                module.load_state_dict(state, strict=True, assign=True)
        reader = _Reader(layerwise, len(model.model.layers))
        for index, layer in enumerate(model.model.layers):
            layer.forward = _streamed_forward(reader, layer, index)
        # Where the weights are, as big-model inference says it: accelerate's `prepare` then leaves the model where it
        # is instead of moving its empty layers to the device.
        model.hf_device_map = {"model.layers": "disk", "": str(layerwise.device)}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Data parallel, each rank with its own streamed student: accelerate refuses a model with a device map
            # in distributed mode unless told (its own switch) that the map is the model's business, as here.
            os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"
        yield model


def write_streamed_checkpoint(
    folder: Path, source: SafetensorsCheckpoint, merged, storage: torch.dtype, max_shard_size: int, progress: bool
) -> list[str]:
    """Write the distilled checkpoint into the (staging) `folder` without holding it: every tensor streamed from the
    student's shards in `storage`, the trained patches (from `merged`, the student after `merge_and_unload`) in their
    place, then the config, the remote-code files and the generation config."""
    from ..models import generation_config_of, write_streamed_model

    config = merged.config
    keep_fp32 = getattr(config, "keep_patch_in_fp32", True)
    trained = {
        key: tensor.detach().to("cpu", torch.float32 if keep_fp32 else storage)
        for key, tensor in merged.state_dict().items()
        if ".linear_patch." in key
    }
    plan = []
    for key in source.keys():
        if key in trained:
            tensor = trained[key]
            plan.append((key, PendingTensor(tensor.dtype, tuple(tensor.shape), lambda tensor=tensor: tensor)))
        else:
            plan.append((key, source.pending(key, storage)))
    config.dtype = storage
    return write_streamed_model(folder, config, plan, generation_config_of(source.folder), max_shard_size, progress)


__all__ = ["streamed_student", "write_streamed_checkpoint"]
