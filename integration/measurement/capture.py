"""Run a model up to a module and capture what enters it: the one way every pass that needs the residual stream at
some layer (calibration, the export's fit, the teacher cache, the outcome search) stops early."""

import contextlib

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once a pass has seen what it needs: the layers after it would be computed for nothing."""


def raise_stop(*args, **kwargs):
    """A forward (pre-)hook that ends the pass (any hook signature)."""
    raise StopForward


@contextlib.contextmanager
def stop_before(module: nn.Module | None):
    """While inside, a forward pass ends (with [`StopForward`]) when it reaches `module`; `None` stops nothing."""
    handle = module.register_forward_pre_hook(raise_stop) if module is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def run_until(model: nn.Module, module: nn.Module | None, **inputs) -> None:
    """`model(**inputs)`, ended where `module`'s input is ready (or by any hook that raises [`StopForward`])."""
    with stop_before(module):
        try:
            model(**inputs)
        except StopForward:
            pass


def capture_input(model: nn.Module, module: nn.Module, **inputs) -> torch.Tensor:
    """The hidden states that enter `module` during `model(**inputs)`; the pass stops there."""
    captured = {}

    def capture(_, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    # First of `module`'s pre-hooks: what enters it, before any hook changes it (the export's frames are pre-hooks,
    # which a layer-by-layer logits pass applies when it calls the module on what is captured here).
    handle = module.register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured["hidden"]


@contextlib.contextmanager
def recording(sites: dict, outputs: bool = False, to_cpu: bool = True):
    """While inside, every forward appends what enters each module of `sites` (key -> module; with `outputs`, what
    leaves it), detached (and moved to the CPU with `to_cpu`), to `records[key]`; yields `records`. The one way a
    pass records the residual stream at several places (the outcome search's gap inputs, the export's fit streams)."""
    records: dict = {key: [] for key in sites}

    def hook_for(key):
        def before(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            records[key].append(hidden.cpu() if to_cpu else hidden)

        def after(module, args, output):
            records[key].append(output.detach().cpu() if to_cpu else output.detach())

        return after if outputs else before

    handles = [
        module.register_forward_hook(hook_for(key))
        if outputs
        else module.register_forward_pre_hook(hook_for(key), with_kwargs=True)
        for key, module in sites.items()
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def pass_through(hidden_states, *args, **kwargs):
    """A decoder layer's forward that leaves the residual stream as it is (the layers a tail pass skips)."""
    return hidden_states


@contextlib.contextmanager
def logits_source(model, input_ids: torch.Tensor, hidden: torch.Tensor | None = None, first_layer: int = 0):
    """Yield `logits_of(windows: slice)`: `model`'s logits for those rows of `input_ids` (the teacher cache's, eval's
    and the export's held-out scoring's one way to get logits from a model in memory or run layer by layer).

    In memory this is the model's forward on the rows. Layer by layer, every window first goes through the decoder
    layers (each loaded once), then the final norm and the LM head are loaded and the causal LM's own forward runs
    per slice on the stored hidden states, so that what follows the base model (a logit soft-cap, say) is the
    family's. With `hidden` (`(windows, seq_len, C)`, layer by layer only) the pass starts from these hidden states
    entering decoder layer `first_layer` instead of the embeddings (the outcome search's tail forwards, every
    candidate of a gap in one pass); `input_ids` are then only the rows' labels."""
    layerwise = getattr(model, "layerwise", None)
    if layerwise is None:
        if hidden is not None:
            raise ValueError("logits_source starts from `hidden` only for a model run layer by layer.")
        device = next(model.parameters()).device
        yield lambda rows: model(input_ids[rows].to(device), use_cache=False).logits
        return
    from transformers.modeling_outputs import BaseModelOutputWithPast

    base = model.model
    if hidden is None:
        inputs, skipped = dict(input_ids=input_ids.to(layerwise.device)), []
    else:
        # A copy: the pass writes each layer's output over its input.
        inputs, skipped = dict(inputs_embeds=hidden.to(layerwise.device, copy=True)), list(base.layers[:first_layer])
    own_forwards = [layer.forward for layer in skipped]
    for layer in skipped:
        layer.forward = pass_through
    layerwise.in_place = True  # nothing needs a layer's input once its output is written
    try:
        hidden = capture_input(base, base.norm, **inputs, use_cache=False)
    finally:
        layerwise.in_place = False
        layerwise.close_bar()
        for layer, forward in zip(skipped, own_forwards, strict=True):
            layer.forward = forward
    norm, head = layerwise.load("model.norm"), layerwise.load("lm_head")
    current: dict[str, slice] = {}
    base_forward = base.forward
    base.forward = lambda *args, **kwargs: BaseModelOutputWithPast(
        last_hidden_state=norm(hidden[current["rows"]].to(layerwise.device))
    )

    def logits_of(rows: slice) -> torch.Tensor:
        current["rows"] = rows
        return model(input_ids[rows].to(layerwise.device), use_cache=False).logits

    try:
        yield logits_of
    finally:
        base.forward = base_forward
        layerwise.release(norm)
        layerwise.release(head)


__all__ = [
    "StopForward",
    "capture_input",
    "logits_source",
    "pass_through",
    "raise_stop",
    "recording",
    "run_until",
    "stop_before",
]
