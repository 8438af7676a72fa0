"""Figures (matplotlib PNG): the cosine heatmap used for selection, per-layer activation magnitudes of dense /
plain-pruned / patched models (paper Figure 4), and per-channel magnitude mismatch at each cut (paper Figure 1).

Every plotting function returns the data it drew and the figure's labels (`figure`: title, axis labels, legend
entries), so tests check the numbers and the labelling rather than pixels.
"""

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from linearpatch.common.files import staging_path, write_text_atomically
from linearpatch.common.names import PLOTS_RECORD
from linearpatch.modeling import contiguous_gaps

from .calibration import CalibrationStatistics, calibrate


def _save_figure(figure, path: Path) -> dict:
    """Save atomically; return the labels a reader relies on (per axis: title, x/y labels, legend entries)."""
    staging = staging_path(path)
    figure.savefig(staging, dpi=110, bbox_inches="tight", format="png")
    staging.replace(path)
    axes = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    return {
        "axes": [
            {
                "title": axis.get_title(),
                "xlabel": axis.get_xlabel(),
                "ylabel": axis.get_ylabel(),
                "legend": [text.get_text() for text in axis.get_legend().get_texts()] if axis.get_legend() else [],
            }
            for axis in axes
        ]
    }


def cosine_matrix(statistics: CalibrationStatistics) -> torch.Tensor:
    """`M[i, j]` = mean token cosine between X_i and X_j (i, j = 0..L), from a pass with every distance 1..L."""
    size = statistics.num_layers + 1
    matrix = torch.eye(size, dtype=torch.float64)
    for column, distance in enumerate(statistics.distances):
        for start in range(size - distance):
            matrix[start, start + distance] = matrix[start + distance, start] = statistics.cosine[start, column]
    return matrix


