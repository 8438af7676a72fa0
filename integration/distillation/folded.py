"""`linearpatch distill --export`: distil the export's fold maps instead of the patches, and write a stock model.

The stock export replaces each patch by a map `T` on the MLP output of the kept layer before its gap (see
`folding.py`), which folds exactly into that layer's `down_proj`. Here those maps are what is trained: the student is
the pruned checkpoint with its patches bypassed and the best training-free maps attached (the export's `--fold auto`,
fitted to the teacher, which is the dense model); the maps are the only trainable parameters, under the same PEFT
LN-tuning adapter, teacher cache and Trainer as `distill`; the trained maps are folded into the stock weights. A gap
at layer 0 trains its map on the token embeddings (started from the patch itself) and folds it exactly into them; a
gap that reaches the last layer trains the map on the last kept layer's MLP output. A gap whose scalar patch folds
exactly (Prune&Comp) keeps that fold and is not trained.
"""

import logging

import torch

from ..folding import FOLD_MAPS, attached_maps, detach_fold_maps

log = logging.getLogger("linearpatch")


def training_free_plan(checkpoint: str, teacher: str, windows, device: str, sequential: bool, progress: bool = True):
    """The export's best training-free fold of `checkpoint` (`--fold auto`, dense objectives fitted to `teacher`) on
    the calibration `windows`: a [`FoldPlan`]. The checkpoint and the teacher are held only while it is planned (run
    layer by layer when `sequential`)."""
    from ..export import InMemoryExport, SequentialExport
    from ..shards import SafetensorsCheckpoint

    if sequential:
        from ..models import load_config, resolve_model

        path = resolve_model(checkpoint)
        pipeline = SequentialExport(SafetensorsCheckpoint(path), load_config(path), device, progress, 0)
    else:
        pipeline = InMemoryExport(checkpoint, device)
    pipeline.fold("auto", windows, teacher)
    return pipeline.plan


def target_modules(maps: dict[int, torch.Tensor]) -> list[str]:
    """The PEFT target names of the attached maps (`fold_maps.19`, ...)."""
    return [f"{FOLD_MAPS}.{position}" for position in sorted(maps)]


@torch.no_grad()
def fold_trained(merged, handles: list, plan, check_ids: torch.Tensor | None = None):
    """The stock model of the student with its trained maps folded in, and the largest logit difference between the
    two on `check_ids` (fp32 compute: the fold is exact, so this is rounding).

    Args:
        merged: the student after `merge_and_unload()` (the maps hold their trained values).
        handles (`list`): from [`attach_fold_maps`]; removed here.
        plan (`FoldPlan`): the training-free plan (its scalar folds are kept).
        check_ids (`torch.LongTensor`, *optional*): windows to compare the student and the export on.

    Returns:
        `(stock, maps, max_difference)`
    """
    maps = attached_maps(merged)
    reference = None
    if check_ids is not None:
        device = next(merged.parameters()).device
        reference = merged(check_ids.to(device), use_cache=False).logits.float().cpu()
    detach_fold_maps(merged, handles)
    stock = plan.stock(merged, maps)
    difference = None
    if reference is not None:
        device = next(stock.parameters()).device
        logits = stock(check_ids.to(device), use_cache=False).logits.float().cpu()
        difference = float((logits - reference).abs().max())
    return stock, maps, difference


__all__ = ["fold_trained", "target_modules", "training_free_plan"]
