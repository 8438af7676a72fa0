"""The fold plan: how every patch of a LinearPatch model is folded into stock weights (see the package docstring), made
from the patches, the fit windows' streams and, for `auto`, held-out scores. A plan is a pure description (per-tensor
functions of the stock state dict): it applies to a model in memory or to tensors streamed from the shards, and it
is made without a pipeline ([`plan_model_folds`], [`fold_models`])."""

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import family_of

from ..choices import DENSE_OBJECTIVES, FOLD_OBJECTIVES, FOLDS, ROTATED_OBJECTIVE
from ..defaults import TEACHER_TOP_K
from ..measurement.capture import recording, run_until
from ..measurement.closeness import reference_of
from ..measurement.holdout import split_fit_heldout
from .fitting import fit_map, fit_rotated, relative_error
from .folding import (
    diagonal_maps,
    frame_norm_keys,
    frame_transforms,
    map_site,
    map_transforms,
    split_frame,
)
from .scoring import FoldScorer
from .stock import apply_plan, stock_from_state


def run_windows_until(model, module, input_ids: torch.Tensor) -> None:
    """Run every window of `input_ids` through `model`'s base model until `module` (for the hooks that capture what
    they need): one window at a time in memory; every window at once through a [`layerwise_model`], each layer loaded
    once."""
    layerwise = getattr(model, "layerwise", None)
    if layerwise is None:
        for window in input_ids:
            run_until(model.model, module, input_ids=window[None].to(model.device), use_cache=False)
        return
    try:
        run_until(model.model, module, input_ids=input_ids.to(layerwise.device), use_cache=False)
    finally:
        layerwise.close_bar()


