"""Fold maps: the one C x C map per gap that a stock export can hold, fitted, applied and folded.

A patch acts on the residual stream after a gap, which no stock weight holds. A map `T` on the MLP output `m` of the
kept layer just before the gap (on the token embeddings for a gap at layer 0) can be held exactly: the stream entering
the kept layer after the gap becomes `a + m T` (`a` the stream after that layer's attention), and `T` folds into
that layer's `down_proj` (`W <- T^T W`, `b <- b T`), into the embeddings (`E <- E T`), or, where the MLP output leaves
through a norm (Gemma 3, OLMo 2) and `T` is diagonal, into that norm's weight. This module holds everything about
such maps:

- [`fit_map`] fits `T` to an objective: `down-proj` reproduces the patched stream `(a + m) P` (the patch's own
  target, so it approximates an approximation); `down-proj-dense` reproduces the dense model's stream after the
  removed block directly, by least squares with each token weighted by its own norm (every later layer reads the
  stream through RMSNorm); `down-proj-cosine` minimises the cosine distance to it (ReplaceMe's best), starting from
  the least-squares map;
- [`fit_rotated`] (`down-proj-rotated`) fits, with `T`, a *frame* `R = c Q` (`Q` orthogonal, `c` a scalar) so that
  `(a + m T) R ~= target`. A map on one MLP output cannot reach the stream entering that layer, which holds most of
  what the removed block changed; a frame acts on all of it. It folds into the layers after the gap (and the head):
  their writers are multiplied by `R^-1` and their readers by `Q` (after each RMSNorm's weight is absorbed into the
  Linear layers that read it), so the export's stream after the gap is the reference's times `R^-1`, which every
  RMSNorm reads as the same thing. Exact up to RMSNorm's eps, for families whose layout is
  [`ResidualLayout.rotatable`] (Llama, Mistral, Qwen 2/3; not Gemma 3's normalised writers);
- [`attach_fold_maps`] applies maps (and frames) to a model with hooks (in memory or run layer by layer), bypassing
  the patches they replace: what the export scores on held-out windows, what `distill --export` trains (the
  `fold_maps` modules are then the only trainable parameters, as the patches are for `distill`; the frames stay as
  fitted), and the model an export must equal;
- [`map_transforms`] and [`frame_transforms`] turn maps and frames into per-tensor functions of the stock state
  dict: a pure plan that applies to a state dict in memory or to tensors streamed from the shards one by one.
"""

import torch
from torch import nn

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import family_of

from ..choices import FOLD_OBJECTIVES, ROTATED_OBJECTIVE

# Attribute of the causal LM that holds the maps while they are attached (a `ModuleDict` keyed by position): outside
# the decoder layers, so that a model run layer by layer keeps them when it frees each layer's weights.
FOLD_MAPS = "fold_maps"
# The same for the frames, which are fitted, not trained: a PEFT adapter targets only `fold_maps.*`.
FOLD_FRAMES = "fold_frames"


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


def apply_map(x: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """`x T`, for a full `T` or a diagonal one stored as its scales."""
    return x * transform if transform.dim() == 1 else x @ transform


def _token_weight(target: torch.Tensor) -> torch.Tensor:
    """Per token, 1 / mean(target^2): every later layer reads the stream through RMSNorm, so what matters is each
    token's error relative to its own norm; unweighted least squares would fit the few massive-activation tokens and
    nothing else."""
    return 1.0 / target.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12)


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


def fit_map(
    objective: str,
    a: torch.Tensor,
    m: torch.Tensor,
    target: torch.Tensor,
    diagonal: bool = False,
    ridge: float = 1e-3,
    steps: int = 100,
) -> torch.Tensor:
    r"""
    The map `T` of one gap for `objective` (see the module docstring), so that `a + m T ~= target` per token.

    Args:
        objective (`str`): one of `FOLD_OBJECTIVES`; it decides the loss, the caller the target (the patched stream
            `(a + m) P` for `down-proj`, the dense model's stream for the others).
        a (`torch.Tensor` of shape `[tokens, C]`): the stream after the attention of the kept layer before the gap.
        m (`torch.Tensor` of shape `[tokens, C]`): that layer's MLP output.
        target (`torch.Tensor` of shape `[tokens, C]`): the stream to reproduce.
        diagonal (`bool`, *optional*): fit only per-channel scales (returned as a `[C]` vector).
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser, relative to the mean diagonal of the
            (weighted) Gram matrix.
        steps (`int`, *optional*, defaults to 100): full-batch Adam steps of the cosine objective.

    Returns:
        `torch.Tensor`: `T` (`[C, C]`, or `[C]` when `diagonal`), float64.
    """
    if objective not in FOLD_OBJECTIVES:
        raise LinearPatchError(f"Unknown fold objective {objective!r}: choose one of {', '.join(FOLD_OBJECTIVES)}.")
    if objective == ROTATED_OBJECTIVE:
        raise LinearPatchError(f"{ROTATED_OBJECTIVE} fits a map and a frame: call fit_rotated.")
    a, m, target = a.double(), m.double(), target.double()
    transform = _least_squares_map(a, m, target, _token_weight(target), diagonal, ridge)
    if objective == "down-proj-cosine":
        transform = _cosine_refine(transform, a, m, target, steps)
    return transform


