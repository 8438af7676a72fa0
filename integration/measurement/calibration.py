"""One streaming calibration pass over the dense model, keeping only the statistics LinearPatch needs.

Notation: X_l is the residual-stream input of decoder layer l (before its input norm) for l < L, and X_L
is the input of the final norm. Per window the pass keeps, for every layer l:

- the per-channel mean |X_l| and mean |X_l H| (Hadamard-rotated) -> `[windows, L + 1, C]`;
- the model's massive-activation channels (mean |x| over 100x the median channel's, as Gemma 3 carries on every
  token) up to each layer, and mean |X_l H| with them left out -> the Hadamard patch scales them on their own;
- sums of the per-token hidden-axis cosine (and angular distance) between X_l and X_{l+k} for the requested
  distances k -> `[L + 1, len(distances)]`;
- for requested blocks (s, e), the Gram matrices X_s^T X_s and X_s^T X_e (C x C, for the least-squares baseline).

Only the last `max(distance) + 1` layer inputs of the current batch are held at any time, so memory does not grow
with the number of windows beyond O(L x C x windows) of statistics.
"""

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data import TokenWindows
from .capture import StopForward, raise_stop, run_until
from .hadamard import hadamard_supported, hadamard_transform

# A channel whose mean |x| exceeds this many times the median channel's carries a massive activation (Sun et al.,
# 2024: fixed channels, 10^2-10^4x the rest). Gemma-3-270M has five, from layer 1 on (up to 1063x); SmolLM2-135M's
# largest channel is 58x. See `massive_channels` in [`CalibrationStatistics`].
MASSIVE_RATIO = 100.0


@dataclass
class CalibrationStatistics:
    r"""
    Statistics of one calibration pass.

    Args:
        num_layers (`int`): L, the dense model's decoder layers.
        distances (`list[int]`): the layer distances k for which cosines were accumulated.
        cosine (`torch.Tensor` of shape `(L + 1, len(distances))`): mean over tokens of cos(X_l[t], X_{l+k}[t]);
            NaN where l + k > L.
        angular (`torch.Tensor`, same shape): mean over tokens of arccos(cos) / pi.
        channel_abs_mean (`torch.Tensor` of shape `(windows, L + 1, C)`): per-window mean over tokens of |X_l|.
        rotated_abs_mean (`torch.Tensor`, same shape): per-window mean over tokens of |X_l H| (NaN for a width
            without a Hadamard matrix: the other patch kinds do not need it).
        gram (`dict`): `(s, e) -> (X_s^T X_s, X_s^T X_e)` in float64, summed over calibration tokens.
        massive_channels (`torch.BoolTensor` of shape `(L + 1, C)`): channels with a massive activation in X_l or
            any earlier X_j (mean |x| over the first calibration window above `MASSIVE_RATIO` times the median
            channel's). The first window alone decides, so that the choice does not depend on batching.
        rotated_rest_abs_mean (`torch.Tensor` of shape `(windows, L + 1, C)`): per-window mean over tokens of
            |(X_l with its massive channels zeroed) H|; equal to `rotated_abs_mean` where there are none.
        num_tokens (`int`): calibration tokens seen.
        data (`dict`): description of the calibration windows (source, sizes, seed, hash).
        seconds (`float`): wall time of the pass.
    """

    num_layers: int
    distances: list[int]
    cosine: torch.Tensor
    angular: torch.Tensor
    channel_abs_mean: torch.Tensor
    rotated_abs_mean: torch.Tensor
    gram: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    num_tokens: int = 0
    data: dict = field(default_factory=dict)
    seconds: float = 0.0
    massive_channels: torch.Tensor | None = None
    rotated_rest_abs_mean: torch.Tensor | None = None

    def block_cosine(self, distance: int) -> torch.Tensor:
        """Mean cosine between X_s and X_{s+distance} for every start s = 0..L-distance."""
        return self.cosine[: self.num_layers - distance + 1, self.distances.index(distance)]

    def block_angular(self, distance: int) -> torch.Tensor:
        """Mean angular distance between X_s and X_{s+distance} for every start s = 0..L-distance."""
        return self.angular[: self.num_layers - distance + 1, self.distances.index(distance)]

    def block_influence(self) -> torch.Tensor:
        """ShortGPT Block Influence of each layer: BI_l = 1 - mean_t cos(X_l[t], X_{l+1}[t]), l = 0..L-1."""
        return 1.0 - self.cosine[: self.num_layers, self.distances.index(1)]


