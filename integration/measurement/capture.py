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

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured["hidden"]


__all__ = ["StopForward", "capture_input", "raise_stop", "run_until", "stop_before"]
