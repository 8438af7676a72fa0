"""Fold maps: the one C x C map per gap that a stock export can hold, applied and folded (`fitting.py` fits them).

A patch acts on the residual stream after a gap, which no stock weight holds. A map `T` on the MLP output `m` of the
kept layer just before the gap (on the token embeddings for a gap at layer 0) can be held exactly: the stream entering
the kept layer after the gap becomes `a + m T` (`a` the stream after that layer's attention), and `T` folds into
that layer's `down_proj` (`W <- T^T W`, `b <- b T`), into the embeddings (`E <- E T`), or, where the MLP output leaves
through a norm (Gemma 3, OLMo 2) and `T` is diagonal, into that norm's weight. This module holds everything about
such maps:

- [`FoldMap`] and [`FoldFrame`] hold a map and a frame (fitted in `fitting.py`) as modules;
- [`attach_fold_maps`] applies maps (and frames) to a model with hooks (in memory or run layer by layer), bypassing
  the patches they replace: what the export scores on held-out windows, what `distill --export` trains (the
  `fold_maps` and `fold_frames` modules are then the only trainable parameters, as the patches are for `distill`;
  a trained frame stays a scaled rotation, see [`FoldFrame`]), and the model an export must equal;
- [`map_transforms`] and [`frame_transforms`] turn maps and frames into per-tensor functions of the stock state
  dict: a pure plan that applies to a state dict in memory or to tensors streamed from the shards one by one.
"""

import math

import torch
from torch import nn

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import family_of

from ..choices import ROTATED_OBJECTIVE

# Attribute of the causal LM that holds the maps while they are attached (a `ModuleDict` keyed by position): outside
# the decoder layers, so that a model run layer by layer keeps them when it frees each layer's weights.
FOLD_MAPS = "fold_maps"
# The same for the frames (`FoldFrame`), which `distill --export` trains with the maps.
FOLD_FRAMES = "fold_frames"
# The same for the maps on the other writers of the kept layers before a gap (see [`writer_sites`]), which
# `distill --export` trains too; keyed by site with `-` for `.` (a module's name holds no dot).
FOLD_WRITERS = "fold_writers"
FOLD_HOLDERS = (FOLD_MAPS, FOLD_FRAMES, FOLD_WRITERS)


class FoldMap(nn.Module):
    r"""
    `x -> x T` on a block's output, computed in fp32: a full `T` (`[C, C]`), or a diagonal one stored as its `[C]`
    scales where only a diagonal map can be folded.

    Args:
        weight (`torch.Tensor`): `T`, or its diagonal.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # A frame's input may still be on the previous layer's device (a model spread over devices moves it later).
        return apply_map(hidden_states.to(self.weight.device).float(), self.weight).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}{' (diagonal)' if self.weight.dim() == 1 else ''}"


class FoldFrame(nn.Module):
    r"""
    `x -> x R` on the stream after a gap, computed in fp32, for a frame `R = c Q` (see [`fit_rotated`]) kept as
    `c = exp(log_scale)` and `Q = Q_0 exp(G - G^T)` (`G` is its `weight`, the name PEFT's LN tuning carries over when
    it merges): whatever values training gives its parameters, `R` stays a scaled rotation, which is what folds
    exactly into the layers after the gap. Starts at the fitted frame (`G = 0`).

    Args:
        frame (`torch.Tensor`): the fitted `R` (`[C, C]`).
    """

    def __init__(self, frame: torch.Tensor):
        super().__init__()
        scale, rotation = split_frame(frame)
        self.register_buffer("rotation", rotation.float())
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.weight = nn.Parameter(torch.zeros_like(self.rotation))

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`R` in `dtype` (the export folds it in float64, so that its rotation is orthogonal to rounding)."""
        rotation = self.rotation.to(dtype)
        if self.weight.requires_grad or bool(self.weight.any()):  # a fitted frame, only scored, skips the exp
            generator = self.weight.to(dtype)
            rotation = rotation @ torch.linalg.matrix_exp(generator - generator.T)
        return self.log_scale.to(dtype).exp() * rotation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # As FoldMap: the stream may still be on the previous layer's device.
        frame = self.matrix().to(hidden_states.device)
        return (hidden_states.float() @ frame).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.rotation.shape)} (scaled rotation)"