@torch.no_grad()
def mlp_streams(model, position: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, m) of kept layer `position - 1` for every token of `input_ids`: the stream after its attention and its
    MLP output, in float64, `[tokens, C]`. `model` may be a [`layerwise_model`]: every window then goes through the
    layers up to `position - 1` one layer at a time."""
    layers = model.model.layers
    layer = layers[position - 1]
    where = family_of(model.config).residual
    after = layers[position] if position < len(layers) else model.model.norm  # the layers after it are not needed
    # The norm before the MLP reads the residual after attention; `mlp_output` produces what the MLP adds to it.
    with (
        recording({"a": layer.get_submodule(where.after_attention)}) as entering,
        recording({"m": layer.get_submodule(where.mlp_output)}, outputs=True) as leaving,
    ):
        run_windows_until(model, after, input_ids)
    size = model.config.hidden_size
    a = torch.cat([x.reshape(-1, size) for x in entering["a"]]).double()
    m = torch.cat([x.reshape(-1, size) for x in leaving["m"]]).double()
    return a, m


def original_index(config, position: int) -> int:
    """The dense layer that kept layer `position` was (the dense model's depth for the final norm)."""
    kept = [i for i in range(config.original_num_hidden_layers) if i not in set(config.pruned_layers)]
    return kept[position] if position < len(kept) else config.original_num_hidden_layers


@torch.no_grad()
def dense_streams(dense, config, positions, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Kept-layer position -> the dense model's residual stream where that kept layer was (entering its original
    layer, or the final norm), every token of `input_ids`, float64 `[tokens, C]`: the target of the dense fold
    objectives. `dense` may be a [`layerwise_model`]."""
    base = dense.model
    sites = {}
    for position in positions:
        index = original_index(config, position)
        sites[position] = base.layers[index] if index < len(base.layers) else base.norm
    depth = {id(layer): index for index, layer in enumerate(base.layers)} | {id(base.norm): len(base.layers)}
    last = max(sites.values(), key=lambda module: depth[id(module)])
    with recording(sites) as captured:
        run_windows_until(dense, last, input_ids)
    size = config.hidden_size
    return {p: torch.cat([x.reshape(-1, size) for x in chunks]).double() for p, chunks in captured.items()}


@dataclass
class FoldPlan:
    r"""
    How every patch is folded (see the module docstring).

    Args:
        config: the LinearPatch config it folds.
        described (`list[dict]`): per patch: position, how it was folded, whether exactly, the objective and the
            held-out score of every candidate (`auto`).
        maps (`dict[int, torch.Tensor]`): position -> the map folded there (`T`; `P` itself at layer 0), for every
            patch not folded as a scalar: what `distill --export` starts from.
        fixed (`dict[str, list]`): state-dict key -> the functions of the folds that are not maps (the scalar folds).
        frames (`dict[int, torch.Tensor]`): position -> the frame `R` of a `down-proj-rotated` fold (see
            `fitting.fit_rotated`): where `distill --export` starts its trained frames from.
        norms (`dict[str, torch.Tensor]`): the reading RMSNorms' weights that the frames absorb.
    """

    config: object
    described: list[dict]
    maps: dict[int, torch.Tensor]
    fixed: dict[str, list] = field(default_factory=dict)
    frames: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def transforms(
        self,
        maps: dict[int, torch.Tensor] | None = None,
        frames: dict[int, torch.Tensor] | None = None,
        writers: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, list]:
        """State-dict key -> the functions to apply to that tensor, in order: the fixed folds, then `maps` and
        `writers` (see `folding.writer_sites`), then `frames` (by default the plan's own and no writers;
        `distill --export` passes its trained ones)."""
        transforms = {key: list(functions) for key, functions in self.fixed.items()}
        _merge(transforms, map_transforms(self.config, self.maps if maps is None else maps, writers))
        _merge(transforms, frame_transforms(self.config, self.frames if frames is None else frames, self.norms))
        return transforms

    def unties(self, maps: dict[int, torch.Tensor] | None = None) -> bool:
        """Whether the export's head needs its own copy of the embeddings: a map at layer 0 changes the embeddings,
        a frame changes the head."""
        return 0 in (self.maps if maps is None else maps) or bool(self.frames)

    def stock(
        self,
        model,
        maps: dict[int, torch.Tensor] | None = None,
        frames: dict[int, torch.Tensor] | None = None,
        writers: dict[str, torch.Tensor] | None = None,
    ) -> PreTrainedModel:
        """The stock model of the LinearPatch `model` (its patches and any attached maps left out) with this plan
        folded in, `maps` and `frames` in place of the plan's own if given, and `writers` folded too."""
        maps = self.maps if maps is None else maps
        state = apply_plan(model, self.transforms(maps, frames, writers))
        return stock_from_state(state, model.config, self.unties(maps), model.generation_config)


def _scalar_transforms(config, position: int, ratio: float) -> dict[str, list]:
    """Divide what every kept layer from `position` on writes into the stream by `ratio` (the scalar fold)."""
    where = family_of(config).residual
    offset = where.writer_norm_offset
    transforms: dict[str, list] = {}
    for index in range(position, config.num_hidden_layers):
        for name in where.writers:
            prefix = f"model.layers.{index}.{name}"
            if offset is not None:  # output = normalised(x) * (offset + w)
                transforms[f"{prefix}.weight"] = [lambda t, r=ratio: ((offset + t.double()) / r - offset).to(t.dtype)]
            else:
                for key in (f"{prefix}.weight", f"{prefix}.bias"):
                    transforms[key] = [lambda t, r=ratio: (t.double() / r).to(t.dtype)]
    return transforms


def _merge(transforms: dict[str, list], more: dict[str, list]) -> None:
    for key, functions in more.items():
        transforms.setdefault(key, []).extend(functions)


def plan_folds(
    config,
    patches: dict[int, torch.Tensor],
    fold: str,
    stream_at=None,
    ridge: float = 1e-3,
    dense_at=None,
    score=None,
    weight_of=None,
) -> FoldPlan:
    """How to fold every patch (see the module docstring), as functions of single tensors: a pure plan that applies
    to a state dict in memory or to tensors streamed from the shards one by one.

    Args:
        config: the LinearPatch config.
        patches (`dict[int, torch.Tensor]`): kept-layer position -> P (float64).
        fold (`str`): one of `FOLDS`: `auto`, an objective of `FOLD_OBJECTIVES`, or `scalar`.
        stream_at (`callable`, *optional*): `position -> (a, m)` on the fit windows (see [`mlp_streams`]), needed by
            every map fold for gaps after layer 0.
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser, relative to the mean diagonal of
            the (weighted) Gram matrix.
        dense_at (`callable`, *optional*): `position -> y`, the dense model's stream there on the same windows (see
            [`dense_streams`]); needed by the dense objectives, which `auto` leaves out without it.
        score ([`FoldScorer`], *optional*): `(position, maps, frames) -> {outcome: value}` held out, of the patched
            model with `maps` (and `frames`) in place of that gap's patch (`{}`: the patch kept); its `by` outcome
            ranks the candidates. Needed by `auto`.
        weight_of (`callable`, *optional*): state-dict key -> the checkpoint's tensor; `down-proj-rotated` reads the
            norms it absorbs with it (`auto` leaves that objective out without it).

    Returns:
        [`FoldPlan`]
    """
    if fold not in FOLDS:
        raise LinearPatchError(f"Unknown fold {fold!r}: choose one of {', '.join(FOLDS)}.")
    where = family_of(config).residual
    diagonal = diagonal_maps(config)
    rotatable = where.rotatable and weight_of is not None
    if fold == ROTATED_OBJECTIVE and not where.rotatable:
        raise LinearPatchError(
            f"--fold {ROTATED_OBJECTIVE} rotates the stream after each gap, which {config.model_type}'s layers cannot "
            "hold (their blocks do not all read it through plain RMSNorms and write it through Linear layers): "
            "choose --fold auto or down-proj-dense."
        )
    transforms: dict[str, list] = {}
    described, maps, frames = [], {}, {}
    for position in sorted(patches):
        patch = patches[position]
        size = patch.shape[0]
        if position == 0:
            maps[0] = patch
            described.append(dict(position=0, how="embed_tokens @ P", exact=True))
            continue
        scalar = torch.allclose(patch, patch.diagonal().mean() * torch.eye(size, dtype=patch.dtype), atol=1e-6)
        ratio = float(patch.diagonal().mean())
        exact_scalar = scalar and where.reads_through_norms
        scalar_how = f"{' and '.join(where.writers)} from kept layer {position} on divided by the scalar {ratio:.6g}"
        if fold == "scalar" or scalar and fold == "down-proj":
            _merge(transforms, _scalar_transforms(config, position, ratio))
            described.append(dict(position=position, how=scalar_how, exact=exact_scalar, objective="scalar"))
            continue
        if fold == "auto":
            objectives = [o for o in FOLD_OBJECTIVES if o not in DENSE_OBJECTIVES or dense_at is not None]
            if not rotatable:
                objectives = [o for o in objectives if o != ROTATED_OBJECTIVE]
            if scalar:  # the scalar fold reproduces this patch itself: it stands in for the patched objective
                objectives = ["scalar", *objectives[1:]]
            if len(objectives) > 1 and score is None:
                raise LinearPatchError("The auto fold needs held-out windows to score its candidates.")
        else:
            objectives = [fold]
        if stream_at is None:
            raise LinearPatchError(f"The {fold} fold needs calibration windows (input_ids).")
        needs_dense = any(objective in DENSE_OBJECTIVES for objective in objectives)
        if dense_at is None and needs_dense:
            raise LinearPatchError(f"The {fold} fold needs the dense model (pass --dense MODEL).")
        a, m = stream_at(position)
        dense = dense_at(position) if needs_dense else None
        candidates, candidate_frames, errors = {}, {}, {}
        for objective in objectives:
            if objective == "scalar":
                candidates[objective] = None
                continue
            target = (a + m) @ patch if objective == "down-proj" else dense
            if objective == ROTATED_OBJECTIVE:
                candidates[objective], candidate_frames[objective] = fit_rotated(a, m, target, ridge)
            else:
                candidates[objective] = fit_map(objective, a, m, target, diagonal, ridge)
            errors[objective] = relative_error(a, m, target, candidates[objective], candidate_frames.get(objective))
        measured = {}
        if len(candidates) > 1:
            measured = {
                objective: score(
                    position,
                    {} if transform is None else {position: transform},
                    {position: candidate_frames[objective]} if objective in candidate_frames else {},
                )
                for objective, transform in candidates.items()
            }
            chosen = min(candidates, key=lambda objective: measured[objective][score.by])  # the first on a tie
        else:
            chosen = objectives[0]
        entry = dict(position=position, objective=chosen)
        if measured:
            entry["heldout_perplexity"] = {objective: outcomes["loss"] for objective, outcomes in measured.items()}
            if score.by != "loss":
                entry["score"] = score.by
                entry[f"heldout_{score.by}"] = {
                    objective: outcomes[score.by] for objective, outcomes in measured.items()
                }
        if chosen == "scalar":
            _merge(transforms, _scalar_transforms(config, position, ratio))
            described.append(dict(entry, how=scalar_how, exact=exact_scalar))
            continue
        maps[position] = candidates[chosen]
        how = map_site(config, position)
        if chosen in candidate_frames:
            frames[position] = candidate_frames[chosen]
            after = "the head" if position == config.num_hidden_layers else f"kept layers {position}.. and the head"
            how = f"{how}; {after} rotated and rescaled (scale {split_frame(frames[position])[0]:.4g})"
        described.append(dict(entry, how=how, exact=False, relative_error=errors[chosen]))
    norms = {key: weight_of(key).double() for key in frame_norm_keys(config, min(frames))} if frames else {}
    return FoldPlan(config, sorted(described, key=lambda item: item["position"]), maps, transforms, frames, norms)


def plan_model_folds(
    model, fold: str, input_ids: torch.Tensor | None = None, dense=None, ridge: float = 1e-3, score: str = "loss"
) -> FoldPlan:
    """The [`FoldPlan`] of the LinearPatch `model` (in memory or a [`layerwise_model`]).

    Args:
        model: the LinearPatch causal LM (not modified).
        fold (`str`): one of `FOLDS`.
        input_ids (`torch.LongTensor`, *optional*): calibration windows, needed by every map fold for gaps after
            layer 0; `auto` holds out one in eight of them to score its candidates (when it has `dense`).
        dense (*optional*): the dense model (in memory or a [`layerwise_model`]) for the dense objectives; `auto`
            without it compares only the folds that need none.
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser.
        score (`str`, *optional*, defaults to `"loss"`): what ranks `auto`'s candidates: `loss` (held-out
            perplexity) or `kl` (held-out KL to `dense`).
    """
    config = model.config
    patches = _patch_matrices(model)
    fit_ids, heldout_ids = input_ids, None
    needs_fit = any(position > 0 for position in patches) and fold != "scalar"
    if needs_fit and fold == "auto" and dense is not None and input_ids is not None:
        # Without the dense model, auto has one candidate per gap: nothing to score, every window fits it.
        fit_ids, heldout_ids = split_fit_heldout(input_ids)
    stream_at = None if fit_ids is None else lambda position: mlp_streams(model, position, fit_ids)
    dense_at = None
    if dense is not None and fit_ids is not None:
        streams = {}

        def dense_at(position: int) -> torch.Tensor:
            if not streams:  # one pass of the dense model for every gap, on first use
                gaps = [p for p in patches if p > 0]
                streams.update(dense_streams(dense, config, gaps, fit_ids))
            return streams[position]

    scorer = None
    if heldout_ids is not None:
        reference = reference_of(dense, heldout_ids, TEACHER_TOP_K)[0] if score == "kl" else None
        scorer = FoldScorer(model, heldout_ids, score, reference)
    return plan_folds(config, patches, fold, stream_at, ridge, dense_at, scorer, _weight_reader(model))


def _weight_reader(model):
    """State-dict key -> the tensor of a LinearPatch model in memory, or read from the shards of a
    [`layerwise_model`]."""
    layerwise = getattr(model, "layerwise", None)
    if layerwise is not None:
        return layerwise.checkpoint.read
    return lambda key: model.get_parameter(key).detach()


def _patch_matrices(model) -> dict[int, torch.Tensor]:
    """Kept-layer position -> P (float64) of a LinearPatch model (in memory, or read from the shards of a
    [`layerwise_model`])."""
    from linearpatch.modeling.pruning import patch_key

    read = _weight_reader(model)
    return {p: read(patch_key(model.config, p)).double() for p in model.config.patch_positions}


def fold_state_dict(
    model, fold: str, input_ids: torch.Tensor | None = None, ridge: float = 1e-3, dense=None
) -> tuple[dict, list]:
    """The state dict of the stock (family) equivalent of the LinearPatch `model` with every patch folded (see
    [`plan_model_folds`]), and a description of each fold.

    Args:
        model (`PreTrainedModel`): the LinearPatch causal LM (not modified).
        fold (`str`): one of `FOLDS`.
        input_ids (`torch.LongTensor`, *optional*): calibration windows, needed by the map folds for gaps after
            layer 0.
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser.
        dense (*optional*): the dense model, for the dense objectives.
    """
    plan = plan_model_folds(model, fold, input_ids, dense, ridge)
    return apply_plan(model, plan.transforms()), plan.described


def export_model(
    model, fold: str = "auto", input_ids: torch.Tensor | None = None, dense=None, score: str = "loss"
) -> tuple[PreTrainedModel, list]:
    """A stock causal LM of the family (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...) equivalent (exactly or
    approximately, see [`fold_state_dict`]) to the LinearPatch `model`, and a description of each fold.

    Args:
        model (`PreTrainedModel`): the LinearPatch causal LM (not modified).
        fold (`str`, *optional*, defaults to `"auto"`): one of `FOLDS`.
        input_ids (`torch.LongTensor`, *optional*): calibration windows (see [`plan_model_folds`]).
        dense (*optional*): the dense model the checkpoint was pruned from, for the dense objectives.
        score (`str`, *optional*, defaults to `"loss"`): what ranks `auto`'s candidates (`loss` or `kl`).
    """
    plan = plan_model_folds(model, fold, input_ids, dense, score=score)
    return plan.stock(model), plan.described


@contextlib.contextmanager
def fold_models(
    checkpoint: str,
    dense: str | None,
    device: str,
    sequential: bool,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    max_memory: str | int | None = None,
):
    """Yield `(model, dense_model)` to plan the folds of `checkpoint` with, in `dtype`: both loaded whole, or run layer
    by layer from their shards when `sequential` (each within `max_memory`); `dense_model` is `None` without `dense`.
    Both are released on exit."""
    from ..layerwise import layerwise_model
    from ..models import load_model

    with contextlib.ExitStack() as stack:
        if sequential:
            model = stack.enter_context(
                layerwise_model(checkpoint, dtype, device, progress=progress, max_memory=max_memory)
            )
            dense_model = None
            if dense is not None:
                opened = layerwise_model(dense, dtype, device, progress=progress, max_memory=max_memory)
                dense_model = stack.enter_context(opened)
        else:
            model, _ = load_model(checkpoint, dtype=dtype, device=device, kind="checkpoint")
            dense_model = None
            if dense is not None:
                dense_model, _ = load_model(dense, dtype=dtype, device=device, kind="dense")
                stack.callback(dense_model.to, "meta")  # free its memory as soon as the fold is planned
        yield model, dense_model


__all__ = [
    "FoldPlan",
    "dense_streams",
    "export_model",
    "fold_models",
    "fold_state_dict",
    "original_index",
    "plan_folds",
    "plan_model_folds",
    "run_windows_until",
    "mlp_streams",
]