def _least_squares_map(a, m, target, weight, diagonal: bool, ridge: float) -> torch.Tensor:
    """`T` minimising the `weight`ed squared error of `a + m T` to `target` (ridge-regularised)."""
    delta = target - a
    if diagonal:
        gram = (m * m * weight).sum(dim=0)
        transform = (m * delta * weight).sum(dim=0) / (gram + ridge * gram.mean())
    else:
        gram = m.T @ (m * weight)
        damping = ridge * gram.diagonal().mean()
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        transform = torch.linalg.solve(gram + damping * identity, m.T @ (delta * weight))
    return transform


def split_frame(frame: torch.Tensor) -> tuple[float, torch.Tensor]:
    """`(c, Q)` of a frame `R = c Q`."""
    scale = float(frame.double().norm() / frame.shape[0] ** 0.5)
    return scale, frame.double() / scale


def fit_rotated(
    a: torch.Tensor,
    m: torch.Tensor,
    target: torch.Tensor,
    ridge: float = 1e-3,
    rounds: int = 100,
    tolerance: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The `down-proj-rotated` fold of one gap: a map `T` and a frame `R = c Q` (`Q` orthogonal, `c > 0`) so that
    `(a + m T) R ~= target` per token, each token weighted by its own norm (as `down-proj-dense`). Alternates the two
    closed forms from `T = I`: `R` by weighted orthogonal Procrustes with the best scale, `T` by least squares to
    `target R^-1`. Every round works on `C x C` statistics gathered once, so rounds are cheap whatever the tokens.

    Args:
        a, m, target (`torch.Tensor` of shape `[tokens, C]`): as for [`fit_map`] (the target is the dense stream).
        ridge (`float`, *optional*, defaults to 1e-3): least-squares regulariser of `T`.
        rounds (`int`, *optional*, defaults to 100): most alternations.
        tolerance (`float`, *optional*, defaults to 1e-7): stop once a round lowers the weighted error by less than
            this fraction of the target's weighted norm.

    Returns:
        `(T, R)`, float64 `[C, C]` each.
    """
    a, m, target = a.double(), m.double(), target.double()
    weight = _token_weight(target)
    m_m = m.T @ (m * weight)
    identity = torch.eye(m_m.shape[0], dtype=m_m.dtype, device=m_m.device)
    factor = torch.linalg.cholesky(m_m + ridge * m_m.diagonal().mean() * identity)
    m_a, m_y, a_y = m.T @ (a * weight), m.T @ (target * weight), a.T @ (target * weight)
    a_a, y_y = float((a.pow(2) * weight).sum()), float((target.pow(2) * weight).sum())
    transform = identity.clone()
    best = (float("inf"), transform, None)
    for _ in range(rounds):
        # R for this T: Procrustes on x = a + m T, from x^T W y and x^T W x alone.
        u, singular, vh = torch.linalg.svd(a_y + transform.T @ m_y)
        x_x = a_a + 2 * float((transform * m_a).sum()) + float((transform * (m_m @ transform)).sum())
        scale = float(singular.sum()) / x_x
        rotation = u @ vh
        error = y_y - float(singular.sum()) ** 2 / x_x  # at the best scale
        if error > best[0] - tolerance * y_y:
            if error < best[0]:
                best = (error, transform, scale * rotation)
            break
        best = (error, transform, scale * rotation)
        # T for this R: least squares of m T to target R^-1 - a (every token's norm scales by 1 / c alike).
        transform = torch.cholesky_solve(m_y @ rotation.T / scale - m_a, factor)
    return best[1], best[2]


def _cosine_refine(transform: torch.Tensor, a, m, target, steps: int, max_tokens: int = 65536) -> torch.Tensor:
    """Minimise the mean cosine distance between `a + m T` and `target` by full-batch Adam from `transform`; keep the
    best `T` seen (the least-squares start included), on at most `max_tokens` tokens (evenly spaced)."""
    if len(a) > max_tokens:
        rows = torch.linspace(0, len(a) - 1, max_tokens).long()
        a, m, target = a[rows], m[rows], target[rows]
    a, m, target = a.float(), m.float(), target.float()
    parameter = nn.Parameter(transform.float().clone())
    # Adam moves every entry by about lr per step: a small fraction of the map's typical entry.
    optimizer = torch.optim.Adam([parameter], lr=1e-2 * float(transform.abs().mean()))

    def loss_of(value: torch.Tensor) -> torch.Tensor:
        return 1 - nn.functional.cosine_similarity(a + apply_map(m, value), target, dim=1).mean()

    best, best_loss = transform.clone(), float("inf")
    for step in range(steps):
        # The loss of each step's starting point is the one its gradient needs: one evaluation per point visited.
        optimizer.zero_grad()
        loss = loss_of(parameter)
        if step == 0:  # the least-squares start, kept in full precision
            best_loss = float(loss.detach())
        elif float(loss.detach()) < best_loss:
            best, best_loss = parameter.detach().double().clone(), float(loss.detach())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        if steps and float(loss_of(parameter)) < best_loss:  # where the last step landed
            best = parameter.detach().double().clone()
    return best


def relative_error(
    a: torch.Tensor, m: torch.Tensor, target: torch.Tensor, transform: torch.Tensor, frame: torch.Tensor | None = None
) -> float:
    """How far `a + m T` (times the frame `R`, if any) is from `target`, relative to it, each token weighted by its
    own norm (as fitted)."""
    weight = _token_weight(target)
    mapped = a + apply_map(m, transform)
    if frame is not None:
        mapped = mapped @ frame.double()
    return float(((mapped - target) * weight.sqrt()).norm() / (target * weight.sqrt()).norm())


def _patch_module(model, position: int):
    """The LinearPatch module of the gap before kept layer `position` (`None` in a stock model)."""
    base = model.model
    owner = base.norm if position == len(base.layers) else base.layers[position]
    return getattr(owner, "linear_patch", None)


def _stream_entry(model, position: int):
    """The module whose input is the stream after the gap before kept layer `position`."""
    base = model.model
    return base.norm if position == len(base.layers) else base.layers[position]


def attach_fold_maps(model, maps: dict[int, torch.Tensor], frames: dict[int, torch.Tensor] | None = None) -> list:
    r"""
    Apply a map per gap to `model` (a LinearPatch or a stock pruned causal LM, in memory or from
    [`layerwise_model`]): `maps[p]` multiplies the MLP output of kept layer `p - 1` (the token embeddings for `p = 0`)
    and the patch of that gap, if the model has one, is bypassed. `frames[p]` (see [`fit_rotated`]) then multiplies
    the stream entering kept layer `p` (the final norm for the last gap). The maps live in `model.fold_maps` (see
    [`FOLD_MAPS`]), as [`FoldMap`] modules that a PEFT adapter can target; the frames in `model.fold_frames`.

    Returns:
        `list`: the hook handles; [`detach_fold_maps`] removes them, the maps and the frames.
    """
    frames = frames or {}
    config = model.config
    where = family_of(config).residual
    base = model.model
    sites = {
        position: base.embed_tokens if position == 0 else base.layers[position - 1].get_submodule(where.mlp_output)
        for position in maps
    }

    def holder_of(values: dict[int, torch.Tensor], site_of) -> nn.ModuleDict:
        holder = nn.ModuleDict()
        for position, value in values.items():
            # Beside the block it follows (a model spread over devices), or on the compute device of a
            # layer-by-layer model, whose weights come and go.
            device = next(site_of(position).parameters()).device
            if device.type == "meta":
                device = model.layerwise.device
            holder[str(position)] = FoldMap(value).to(device)
        return holder

    setattr(model, FOLD_MAPS, holder_of(maps, sites.get))
    setattr(
        model, FOLD_FRAMES, holder_of(frames, lambda position: _stream_entry(model, position)).requires_grad_(False)
    )
    handles = []
    for position, site in sites.items():

        def apply(module, args, output, key=str(position)):
            return getattr(model, FOLD_MAPS)[key](output)

        handles.append(site.register_forward_hook(apply))
        patch = _patch_module(model, position)
        if patch is not None:
            handles.append(patch.register_forward_hook(lambda module, args, output: args[0]))
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
    for name in (FOLD_MAPS, FOLD_FRAMES):
        if hasattr(model, name):
            delattr(model, name)


def attached_maps(model) -> dict[int, torch.Tensor]:
    """The maps attached to `model` (position -> `T`, float64), trained copies included once a PEFT adapter on them
    is merged."""
    holder = getattr(model, FOLD_MAPS)
    return {int(key): module.weight.detach().double() for key, module in holder.items()}


def map_transforms(config, maps: dict[int, torch.Tensor]) -> dict[str, list]:
    """State-dict key -> the functions that fold `maps` (position -> `T`, see the module docstring) into the stock
    weights of `config`'s family, each exact.

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
        add(f"{prefix}.weight", lambda t, f=transform: (f.T @ t.double()).to(t.dtype))
        add(f"{prefix}.bias", lambda t, f=transform: (t.double() @ f).to(t.dtype))
    return transforms


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
                forward = writer_map.clone()
                transforms[f"{prefix}.{name}.weight"] = [lambda t, f=forward: (f.T @ t.double()).to(t.dtype)]
                transforms[f"{prefix}.{name}.bias"] = [lambda t, f=forward: (t.double() @ f).to(t.dtype)]
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
    "FOLD_MAPS",
    "FoldMap",
    "apply_map",
    "attach_fold_maps",
    "attached_maps",
    "detach_fold_maps",
    "diagonal_maps",
    "fit_map",
    "fit_rotated",
    "frame_norm_keys",
    "frame_transforms",
    "map_site",
    "map_transforms",
    "relative_error",
    "split_frame",
]