def apply_map(x: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """`x T`, for a full `T` or a diagonal one stored as its scales."""
    return x * transform if transform.dim() == 1 else x @ transform


def diagonal_maps(config) -> bool:
    """Whether `config`'s family can only fold diagonal maps after layer 0 (its MLP output leaves through a norm)."""
    return family_of(config).residual.writer_norm_offset is not None


def map_site(config, position: int) -> str:
    """Where the map of the gap before kept layer `position` is folded, e.g. `19.mlp.down_proj (kept layer 19)`."""
    if position == 0:
        return "embed_tokens"
    where = family_of(config).residual
    name = where.mlp_output if diagonal_maps(config) else where.writers[-1]
    return f"{position - 1}.{name} (kept layer {position - 1})"


def writer_sites(config, positions, depth: int) -> list[str]:
    """The writers that `distill --export` maps besides each gap's own map, for the gaps before kept layers
    `positions` (those with a map): every writer of the `depth` kept layers before each gap, not reaching back past
    the previous gap, but the one its own map is on (`17.self_attn.o_proj`, `17.mlp.down_proj`, ...). Each such map
    folds exactly into its Linear writer (`W <- T^T W`); none where the family folds only diagonal maps.
    """
    if depth <= 0 or diagonal_maps(config):
        return []
    writers = family_of(config).residual.writers
    sites, previous = [], 0
    for position in sorted(positions):
        for layer in range(max(position - depth, previous), position):
            sites += [f"{layer}.{name}" for name in writers if (layer, name) != (position - 1, writers[-1])]
        previous = position
    return sites


def _writer_key(site: str) -> str:
    return site.replace(".", "-")


def split_frame(frame: torch.Tensor) -> tuple[float, torch.Tensor]:
    """`(c, Q)` of a frame `R = c Q`."""
    scale = float(frame.double().norm() / frame.shape[0] ** 0.5)
    return scale, frame.double() / scale


def _patch_module(model, position: int):
    """The LinearPatch module of the gap before kept layer `position` (`None` in a stock model)."""
    base = model.model
    owner = base.norm if position == len(base.layers) else base.layers[position]
    return getattr(owner, "linear_patch", None)


def _stream_entry(model, position: int):
    """The module whose input is the stream after the gap before kept layer `position`."""
    base = model.model
    return base.norm if position == len(base.layers) else base.layers[position]


def attach_fold_maps(
    model,
    maps: dict[int, torch.Tensor],
    frames: dict[int, torch.Tensor] | None = None,
    writers: dict[str, torch.Tensor] | None = None,
) -> list:
    r"""
    Apply a map per gap to `model` (a LinearPatch or a stock pruned causal LM, in memory or from
    [`layerwise_model`]): `maps[p]` multiplies the MLP output of kept layer `p - 1` (the token embeddings for `p = 0`)
    and the patch of that gap, if the model has one, is bypassed. `frames[p]` (see [`fit_rotated`]) then multiplies
    the stream entering kept layer `p` (the final norm for the last gap), and `writers[site]` (see [`writer_sites`])
    the output of that writer. The maps live in `model.fold_maps` (see [`FOLD_MAPS`]), as [`FoldMap`] modules that a
    PEFT adapter can target; the frames in `model.fold_frames`, the writers' maps in `model.fold_writers`.

    Returns:
        `list`: the hook handles; [`detach_fold_maps`] removes them, the maps and the frames.
    """
    frames, writers = frames or {}, writers or {}
    config = model.config
    where = family_of(config).residual
    base = model.model
    sites = {
        position: base.embed_tokens if position == 0 else base.layers[position - 1].get_submodule(where.mlp_output)
        for position in maps
    }

    def holder_of(values: dict[int, torch.Tensor], site_of, kind) -> nn.ModuleDict:
        holder = nn.ModuleDict()
        for position, value in values.items():
            # Beside the block it follows (a model spread over devices), or on the compute device of a
            # layer-by-layer model, whose weights come and go.
            device = next(site_of(position).parameters()).device
            if device.type == "meta":
                device = model.layerwise.device
            holder[str(position)] = kind(value).to(device)
        return holder

    setattr(model, FOLD_MAPS, holder_of(maps, sites.get, FoldMap))
    writer_modules = {_writer_key(site): base.layers.get_submodule(site) for site in writers}
    keyed = {_writer_key(site): value for site, value in writers.items()}
    setattr(model, FOLD_WRITERS, holder_of(keyed, writer_modules.get, FoldMap))
    # Frozen until an adapter trains copies of them: a frozen frame at its fit skips the matrix exponential.
    frame_holder = holder_of(frames, lambda position: _stream_entry(model, position), FoldFrame)
    setattr(model, FOLD_FRAMES, frame_holder.requires_grad_(False))
    handles = []
    for position, site in sites.items():

        def apply(module, args, output, key=str(position)):
            return getattr(model, FOLD_MAPS)[key](output)

        handles.append(site.register_forward_hook(apply))
        patch = _patch_module(model, position)
        if patch is not None:
            handles.append(patch.register_forward_hook(lambda module, args, output: args[0]))
    for key, writer in writer_modules.items():

        def write(module, args, output, key=key):
            return getattr(model, FOLD_WRITERS)[key](output)

        handles.append(writer.register_forward_hook(write))
    for position in frames:

        def enter(module, args, kwargs, key=str(position)):
            frame = getattr(model, FOLD_FRAMES)[key]
            if args:
                return (frame(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": frame(kwargs["hidden_states"])}

        handles.append(_stream_entry(model, position).register_forward_pre_hook(enter, with_kwargs=True))
    return handles


def detach_fold_maps(model, handles: list) -> None:
    """Undo [`attach_fold_maps`]."""
    for handle in handles:
        handle.remove()
    for name in FOLD_HOLDERS:
        if hasattr(model, name):
            delattr(model, name)


def attached_maps(model) -> dict[int, torch.Tensor]:
    """The maps attached to `model` (position -> `T`, float64), trained copies included once a PEFT adapter on them
    is merged."""
    holder = getattr(model, FOLD_MAPS)
    return {int(key): module.weight.detach().double() for key, module in holder.items()}


def attached_writers(model) -> dict[str, torch.Tensor]:
    """The writers' maps attached to `model` (site -> `T`, float64), as [`attached_maps`]."""
    holder = getattr(model, FOLD_WRITERS, {})
    return {key.replace("-", "."): module.weight.detach().double() for key, module in holder.items()}


@torch.no_grad()
def attached_frames(model) -> dict[int, torch.Tensor]:
    """The frames attached to `model` (position -> `R`, float64), as [`attached_maps`]."""
    holder = getattr(model, FOLD_FRAMES, {})
    return {int(key): module.matrix(torch.float64).cpu() for key, module in holder.items()}


def map_transforms(
    config, maps: dict[int, torch.Tensor], writers: dict[str, torch.Tensor] | None = None
) -> dict[str, list]:
    """State-dict key -> the functions that fold `maps` (position -> `T`, see the module docstring) and `writers`
    (site -> `T`, see [`writer_sites`]) into the stock weights of `config`'s family, each exact.

    Raises:
        LinearPatchError: for a full map where the family folds only diagonal ones.
    """
    where = family_of(config).residual
    offset = where.writer_norm_offset
    transforms: dict[str, list] = {}

    def add(key: str, function) -> None:
        transforms.setdefault(key, []).append(function)

    for position, transform in sorted(maps.items()):
        transform = transform.double()
        if position == 0:
            if transform.dim() == 1:
                add("model.embed_tokens.weight", lambda t, s=transform: (t.double() * s).to(t.dtype))
            else:
                add("model.embed_tokens.weight", lambda t, f=transform: (t.double() @ f).to(t.dtype))
            continue
        if offset is not None:
            if transform.dim() != 1:
                raise LinearPatchError(
                    f"The map before kept layer {position} is a full matrix, but {config.model_type}'s MLP output "
                    "leaves through a norm: only a diagonal map folds into its weight."
                )
            key = f"model.layers.{position - 1}.{where.mlp_output}.weight"
            add(key, lambda t, s=transform: ((offset + t.double()) * s - offset).to(t.dtype))
            continue
        prefix = f"model.layers.{position - 1}.{where.writers[-1]}"
        if transform.dim() == 1:
            transform = torch.diag(transform)
        _fold_into_linear(add, prefix, transform)
    for site, transform in sorted((writers or {}).items()):
        if offset is not None:
            raise LinearPatchError(
                f"{config.model_type}'s writers leave through norms, so a map on {site} does not fold: train without "
                "writer maps (--export-layers 0)."
            )
        _fold_into_linear(add, f"model.layers.{site}", transform.double())
    return transforms


def _fold_into_linear(add, prefix: str, forward: torch.Tensor) -> None:
    """Fold `x -> x F` on the output of the Linear layer `prefix` into it: `W <- F^T W`, `b <- b F` (float64)."""
    add(f"{prefix}.weight", lambda t, f=forward: (f.T @ t.double()).to(t.dtype))
    add(f"{prefix}.bias", lambda t, f=forward: (t.double() @ f).to(t.dtype))


def frame_transforms(config, frames: dict[int, torch.Tensor], norms: dict[str, torch.Tensor]) -> dict[str, list]:
    r"""State-dict key -> the functions that fold `frames` (position -> `R = c Q`, see [`fit_rotated`]) into the
    layers after each gap and the head, exact up to RMSNorm's eps. Apply them after the maps' (a map before a later
    gap acts in the stream's own coordinates, which the earlier frames then change).

    With frames `R_1, ..., R_k` before a layer (in gap order), the export's stream there is the reference's times
    `F = R_k^-1 ... R_1^-1`: a writer becomes `W <- F^T W` (`b <- b F`), and a reader of an RMSNorm with weight `w`
    `W <- W diag(w) (Q_1 ... Q_k)^T`, the norm's weight becoming ones (it reads `norm(s F) = norm(s) (Q_1 ... Q_k)^T`).

    Args:
        config: the LinearPatch (or stock) config.
        frames (`dict[int, torch.Tensor]`): position -> `R`.
        norms (`dict[str, torch.Tensor]`): the state-dict weight of every reading RMSNorm from the first frame on
            (`model.layers.{i}.input_layernorm.weight`, ..., `model.norm.weight`), as the model holds them.

    Raises:
        LinearPatchError: where the family's layout is not [`ResidualLayout.rotatable`].
    """
    if not frames:
        return {}
    where = family_of(config).residual
    if not where.rotatable:
        raise LinearPatchError(
            f"{config.model_type} cannot fold a rotation of the stream ({ROTATED_OBJECTIVE}): its blocks do not all "
            "read it through plain RMSNorms into Linear layers and write it through Linear layers. Choose another "
            "fold objective."
        )
    transforms: dict[str, list] = {}

    def add(key: str, function) -> None:
        transforms.setdefault(key, []).append(function)

    size = next(iter(frames.values())).shape[0]
    writer_map = torch.eye(size, dtype=torch.float64)  # F
    reader_map = torch.eye(size, dtype=torch.float64)  # Q_1 ... Q_k
    for index in range(min(frames), config.num_hidden_layers + 1):
        if index in frames:
            scale, rotation = split_frame(frames[index])
            writer_map = (rotation.T / scale) @ writer_map
            reader_map = reader_map @ rotation
        if index == config.num_hidden_layers:
            readers = [("model.norm", ["lm_head"])]
        else:
            prefix = f"model.layers.{index}"
            readers = [(f"{prefix}.{norm}", [f"{prefix}.{name}" for name in names]) for norm, names in where.readers]
            for name in where.writers:
                _fold_into_linear(add, f"{prefix}.{name}", writer_map.clone())
        for norm, names in readers:
            read = norms[f"{norm}.weight"].double()[:, None] * reader_map.T  # diag(w) (Q_1 ... Q_k)^T
            transforms[f"{norm}.weight"] = [torch.ones_like]
            for name in names:
                transforms[f"{name}.weight"] = [lambda t, r=read: (t.double() @ r).to(t.dtype)]
    return transforms


def frame_norm_keys(config, first: int) -> list[str]:
    """The state-dict keys of the reading RMSNorms' weights from kept layer `first` on (what [`frame_transforms`]
    absorbs)."""
    where = family_of(config).residual
    keys = [
        f"model.layers.{i}.{norm}.weight" for i in range(first, config.num_hidden_layers) for norm, _ in where.readers
    ]
    return [*keys, "model.norm.weight"]


__all__ = [
    "FOLD_FRAMES",
    "FOLD_HOLDERS",
    "FOLD_MAPS",
    "FOLD_WRITERS",
    "FoldFrame",
    "FoldMap",
    "apply_map",
    "attach_fold_maps",
    "attached_frames",
    "attached_maps",
    "attached_writers",
    "detach_fold_maps",
    "diagonal_maps",
    "frame_norm_keys",
    "frame_transforms",
    "map_site",
    "map_transforms",
    "split_frame",
    "writer_sites",
]