@torch.no_grad()
def calibrate(
    model,
    windows: TokenWindows | torch.Tensor,
    distances: list[int] | tuple[int, ...] = (1,),
    regression_blocks: list[tuple[int, int]] | tuple = (),
    batch_size: int = 1,
    progress: bool = True,
    last_layer: int | None = None,
    statistics_chunk: int = 2,
) -> CalibrationStatistics:
    """Run the dense Llama `model` once over `windows` and return [`CalibrationStatistics`].

    The model's own forward is used (its attention mask, RoPE and attention kernel), with pre-hooks on each decoder
    layer and the final norm that update the statistics as each X_l passes and then drop it once no later distance
    needs it. The LM head is never run.

    Args:
        model: a dense `LlamaForCausalLM` (or its `.model`).
        windows (`TokenWindows` or `torch.LongTensor` of shape `(num_windows, seq_len)`): calibration tokens.
        distances (`tuple[int]`, *optional*, defaults to `(1,)`): layer distances k for cosine statistics; 1 is
            always included (Block Influence needs it).
        regression_blocks (`list[tuple[int, int]]`, *optional*): blocks (s, e) for which to sum Gram matrices.
        batch_size (`int`, *optional*, defaults to 1): windows per forward.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar with ETA.
        last_layer (`int`, *optional*): stop the forward once X_{last_layer} is recorded (statistics of later
            layers stay zero); defaults to L, the final norm's input.
        statistics_chunk (`int`, *optional*, defaults to 2): windows per statistics update (bounds the float32
            copies when a batch holds many windows, as in a layer-by-layer pass).

    A model from [`layerwise_model`] (weights loaded one layer at a time) is calibrated with `batch_size` equal to
    the number of windows: each layer then runs once over every window, and the statistics are those of the
    in-memory model.
    """
    base = getattr(model, "model", model)
    layers = base.layers
    num_layers = len(layers)
    input_ids = windows.input_ids if isinstance(windows, TokenWindows) else windows
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(
            f"Calibration needs a non-empty (windows, seq_len) tensor; got shape {tuple(input_ids.shape)}."
        )
    distances = sorted({1, *distances})
    if distances[-1] > num_layers:
        raise ValueError(f"Distance {distances[-1]} exceeds the model's {num_layers} layers.")
    regression_blocks = [tuple(block) for block in regression_blocks]
    keep = max(distances + [end - start for start, end in regression_blocks])
    if last_layer is None:
        last_layer = num_layers
    if not 0 <= last_layer <= num_layers:
        raise ValueError(f"last_layer={last_layer} is outside 0..{num_layers}.")
    hidden_size = base.config.hidden_size
    layerwise = getattr(model, "layerwise", None)
    device = layerwise.device if layerwise is not None else next(base.parameters()).device

    num_windows = input_ids.shape[0]
    cosine_sum = torch.zeros(num_layers + 1, len(distances), dtype=torch.float64)
    angular_sum = torch.zeros_like(cosine_sum)
    token_count = 0
    channel_abs = torch.zeros(num_windows, num_layers + 1, hidden_size, dtype=torch.float32)
    rotate = hadamard_supported(hidden_size)
    rotated_abs = torch.zeros_like(channel_abs) if rotate else torch.full_like(channel_abs, float("nan"))
    rotated_rest_abs = rotated_abs.clone()
    massive = torch.zeros(num_layers + 1, hidden_size, dtype=torch.bool)
    gram = {
        block: (
            torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device),
            torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device),
        )
        for block in regression_blocks
    }

    def record_part(index: int, hidden: torch.Tensor, windows: slice, earlier_of) -> None:
        """Update the statistics with X_index of the windows `windows`; `earlier_of(j)` gives X_j of the same
        windows (or None)."""
        hidden = hidden.to(device).float()
        magnitudes = hidden.abs().mean(dim=1).cpu()
        channel_abs[windows, index] = magnitudes
        if windows.start == 0:  # the first window decides (every pass and batching sees it first at each layer)
            massive[index] = magnitudes[0] > MASSIVE_RATIO * magnitudes[0].median()
            if index > 0:
                massive[index] |= massive[index - 1]
        if rotate:
            rotated = hadamard_transform(hidden).abs().mean(dim=1).cpu()
            rotated_abs[windows, index] = rotated
            if massive[index].any():
                rest = hidden.masked_fill(massive[index].to(hidden.device), 0.0)
                rotated = hadamard_transform(rest).abs().mean(dim=1).cpu()
            rotated_rest_abs[windows, index] = rotated
        for column, distance in enumerate(distances):
            earlier = earlier_of(index - distance)
            if earlier is None:
                continue
            earlier = earlier.to(device).float()
            cos = torch.nn.functional.cosine_similarity(earlier, hidden, dim=-1).double()
            cosine_sum[index - distance, column] += cos.sum().cpu()
            angular_sum[index - distance, column] += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum().cpu()
        for (start, end), (xtx, xty) in gram.items():
            if end == index:
                source = earlier_of(start).to(device).reshape(-1, hidden_size).double()
                xtx += source.T @ source
                xty += source.T @ hidden.reshape(-1, hidden_size).double()

    def chunks(count: int):
        # Statistics in chunks of windows: a layer-by-layer pass hands over every window at once, and float copies
        # of all of them would cost more than the layer itself.
        for first in range(0, count, statistics_chunk):
            yield slice(first, min(first + statistics_chunk, count))

    # In memory: a pre-hook sees X_l of a batch of windows; the last `keep` of them are held for the distances.
    recent: OrderedDict[int, torch.Tensor] = OrderedDict()
    batch_slice = slice(0, 0)

    def record(index: int, hidden: torch.Tensor) -> None:
        for part in chunks(hidden.shape[0]):
            windows = slice(batch_slice.start + part.start, batch_slice.start + part.stop)
            record_part(index, hidden[part], windows, lambda j, part=part: recent[j][part] if j in recent else None)
        recent[index] = hidden
        # Later layers need X_{index + 1 - keep} .. X_index, no older one.
        while len(recent) > keep:
            recent.popitem(last=False)
        if index == last_layer:
            raise StopForward

    def hook_for(index: int):
        def hook(module, args, kwargs):
            record(index, args[0] if args else kwargs["hidden_states"])

        return hook

    # Layer by layer: each layer overwrites its input with its output, window chunk by chunk, and reports both
    # chunks first, so X_l and X_{l+1} are compared without a second copy of every window's hidden states. Only the
    # X_j that a distance of 2 or more (or a regression block) needs later are copied aside.
    history: dict[int, torch.Tensor] = {}

    def needed_later(j: int, current: int) -> bool:
        """Is X_j compared with some X_i, i > current, other than through the layer input (i = j + 1)?"""
        spans = [j + d for d in distances if d >= 2] + [e for s, e in regression_blocks if s == j and e - s >= 2]
        return any(current < i <= last_layer for i in spans)

    def keep_copy(j: int, part: slice, hidden: torch.Tensor) -> None:
        if needed_later(j, j + 1):
            if j not in history:
                history[j] = layerwise.new_store((num_windows, *hidden.shape[1:]), hidden.dtype)
            history[j][part] = hidden.to(history[j].device)

    def record_embeddings(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        for part in chunks(hidden.shape[0]):
            record_part(0, hidden[part], part, lambda j: None)
            keep_copy(0, part, hidden[part])
        if last_layer == 0:
            raise StopForward

    def observe(index: int, part: slice, before: torch.Tensor, after: torch.Tensor) -> None:
        for sub in chunks(part.stop - part.start):
            windows = slice(part.start + sub.start, part.start + sub.stop)

            def earlier_of(j: int, sub=sub, windows=windows):
                if j == index:
                    return before[sub]
                return history[j][windows] if j in history else None

            record_part(index + 1, after[sub], windows, earlier_of)
            keep_copy(index + 1, windows, after[sub])
        if part.stop == num_windows:
            for j in [j for j in history if not needed_later(j, index + 1)]:
                del history[j]

    if layerwise is None:
        handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles.append(base.norm.register_forward_pre_hook(hook_for(num_layers), with_kwargs=True))
    else:
        if batch_size < num_windows:
            raise ValueError("A layer-by-layer model is calibrated with every window in one batch (batch_size).")
        handles = [layers[0].register_forward_pre_hook(record_embeddings, with_kwargs=True)]
        if last_layer > 0:
            owner = base.norm if last_layer == num_layers else layers[last_layer]
            handles.append(owner.register_forward_pre_hook(raise_stop, with_kwargs=True))
        layerwise.observer, layerwise.in_place = observe, True
    started = time.perf_counter()
    try:
        bar = tqdm(total=num_windows, desc="calibration", unit="window", disable=not progress)
        for first in range(0, num_windows, batch_size):
            batch = input_ids[first : first + batch_size].to(device)
            batch_slice = slice(first, first + batch.shape[0])
            recent.clear()
            run_until(base, None, input_ids=batch, use_cache=False)  # the hooks end it after the last needed layer
            token_count += batch.numel()
            bar.update(batch.shape[0])
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
        recent.clear()
        history.clear()
        if layerwise is not None:
            layerwise.observer, layerwise.in_place = None, False
            layerwise.close_bar()

    counts = torch.full_like(cosine_sum, float(token_count))
    for column, distance in enumerate(distances):
        counts[num_layers - distance + 1 :, column] = float("nan")
    return CalibrationStatistics(
        num_layers=num_layers,
        distances=distances,
        cosine=cosine_sum / counts,
        angular=angular_sum / counts,
        channel_abs_mean=channel_abs,
        rotated_abs_mean=rotated_abs,
        gram={block: (xtx.cpu(), xty.cpu()) for block, (xtx, xty) in gram.items()},
        num_tokens=token_count,
        data=windows.describe() if isinstance(windows, TokenWindows) else {"num_windows": num_windows},
        seconds=time.perf_counter() - started,
        massive_channels=massive,
        rotated_rest_abs_mean=rotated_rest_abs,
    )


__all__ = ["MASSIVE_RATIO", "CalibrationStatistics", "calibrate"]