def plot_cosine_heatmap(statistics: CalibrationStatistics, path: Path, pruned_layers: list[int] = ()) -> dict:
    """Heatmap of [`cosine_matrix`]; the chosen gaps are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = cosine_matrix(statistics)
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix.numpy(), cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
    for number, (start, end) in enumerate(contiguous_gaps(list(pruned_layers))):
        # Cell (s, e): the similarity of the stream before and after the removed block [s, e).
        axis.add_patch(
            plt.Rectangle(
                (end - 0.5, start - 0.5),
                1,
                1,
                fill=False,
                edgecolor="red",
                linewidth=2,
                label=None if number else "removed block: cos(X_s, X_e)",
            )
        )
    axis.set_xlabel("layer input j (L = final norm)")
    axis.set_ylabel("layer input i")
    axis.set_title("cos(X_i, X_j), mean over calibration tokens")
    if pruned_layers:
        axis.legend(loc="lower left", fontsize="small")
    colorbar = figure.colorbar(image)
    colorbar.ax.set_label("<colorbar>")
    colorbar.set_label("mean cosine")
    labels = _save_figure(figure, path)
    plt.close(figure)
    return {"cosine": matrix.tolist(), "pruned_layers": list(pruned_layers), "figure": labels}


@torch.no_grad()
def layer_magnitudes(model, input_ids: torch.Tensor) -> list[float]:
    """Mean |h| of the residual stream as each decoder layer (then the final norm) actually receives it, i.e. after
    any patch in front of it. Length: number of layers the model runs + 1."""
    base = model.model
    values: list[float] = []

    def record(module, args):
        values.append(float(args[0].float().abs().mean()))

    # input_layernorm sees the (patched) residual stream; the final norm's own patch runs inside it, so hook the
    # patch's output there instead.
    targets = [layer.input_layernorm for layer in base.layers]
    final_patch = getattr(base.norm, "linear_patch", None)
    handles = [module.register_forward_pre_hook(record) for module in targets]
    if final_patch is not None:
        handles.append(final_patch.register_forward_hook(lambda m, a, out: values.append(float(out.abs().mean()))))
    else:
        handles.append(base.norm.register_forward_pre_hook(record))
    try:
        for window in input_ids:
            model.model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    per_window = len(targets) + 1
    return [sum(values[i::per_window]) / len(input_ids) for i in range(per_window)]


def kept_positions(model) -> list[int]:
    """Dense indices of the layer inputs a (possibly pruned) model computes, plus L for the final norm input."""
    pruned = set(getattr(model.config, "pruned_layers", None) or [])
    total = getattr(model.config, "original_num_hidden_layers", None) or model.config.num_hidden_layers
    return [index for index in range(total) if index not in pruned] + [total]


def plot_layer_magnitudes(models: dict, input_ids: torch.Tensor, path: Path, progress: bool = False) -> dict:
    """Per-layer mean |h| of each model in `models` (name -> model) against dense layer indices (Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, model in tqdm(models.items(), desc="layer magnitudes", unit="model", disable=not progress):
        data[name] = {"layers": kept_positions(model), "magnitude": layer_magnitudes(model, input_ids)}
        axis.plot(data[name]["layers"], data[name]["magnitude"], marker="o", markersize=3, label=name)
    pruned = {index for model in models.values() for index in getattr(model.config, "pruned_layers", None) or []}
    for number, (start, end) in enumerate(contiguous_gaps(sorted(pruned))):  # removed layers in grey (the paper's)
        axis.axvspan(start - 0.5, end - 0.5, color="grey", alpha=0.2, label=None if number else "removed layers")
    axis.set_yscale("log")
    axis.set_title("Residual-stream magnitude entering each layer (paper Figure 4)")
    axis.set_xlabel("dense layer index (input of layer; last = final norm)")
    axis.set_ylabel("mean |h| (log scale)")
    axis.legend()
    data["figure"] = _save_figure(figure, path)
    plt.close(figure)
    return data


@torch.no_grad()
def cut_mismatch(
    dense, patched, input_ids: torch.Tensor, statistics: CalibrationStatistics | None = None
) -> list[dict]:
    """Per-channel mean |.| at each cut [s, e): the dense target X_e, the pruned stream before the patch (X_s) and
    after it (X_s P). Channels are those of the residual stream (Figure 1)."""
    if statistics is None:  # the dense per-channel magnitudes of these windows; reuse a pass over them if given
        statistics = calibrate(dense, input_ids, distances=(1,), progress=False)
    target = statistics.channel_abs_mean.mean(dim=0)  # [L + 1, C]
    gaps = contiguous_gaps(list(patched.config.pruned_layers))
    modules = [
        patched.model.norm.linear_patch
        if p == patched.config.num_hidden_layers
        else patched.model.layers[p].linear_patch
        for p in patched.config.patch_positions
    ]
    sums = [[torch.zeros(dense.config.hidden_size), torch.zeros(dense.config.hidden_size)] for _ in modules]

    def hook_for(index):
        def hook(module, args, output):
            sums[index][0] += args[0].float().abs().mean(dim=(0, 1))
            sums[index][1] += output.float().abs().mean(dim=(0, 1))

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        for window in input_ids:
            patched.model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [
        {
            "gap": [start, end],
            "target": target[end].tolist(),
            "before": (before / len(input_ids)).tolist(),
            "after": (after / len(input_ids)).tolist(),
        }
        for (start, end), (before, after) in zip(gaps, sums, strict=True)
    ]


def plot_cut_mismatch(
    dense, patched, input_ids: torch.Tensor, path: Path, statistics: CalibrationStatistics | None = None
) -> list[dict]:
    """Plot [`cut_mismatch`]: one panel per cut, channels sorted by the dense target magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = cut_mismatch(dense, patched, input_ids, statistics)
    figure, axes = plt.subplots(len(data), 1, figsize=(7, 3 * len(data)), squeeze=False)
    # The dense target is drawn last, thick and dashed, so the patched curve that follows it cannot hide it.
    styles = (
        ("before", "pruned, no patch (X_s)", dict(color="tab:orange", linewidth=1, alpha=0.8)),
        ("after", "patched (X_s P)", dict(color="tab:green", linewidth=1, alpha=0.9)),
        ("target", "dense (X_e, the target)", dict(color="black", linewidth=1.6, linestyle="--", zorder=3)),
    )
    for axis, cut in zip(axes[:, 0], data, strict=True):
        order = torch.tensor(cut["target"]).argsort()
        for key, label, style in styles:
            axis.plot(torch.tensor(cut[key])[order].numpy(), label=label, **style)
        axis.set_yscale("log")
        axis.set_title(f"channel magnitudes at the cut of layers [{cut['gap'][0]}, {cut['gap'][1]})")
        axis.set_xlabel("channel (sorted by target magnitude)")
        axis.set_ylabel("mean |h| per channel (log scale)")
        axis.legend()
    labels = _save_figure(figure, path)
    plt.close(figure)
    for cut in data:
        cut["figure"] = labels
    return data


def plot_depth_curve(curve: list[dict], target: float | None, path: Path) -> dict:
    """Depth against held-out perplexity ratio (pruned / dense) from a `--target-ppl-ratio` search: plain pruning
    and the fixed patch at the cosine block, and the block and patch chosen by outcome; the target and the chosen
    depth are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [point["num_layers"] for point in curve]
    fixed = curve[0].get("fixed_patch", "hadamard") if curve else "hadamard"
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label, style in (
        ("plain_ratio", "plain pruning (cosine block)", dict(color="tab:orange", marker="o")),
        ("fixed_ratio", f"{fixed} patch (cosine block)", dict(color="tab:blue", marker="s")),
        ("ratio", "chosen block and patch (held-out loss)", dict(color="tab:green", marker="^")),
    ):
        axis.plot(depths, [point[key] for point in curve], label=label, **style)
    if target is not None:
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}x")
        within = [point["num_layers"] for point in curve if point["ratio"] <= target]
        if within:
            axis.axvline(max(within), color="tab:green", linestyle=":", linewidth=1, label=f"chosen: {max(within)}")
    axis.set_yscale("log")
    axis.set_title("held-out perplexity ratio against layers removed")
    axis.set_xlabel("layers removed")
    axis.set_ylabel("pruned / dense perplexity (log scale)")
    axis.legend()
    labels = _save_figure(figure, path)
    plt.close(figure)
    return dict(curve=curve, target=target, figure=labels)


