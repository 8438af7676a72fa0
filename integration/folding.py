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
- [`attach_fold_maps`] applies maps to a model with hooks (in memory or run layer by layer), bypassing the patches
  they replace: what the export scores on held-out windows, what `distill --export` trains (the `fold_maps` modules
  are then the only trainable parameters, as the patches are for `distill`), and the model an export must equal;
- [`map_transforms`] turns maps into per-tensor functions of the stock state dict: a pure plan that applies to a
  state dict in memory or to tensors streamed from the shards one by one.
"""

import torch
from torch import nn

from linearpatch.common.errors import LinearPatchError
from linearpatch.modeling import family_of

from .choices import FOLD_OBJECTIVES

# Attribute of the causal LM that holds the maps while they are attached (a `ModuleDict` keyed by position): outside
# the decoder layers, so that a model run layer by layer keeps them when it frees each layer's weights.
FOLD_MAPS = "fold_maps"


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
        return apply_map(hidden_states.float(), self.weight).to(hidden_states.dtype)

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
    a, m, target = a.double(), m.double(), target.double()
    weight = _token_weight(target)
    delta = target - a
    if diagonal:
        gram = (m * m * weight).sum(dim=0)
        transform = (m * delta * weight).sum(dim=0) / (gram + ridge * gram.mean())
    else:
        gram = m.T @ (m * weight)
        damping = ridge * gram.diagonal().mean()
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        transform = torch.linalg.solve(gram + damping * identity, m.T @ (delta * weight))
    if objective == "down-proj-cosine":
        transform = _cosine_refine(transform, a, m, target, steps)
    return transform


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
            best_loss = float(loss)
        elif float(loss) < best_loss:
            best, best_loss = parameter.detach().double().clone(), float(loss)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        if steps and float(loss_of(parameter)) < best_loss:  # where the last step landed
            best = parameter.detach().double().clone()
    return best


def relative_error(a: torch.Tensor, m: torch.Tensor, target: torch.Tensor, transform: torch.Tensor) -> float:
    """How far `a + m T` is from `target`, relative to it, each token weighted by its own norm (as fitted)."""
    weight = _token_weight(target)
    mapped = a + apply_map(m, transform)
    return float(((mapped - target) * weight.sqrt()).norm() / (target * weight.sqrt()).norm())


def _patch_module(model, position: int):
    """The LinearPatch module of the gap before kept layer `position` (`None` in a stock model)."""
    base = model.model
    owner = base.norm if position == len(base.layers) else base.layers[position]
    return getattr(owner, "linear_patch", None)


def attach_fold_maps(model, maps: dict[int, torch.Tensor]) -> list:
    r"""
    Apply a map per gap to `model` (a LinearPatch or a stock pruned causal LM, in memory or from
    [`layerwise_model`]): `maps[p]` multiplies the MLP output of kept layer `p - 1` (the token embeddings for `p = 0`)
    and the patch of that gap, if the model has one, is bypassed. The maps live in `model.fold_maps` (see
    [`FOLD_MAPS`]), as [`FoldMap`] modules that a PEFT adapter can target.

    Returns:
        `list`: the hook handles; [`detach_fold_maps`] removes them and the maps.
    """
    config = model.config
    where = family_of(config).residual
    base = model.model
    sites = {
        position: base.embed_tokens if position == 0 else base.layers[position - 1].get_submodule(where.mlp_output)
        for position in maps
    }
    holder = nn.ModuleDict()
    for position, transform in maps.items():
        # Beside the block it follows (a model spread over devices), or on the compute device of a layer-by-layer
        # model, whose weights come and go.
        device = next(sites[position].parameters()).device
        if device.type == "meta":
            device = model.layerwise.device
        holder[str(position)] = FoldMap(transform).to(device)
    setattr(model, FOLD_MAPS, holder)
    handles = []
    for position, site in sites.items():

        def apply(module, args, output, key=str(position)):
            return getattr(model, FOLD_MAPS)[key](output)

        handles.append(site.register_forward_hook(apply))
        patch = _patch_module(model, position)
        if patch is not None:
            handles.append(patch.register_forward_hook(lambda module, args, output: args[0]))
    return handles


def detach_fold_maps(model, handles: list) -> None:
    """Undo [`attach_fold_maps`]."""
    for handle in handles:
        handle.remove()
    if hasattr(model, FOLD_MAPS):
        delattr(model, FOLD_MAPS)


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


__all__ = [
    "FOLD_MAPS",
    "FoldMap",
    "apply_map",
    "attach_fold_maps",
    "attached_maps",
    "detach_fold_maps",
    "diagonal_maps",
    "fit_map",
    "map_site",
    "map_transforms",
    "relative_error",
]
