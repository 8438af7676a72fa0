"""Export a LinearPatch checkpoint to its family's stock architecture (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...),
for engines that refuse remote code.

A patch `h <- h P` on the residual stream cannot be folded exactly into the neighbouring weights in general (RMSNorm
commutes only with scalars and orthogonal maps), so the export folds it, exactly where it can and approximately
elsewhere, and measures what that costs:

- a gap at layer 0: the patch acts on the token embeddings, so `embed_tokens <- embed_tokens @ P` is exact (the head
  is untied first if it was tied);
- `scalar` (Prune&Comp): a scalar patch r before kept layer p equals dividing what every kept layer from p on writes
  into the residual stream by r (the writers of the family's `ResidualLayout`: `o_proj` and `down_proj`; in Gemma 3
  the `(1 + w)` of the norms after them, in OLMo 2 their `w`): the
  stream after the gap is then the patched one divided by r, and every later layer and the final norm read it
  through a scale-invariant RMSNorm. Exact up to RMSNorm's eps (relative error about
  eps / mean(h^2) of the stream after the gap, which is large in real models, so below 1e-6 there); for any other
  patch r is its mean scale `trace(P) / C` (an approximation). Dividing after the gap rather than multiplying the
  embeddings and the layers before it keeps the eps error away from the small early-layer streams;
- a map fold (ReplaceMe-style; see `folding.py`): a C x C map T on the MLP output `m` of kept layer p-1, folded
  exactly into its `down_proj` (`W <- T^T W`; a diagonal T into the norm after it in Gemma 3 and OLMo 2), fitted on
  calibration text so that `a + m T` (`a` the stream after that layer's attention) reproduces an objective:
  `down-proj` the patched stream `(a + m) P`, `down-proj-dense` and `down-proj-cosine` the dense model's stream
  after the removed block (least squares, or cosine distance), which skips the patch's own approximation;
  `down-proj-rotated` fits, with the map, a rotation and scale of the stream after the gap, folded exactly (up to
  RMSNorm's eps) into every layer after it and the head (Llama-like layouts; the head is untied). `auto` (the
  default) fits every objective per gap, scores each on held-out calibration windows (one in eight, as `--patch
  auto` does) and keeps the best; a scalar patch's exact scalar fold is then a candidate too.

`linearpatch_export.json` beside the weights records every candidate's score, and held-out perplexity of the patched
checkpoint, the export and plain pruning, side by side.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from linearpatch.common.errors import LinearPatchError, first_line
from linearpatch.common.files import atomic_directory
from linearpatch.common.names import EXPORT_RECORD
from linearpatch.modeling import family_of

from .choices import DENSE_OBJECTIVES, FOLD_OBJECTIVES, FOLDS, ROTATED_OBJECTIVE
from .data import local_text_file, token_windows
from .defaults import calibration_sizes, perplexity_sizes
from .folding import (
    FOLD_FRAMES,
    FOLD_MAPS,
    attach_fold_maps,
    detach_fold_maps,
    diagonal_maps,
    fit_map,
    fit_rotated,
    frame_norm_keys,
    frame_transforms,
    map_site,
    map_transforms,
    relative_error,
    split_frame,
)
from .layerwise import choose_sequential
from .measurement.capture import run_until
from .requests import ExportRequest
from .shards import SafetensorsCheckpoint, parse_size

logger = logging.getLogger("linearpatch")

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


@dataclass
class ExportReport:
    r"""
    What `export_checkpoint` did (saved as `linearpatch_export.json`).

    Args:
        source (`str`): the LinearPatch checkpoint's Hub id, when it has one. fold (`str`): one of `FOLDS`.
        base_model (`str`): the dense model the checkpoint was pruned from.
        pruned_layers (`list[int]`), patch_positions (`list[int]`): from the checkpoint.
        folds (`list[dict]`): per patch: position, how it was folded, whether exactly, the objective kept and (for
            `auto`) the held-out calibration perplexity of every candidate.
        perplexity (`dict`): held-out perplexity per corpus of `patched`, `export` and `plain` pruning (empty when
            skipped: a sequential export, or `eval_windows=0`).
        calibration (`dict`): the windows `down-proj` was fitted on.
        architecture (`str`): the stock class written, e.g. `Qwen3ForCausalLM`.
        output (`str`), seconds (`float`).
        num_layers (`int`): the kept layers (a patch at this position acts before the final norm).
        dense (`str`, *optional*): the dense model the dense objectives were fitted to.
        distilled (`dict`): for `distill --export`, the training's report and the held-out perplexity of the
            training-free fold it started from.
    """

    source: str | None
    fold: str
    base_model: str | None
    pruned_layers: list[int]
    patch_positions: list[int]
    folds: list[dict] = field(default_factory=list)
    perplexity: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    architecture: str = ""
    output: str = ""
    seconds: float = 0.0
    num_layers: int = 0
    dense: str | None = None
    distilled: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        """Each fold, the held-out comparison and where the model went: what `linearpatch export` prints."""
        lines = []
        for fold in self.folds:
            exact = "exact" if fold["exact"] else f"approximate (fit error {fold.get('relative_error', 0):.3f})"
            where = "the final norm" if fold["position"] >= self.num_layers else f"kept layer {fold['position']}"
            objective = f" [{fold['objective']}]" if "objective" in fold else ""
            lines.append(f"patch before {where}: {fold['how']}{objective}, {exact}")
            scores = fold.get("heldout_perplexity")
            if scores:
                shown = ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
                lines.append(f"  held-out calibration perplexity: {shown}")
        if self.perplexity:  # skipped by a sequential export
            corpora = list(next(iter(self.perplexity.values())))
            lines += ["| model | " + " | ".join(corpora) + " |", "|---|" + "---|" * len(corpora)]
            for name, values in self.perplexity.items():
                lines.append(f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in corpora) + " |")
        lines.append(f"Wrote a stock {self.architecture} (no remote code) to {self.output} (report: {EXPORT_RECORD})")
        return "\n".join(lines)


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


def _run_windows_until(model, module, input_ids: torch.Tensor) -> None:
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
def _stream_at(model, position: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, m) of kept layer `position - 1` for every token of `input_ids`: the stream after its attention and its
    MLP output, in float64, `[tokens, C]`. `model` may be a [`layerwise_model`]: every window then goes through the
    layers up to `position - 1` one layer at a time."""
    layers = model.model.layers
    layer = layers[position - 1]
    where = family_of(model.config).residual
    captured = {}

    def before_mlp(module, args):
        captured.setdefault("a", []).append(args[0].detach().cpu())

    def mlp_output(module, args, output):
        captured.setdefault("m", []).append(output.detach().cpu())

    # The norm before the MLP reads the residual after attention; `mlp_output` produces what the MLP adds to it.
    handles = [
        layer.get_submodule(where.after_attention).register_forward_pre_hook(before_mlp),
        layer.get_submodule(where.mlp_output).register_forward_hook(mlp_output),
    ]
    after = layers[position] if position < len(layers) else model.model.norm  # the layers after it are not needed
    try:
        _run_windows_until(model, after, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    size = model.config.hidden_size
    a = torch.cat([x.reshape(-1, size) for x in captured["a"]]).double()
    m = torch.cat([x.reshape(-1, size) for x in captured["m"]]).double()
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
    captured: dict[int, list] = {position: [] for position in sites}

    def hook_for(position: int):
        def hook(module, args, kwargs):
            captured[position].append((args[0] if args else kwargs["hidden_states"]).detach().cpu())

        return hook

    handles = [site.register_forward_pre_hook(hook_for(p), with_kwargs=True) for p, site in sites.items()]
    depth = {id(layer): index for index, layer in enumerate(base.layers)} | {id(base.norm): len(base.layers)}
    last = max(sites.values(), key=lambda module: depth[id(module)])
    try:
        _run_windows_until(dense, last, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    size = config.hidden_size
    return {p: torch.cat([x.reshape(-1, size) for x in chunks]).double() for p, chunks in captured.items()}


@torch.no_grad()
def heldout_perplexity(
    model, input_ids: torch.Tensor, maps: dict[int, torch.Tensor], frames: dict[int, torch.Tensor] | None = None
) -> float:
    """Perplexity of `model` (in memory or a [`layerwise_model`]) on `input_ids` with `maps` (and `frames`) attached
    in place of their patches (see [`attach_fold_maps`]): how a candidate fold scores."""
    import math

    from .measurement.capture import logits_source
    from .measurement.perplexity import summed_next_token_nll

    handles = attach_fold_maps(model, maps, frames)
    nll = 0.0
    try:
        with logits_source(model, input_ids) as logits_of:
            for row in range(len(input_ids)):
                nll += summed_next_token_nll(logits_of(slice(row, row + 1)), input_ids[row : row + 1])
    finally:
        detach_fold_maps(model, handles)
    return math.exp(nll / input_ids[:, 1:].numel())


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
            `folding.fit_rotated`); `distill --export` keeps them as fitted.
        norms (`dict[str, torch.Tensor]`): the reading RMSNorms' weights that the frames absorb.
    """

    config: object
    described: list[dict]
    maps: dict[int, torch.Tensor]
    fixed: dict[str, list] = field(default_factory=dict)
    frames: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def transforms(self, maps: dict[int, torch.Tensor] | None = None) -> dict[str, list]:
        """State-dict key -> the functions to apply to that tensor, in order: the fixed folds, then `maps` (by
        default the plan's own; `distill --export` passes its trained ones), then the frames."""
        transforms = {key: list(functions) for key, functions in self.fixed.items()}
        _merge(transforms, map_transforms(self.config, self.maps if maps is None else maps))
        _merge(transforms, frame_transforms(self.config, self.frames, self.norms))
        return transforms

    def unties(self, maps: dict[int, torch.Tensor] | None = None) -> bool:
        """Whether the export's head needs its own copy of the embeddings: a map at layer 0 changes the embeddings,
        a frame changes the head."""
        return 0 in (self.maps if maps is None else maps) or bool(self.frames)

    def stock(self, model, maps: dict[int, torch.Tensor] | None = None) -> PreTrainedModel:
        """The stock model of the LinearPatch `model` (its patches and any attached maps left out) with this plan
        folded in, `maps` in place of the plan's own if given."""
        maps = self.maps if maps is None else maps
        state = apply_plan(model, self.transforms(maps))
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
        stream_at (`callable`, *optional*): `position -> (a, m)` on the fit windows (see [`_stream_at`]), needed by
            every map fold for gaps after layer 0.
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser, relative to the mean diagonal of
            the (weighted) Gram matrix.
        dense_at (`callable`, *optional*): `position -> y`, the dense model's stream there on the same windows (see
            [`dense_streams`]); needed by the dense objectives, which `auto` leaves out without it.
        score (`callable`, *optional*): `(position, maps, frames) -> held-out perplexity` of the patched model with
            `maps` (and `frames`) in place of that gap's patch (`{}`: the patch kept); needed by `auto`.
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
        scores = {}
        if len(candidates) > 1:
            scores = {
                objective: score(
                    position,
                    {} if transform is None else {position: transform},
                    {position: candidate_frames[objective]} if objective in candidate_frames else {},
                )
                for objective, transform in candidates.items()
            }
            chosen = min(candidates, key=scores.get)  # the first listed on a tie
        else:
            chosen = objectives[0]
        entry = dict(position=position, objective=chosen)
        if scores:
            entry["heldout_perplexity"] = scores
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


def apply_folds(tensor: torch.Tensor, functions: list) -> torch.Tensor:
    for function in functions:
        tensor = function(tensor)
    return tensor


def split_fit_heldout(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows split into (fit, held out) for `--fold auto`: one in eight held out, at least one (as
    `--patch auto` splits them).

    Raises:
        LinearPatchError: for fewer than two windows.
    """
    count = len(input_ids)
    if count < 2:
        raise LinearPatchError(
            f"--fold auto scores each fold on held-out calibration windows, so it needs at least 2 (got {count}): "
            "raise --num-samples, or choose one fold (e.g. --fold down-proj-dense)."
        )
    from .pruning.search import default_holdout

    holdout = default_holdout(count)
    return input_ids[:-holdout], input_ids[-holdout:]


def plan_model_folds(
    model, fold: str, input_ids: torch.Tensor | None = None, dense=None, ridge: float = 1e-3
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
    """
    config = model.config
    patches = _patch_matrices(model)
    fit_ids, heldout_ids = input_ids, None
    needs_fit = any(position > 0 for position in patches) and fold != "scalar"
    if needs_fit and fold == "auto" and dense is not None and input_ids is not None:
        # Without the dense model, auto has one candidate per gap: nothing to score, every window fits it.
        fit_ids, heldout_ids = split_fit_heldout(input_ids)
    stream_at = None if fit_ids is None else lambda position: _stream_at(model, position, fit_ids)
    dense_at = None
    if dense is not None and fit_ids is not None:
        streams = {}

        def dense_at(position: int) -> torch.Tensor:
            if not streams:  # one pass of the dense model for every gap, on first use
                gaps = [p for p in patches if p > 0]
                streams.update(dense_streams(dense, config, gaps, fit_ids))
            return streams[position]

    score = None
    if heldout_ids is not None:

        def score(position: int, maps: dict, frames: dict) -> float:
            return heldout_perplexity(model, heldout_ids, maps, frames)

    return plan_folds(config, patches, fold, stream_at, ridge, dense_at, score, _weight_reader(model))


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


def apply_plan(model, transforms: dict[str, list]) -> dict:
    """`model`'s state dict without patches (the head's own copy where it is tied), with `transforms` applied."""
    state = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if ".linear_patch." not in key and not key.startswith((f"{FOLD_MAPS}.", f"{FOLD_FRAMES}."))
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


def export_model(
    model, fold: str = "auto", input_ids: torch.Tensor | None = None, dense=None
) -> tuple[PreTrainedModel, list]:
    """A stock causal LM of the family (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...) equivalent (exactly or
    approximately, see [`fold_state_dict`]) to the LinearPatch `model`, and a description of each fold.

    Args:
        model (`PreTrainedModel`): the LinearPatch causal LM (not modified).
        fold (`str`, *optional*, defaults to `"auto"`): one of `FOLDS`.
        input_ids (`torch.LongTensor`, *optional*): calibration windows (see [`plan_model_folds`]).
        dense (*optional*): the dense model the checkpoint was pruned from, for the dense objectives.
    """
    plan = plan_model_folds(model, fold, input_ids, dense)
    return plan.stock(model), plan.described


def export_checkpoint(checkpoint: str, output: str | Path, **options) -> ExportReport:
    r"""
    `linearpatch export`: write a folder of the family's stock architecture (`model_type: llama`, `qwen3`, ...; no
    `auto_map`, no remote code) that any engine loads, with the patches folded into the weights, and measure what
    the fold costs.

    Args:
        checkpoint (`str`): a LinearPatch checkpoint.
        output (`str` or `Path`): the folder to create.
        fold (`str`, *optional*, defaults to `"down-proj"`): `down-proj` (least-squares fold into the previous layer's
            MLP) or `scalar` (Prune&Comp; exact for scalar patches). A gap at layer 0 is always folded exactly into
            the embeddings.
        calibration (`str`), num_samples (`int`), seq_len (`int`), seed (`int`): text for the `down-proj` fit.
        eval_corpora (`list[str]`), eval_windows (`int`): held-out perplexity of patched, export and plain pruning
            (`eval_windows=0` skips the comparison).
        sequential (`bool`, *optional*): never hold the checkpoint whole: the `down-proj` fit runs the layers one at
            a time from the shards, and the folded tensors are streamed to the output in shards of
            `max_shard_size` (with an index). By default chosen when the checkpoint does not fit `max_memory` (the
            device's free memory). The held-out comparison, which needs whole models, is then skipped (logged).
        max_memory (`str` or `int`, *optional*), max_shard_size (`str` or `int`, *optional*): see
            `linearpatch prune`.
        Other keywords: the fields of [`ExportRequest`], which hold every default.

    Returns:
        `ExportReport`
    """
    return _export_checkpoint_job(**ExportRequest(checkpoint=checkpoint, output=output, **options).options())


def _export_checkpoint_job(
    *,
    checkpoint,
    output,
    fold,
    dense,
    calibration,
    num_samples,
    seq_len,
    seed,
    eval_corpora,
    eval_windows,
    device,
    overwrite,
    progress,
    sequential,
    max_memory,
    max_shard_size,
) -> ExportReport:
    """The job of [`export_checkpoint`]: the fields of [`ExportRequest`] as keywords, without defaults."""
    from .measurement.perplexity import held_out_windows
    from .models import fit_context, load_tokenizer, portable_model_id
    from .opening import open_job

    started = time.perf_counter()
    if fold not in FOLDS:
        raise LinearPatchError(f"Unknown fold {fold!r}: choose one of {', '.join(FOLDS)}.")
    inputs = {"calibration text": local_text_file(calibration)}
    inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in eval_corpora if eval_windows != 0}
    job = open_job(checkpoint, "checkpoint", output, overwrite, device, inputs)
    output, device, config = job.output, job.device, job.config
    needs_fit = fold != "scalar" and any(p > 0 for p in config.patch_positions)
    dense_model = resolve_dense(config, dense, fold) if needs_fit else None
    eval_windows = perplexity_sizes(device).num_samples if eval_windows is None else eval_windows
    tokenizer = load_tokenizer(checkpoint)
    sizes, held_out = calibration_sizes(device), perplexity_sizes(device)
    windows = None
    if needs_fit:
        num_samples = sizes.num_samples if num_samples is None else num_samples
        seq_len = fit_context(config, seq_len, sizes.seq_len)
        windows = token_windows(calibration, tokenizer, num_samples, seq_len, seed=seed)
        if fold == "auto" and dense_model is not None:
            split_fit_heldout(windows.input_ids)  # refuse too few windows before any model is loaded
    checkpoint_weights = SafetensorsCheckpoint(job.model_path)
    sequential = choose_sequential(
        checkpoint_weights.nbytes(torch.float32), device, sequential, max_memory, "checkpoint"
    )
    evaluation = {}
    if eval_windows and not sequential:
        eval_seq_len = fit_context(config, None, held_out.seq_len)
        evaluation = held_out_windows(tokenizer, eval_corpora, eval_windows, eval_seq_len)
    if sequential:
        pipeline = SequentialExport(checkpoint_weights, config, device, progress, parse_size(max_shard_size))
    else:
        pipeline = InMemoryExport(checkpoint, device)
    described = pipeline.fold(fold, windows, dense_model)
    report = ExportReport(
        source=portable_model_id(checkpoint),
        fold=fold,
        base_model=config.base_model,
        pruned_layers=list(config.pruned_layers),
        patch_positions=list(config.patch_positions),
        folds=described,
        perplexity=pipeline.compare(evaluation, progress),
        calibration=windows.describe() if windows is not None else {},
        architecture=family_of(config).dense_causal_lm_class.__name__,
        output=str(output),
        num_layers=config.num_hidden_layers,
        dense=dense_model,
    )
    report.seconds = round(time.perf_counter() - started, 2)
    with atomic_directory(output, overwrite) as staging:
        pipeline.write(staging, tokenizer, {EXPORT_RECORD: report.to_json()})
    return report


def resolve_dense(config, dense: str | None, fold: str) -> str | None:
    """The dense model for the dense fold objectives: `dense`, else the one the checkpoint was pruned from
    (`base_model`). `None` for a fold that needs none, and for `auto` when the default cannot be found (logged: the
    dense objectives are then left out of the comparison).

    Raises:
        LinearPatchError: when a given `dense`, or the default that a dense objective needs, cannot be found or is
            not the checkpoint's base.
    """
    from .models import check_same_base, embedded_name_for, load_config, resolve_model

    if fold != "auto" and fold not in DENSE_OBJECTIVES:
        return None
    name = dense or embedded_name_for(config.base_model)
    try:
        if not name:
            raise LinearPatchError("the checkpoint records no base_model")
        dense_config = load_config(name, kind="dense")
    except (LinearPatchError, OSError) as error:
        if dense is None and fold == "auto":
            logger.warning(
                "linearpatch: --fold auto: the dense model %s cannot be opened (%s), so only the folds that need none "
                "are compared; pass --dense MODEL to add the dense objectives (usually much better).",
                name,
                first_line(error),
            )
            return None
        raise LinearPatchError(
            f"--fold {fold} fits the fold to the dense model's stream, but {name or 'the dense model'} cannot be "
            f"opened ({first_line(error)}): pass --dense with the model the checkpoint was pruned from."
        ) from error
    check_same_base(config, dense_config, name, "dense model")
    return resolve_model(name)


def plain_model(patched) -> PreTrainedModel:
    """Plain pruning of a LinearPatch model: a stock model of its family with its weights and no patches."""
    return stock_from_state(apply_plan(patched, {}), patched.config, untie=False)


class InMemoryExport:
    """The export job's pipeline for a checkpoint that fits: loaded whole, folded into a stock model
    ([`export_model`]), compared side by side with the patched model and plain pruning, saved."""

    def __init__(self, checkpoint: str, device: str):
        from .models import load_model

        self.device = device
        self.patched, _ = load_model(checkpoint, device=device, kind="checkpoint")
        self.stock, self.plan = None, None

    def fold(self, fold: str, windows, dense: str | None = None) -> list[dict]:
        """Fold every patch; `dense` (a model path) is loaded whole while the fold is planned, then released."""
        import contextlib

        from .models import load_model

        input_ids = windows.input_ids if windows is not None else None
        with contextlib.ExitStack() as stack:
            dense_model = None
            if dense is not None:
                dense_model, _ = load_model(dense, device=self.device, kind="dense")
                stack.callback(dense_model.to, "meta")  # free its memory as soon as the fold is planned
            self.plan = plan_model_folds(self.patched, fold, input_ids, dense_model)
        self.stock = self.plan.stock(self.patched)
        return self.plan.described

    def compare(self, evaluation: dict, progress: bool) -> dict:
        """Held-out perplexity of the patched model, the export and plain pruning (the patched weights, no patch)."""
        from .measurement.perplexity import perplexity_table

        if not evaluation:
            return {}
        models = {"patched": self.patched, "export": self.stock, "plain": plain_model(self.patched)}
        return perplexity_table(models, evaluation, progress)

    def write(self, staging: Path, tokenizer, records: dict[str, str]) -> None:
        from .models import write_checkpoint_files

        write_checkpoint_files(staging, self.stock, tokenizer, records)


class SequentialExport:
    """The export job's pipeline for a checkpoint that does not fit: never held whole. The fold is planned from the
    patches (and, for the map folds, from layer-by-layer passes of the checkpoint and the dense model), then every
    tensor is read, folded and written in turn, in shards of `max_shard_size`. The held-out comparison, which needs
    whole models, is skipped."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, config, device: str, progress: bool, max_shard_size: int):
        logger.warning(
            "linearpatch: sequential export: the held-out comparison of patched, export and plain pruning needs whole "
            "models and is skipped; run `linearpatch eval` on the output where it fits."
        )
        self.checkpoint, self.config, self.device = checkpoint, config, device
        self.progress, self.max_shard_size = progress, max_shard_size
        self.pending, self.stock, self.plan = [], None, None

    def fold(self, fold: str, windows, dense: str | None = None) -> list[dict]:
        import contextlib

        from .layerwise import layerwise_model

        checkpoint, config = self.checkpoint, self.config
        input_ids = windows.input_ids if windows is not None else None
        with contextlib.ExitStack() as stack:
            model = stack.enter_context(layerwise_model(checkpoint.folder, device=self.device, progress=self.progress))
            dense_model = None
            if dense is not None:
                dense_model = stack.enter_context(layerwise_model(dense, device=self.device, progress=self.progress))
            plan = self.plan = plan_model_folds(model, fold, input_ids, dense_model)
        transforms = plan.transforms()
        untie = plan.unties()
        stock = stock_config(config, untie)
        stock.dtype = torch.float32
        with torch.device("meta"):
            expected = stock_model(stock).state_dict().keys()
        sources = {key: key for key in checkpoint.keys() if ".linear_patch." not in key}
        if config.tie_word_embeddings and untie:
            sources["lm_head.weight"] = "model.embed_tokens.weight"  # the head keeps the unfolded embeddings
        for key in expected:
            if key == "lm_head.weight" and stock.tie_word_embeddings:
                continue
            if key not in sources:
                raise LinearPatchError(
                    f"{checkpoint.folder} has no {key!r}: the checkpoint does not match its config."
                )
            # Folded tensors are read whole; the others (most of them) stream in blocks.
            transform = (
                (lambda tensor, functions=transforms[key]: apply_folds(tensor, functions))
                if key in transforms
                else None
            )
            self.pending.append((key, checkpoint.pending(sources[key], torch.float32, transform)))
        self.stock = stock
        return plan.described

    def compare(self, evaluation: dict, progress: bool) -> dict:
        return {}

    def write(self, staging: Path, tokenizer, records: dict[str, str]) -> None:
        from transformers import GenerationConfig

        from .models import write_checkpoint_files
        from .shards import write_sharded_safetensors

        write_sharded_safetensors(staging, self.pending, max_shard_size=self.max_shard_size, progress=self.progress)
        self.stock.save_pretrained(staging)
        try:
            GenerationConfig.from_pretrained(self.checkpoint.folder).save_pretrained(staging)
        except OSError:
            pass
        write_checkpoint_files(staging, None, tokenizer, records)


__all__ = [
    "EXPORT_RECORD",
    "FOLDS",
    "ExportReport",
    "FoldPlan",
    "InMemoryExport",
    "SequentialExport",
    "apply_folds",
    "apply_plan",
    "dense_streams",
    "export_checkpoint",
    "export_model",
    "fold_state_dict",
    "heldout_perplexity",
    "plain_model",
    "plan_folds",
    "plan_model_folds",
    "resolve_dense",
    "stock_from_state",
]