def plot_closeness_by_cut(closeness: dict, path: Path, pruned_layers: list[int] = ()) -> dict:
    """Plot a `closeness_by_cut` result (`pruning/cuts.py`): per block start, the held-out KL to the dense model of
    the plain cut and the patched one (log scale), and below it the cosine proxy; the checkpoint's own cut is marked
    where it is one block of that depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts, depth = closeness["cuts"], closeness["num_layers"]
    starts = [cut["start"] for cut in cuts]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    top.plot(starts, [cut["plain_kl"] for cut in cuts], marker="o", color="tab:orange", label="plain cut")
    top.plot(
        starts, [cut["patched_kl"] for cut in cuts], marker="s", color="tab:blue", label=f"{closeness['patch']} patch"
    )
    bottom.plot(starts, [cut["cosine"] for cut in cuts], marker=".", color="tab:gray", label="cos(X_s, X_s+n)")
    gaps = contiguous_gaps(list(pruned_layers))
    if len(gaps) == 1 and gaps[0][1] - gaps[0][0] == depth:
        for axis in (top, bottom):
            axis.axvline(gaps[0][0], color="tab:green", linestyle=":", label="this checkpoint's cut")
    top.set_yscale("log")
    fit, held = closeness["windows"]
    top.set_title(f"closeness to the dense model of every {depth}-layer cut ({held} held-out of {fit + held} windows)")
    top.set_ylabel("KL to dense, nats/token (log)")
    bottom.set_xlabel("first removed layer s (block [s, s + n))")
    bottom.set_ylabel("cosine proxy")
    top.legend()
    bottom.legend()
    labels = _save_figure(figure, path)
    plt.close(figure)
    return dict(closeness, figure=labels)


PLOT_FILES = ("cosine_heatmap.png", "layer_magnitudes.png", "cut_mismatch.png", PLOTS_RECORD)
DEPTH_CURVE_FILE = "depth_curve.png"
CLOSENESS_FILE = "closeness_by_cut.png"


def write_report_plots(
    dense,
    patched,
    input_ids: torch.Tensor,
    directory: str | Path,
    progress: bool = False,
    prune_report: dict | None = None,
    closeness: dict | None = None,
) -> dict:
    """All three figures (and their data, `linearpatch_plots.json`) for a patched model, written into `directory`;
    the depth curve ([`plot_depth_curve`]) when `prune_report` (`linearpatch_report.json`) holds one; and closeness
    by cut ([`plot_closeness_by_cut`]) when given `closeness` (from `pruning.cuts.closeness_by_cut`).

    Cost: one dense pass with every layer distance, then one forward per window of the plain-pruned and patched
    models (and one more of the patched for the cut mismatch); `progress` shows each step.
    """
    from linearpatch.modeling import prune_layers

    directory = Path(directory)
    statistics = calibrate(dense, input_ids, distances=range(1, dense.config.num_hidden_layers + 1), progress=progress)
    plain = prune_layers(dense, patched.config.pruned_layers, add_patches=False)
    data = {
        "cosine_heatmap": plot_cosine_heatmap(
            statistics, directory / "cosine_heatmap.png", patched.config.pruned_layers
        ),
        "layer_magnitudes": plot_layer_magnitudes(
            {"dense": dense, "plain pruned": plain, "patched": patched},
            input_ids,
            directory / "layer_magnitudes.png",
            progress=progress,
        ),
        "cut_mismatch": plot_cut_mismatch(dense, patched, input_ids, directory / "cut_mismatch.png", statistics)
        if patched.config.patch_positions
        else [],
    }
    if prune_report and prune_report.get("depth_curve"):
        target = (prune_report.get("holdout") or {}).get("target_ppl_ratio")
        data["depth_curve"] = plot_depth_curve(prune_report["depth_curve"], target, directory / DEPTH_CURVE_FILE)
    if closeness is not None:
        data["closeness_by_cut"] = plot_closeness_by_cut(
            closeness, directory / CLOSENESS_FILE, patched.config.pruned_layers
        )
    write_text_atomically(directory / PLOTS_RECORD, json.dumps(data))
    return data


__all__ = [
    "CLOSENESS_FILE",
    "DEPTH_CURVE_FILE",
    "PLOT_FILES",
    "cosine_matrix",
    "cut_mismatch",
    "kept_positions",
    "layer_magnitudes",
    "plot_closeness_by_cut",
    "plot_cosine_heatmap",
    "plot_cut_mismatch",
    "plot_depth_curve",
    "plot_layer_magnitudes",
    "write_report_plots",
]
