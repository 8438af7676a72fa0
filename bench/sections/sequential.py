"""Peak RSS and time of `linearpatch prune smollm2-135m --layers 20-24` in memory and `--sequential` (same tokens),
above the import baseline (`import torch, transformers, linearpatch.cli`), each in a fresh process, and whether the
two write the same tensors."""

from linearpatch.common.reporting import markdown_table

from ..harness import Claim, cli_peak_rss

TITLE = "Sequential (out-of-core) prune (SmolLM2, about 4 minutes on 2 CPU cores)"
DEFAULT = False
MEMORY_RATIO = 0.5  # sequential over in-memory peak RSS above the baseline, at most
PATCH_TOLERANCE = 1e-5  # patches are sums in another order; every other tensor is copied bit for bit


def _largest_difference(first, second) -> float:
    """Max |difference| over the tensors of two checkpoint folders (inf when their tensor names or shapes differ)."""
    from safetensors import safe_open

    def tensors(folder):
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, "pt") as stream:
                found.update({name: stream.get_tensor(name) for name in stream.keys()})  # noqa: SIM118
        return found

    ours, theirs = tensors(first), tensors(second)
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        return float("inf")
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def run(device: str, quick: bool) -> dict:
    import tempfile
    from pathlib import Path

    sizes = ["--num-samples", "4", "--seq-len", "128"] if quick else []
    runs = {"baseline": ["baseline"]}
    variants = {
        "in_memory": ["--patch", "hadamard"],
        "sequential": ["--patch", "hadamard", "--sequential"],
        # Plain pruning needs no calibration: what remains is load-prune-save against streaming the shards.
        "load_prune_save": ["--patch", "none"],
        "streaming_prune": ["--patch", "none", "--sequential"],
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, flags in variants.items():
            runs[name] = ["prune", "smollm2-135m", "--layers", "20-24", *sizes, *flags, "--device", device]
            runs[name] += ["--output", str(Path(folder) / name)]
        measured = {name: cli_peak_rss(*arguments) for name, arguments in runs.items()}
        same_tensors = {
            "sequential": _largest_difference(Path(folder) / "sequential", Path(folder) / "in_memory"),
            "streaming_prune": _largest_difference(Path(folder) / "streaming_prune", Path(folder) / "load_prune_save"),
        }
    baseline = measured["baseline"][0]
    above = {name: measured[name][0] - baseline for name in variants}
    return dict(
        command="linearpatch prune smollm2-135m --layers 20-24" + (" " + " ".join(sizes) if sizes else ""),
        baseline_rss_mib=baseline,
        peak_rss_mib={name: measured[name][0] for name in above},
        above_baseline_mib=above,
        seconds={name: measured[name][1] for name in above},
        rss_ratio_sequential_over_in_memory=above["sequential"] / above["in_memory"],
        time_ratio_sequential_over_in_memory=measured["sequential"][1] / measured["in_memory"][1],
        rss_ratio_streaming_over_load_prune_save=above["streaming_prune"] / above["load_prune_save"],
        largest_tensor_difference=same_tensors,
    )


def markdown(q: dict) -> list[str]:
    lines = [
        f"**Sequential prune** (`{q['command']}`, each run in a fresh process; RSS above the import baseline "
        f"of {q['baseline_rss_mib']:.0f} MiB)",
        "",
        *markdown_table(
            ["run", "peak RSS MiB", "above baseline MiB", "seconds"],
            [
                [name, f"{rss:.0f}", f"{q['above_baseline_mib'][name]:.0f}", f"{q['seconds'][name]:.1f}"]
                for name, rss in q["peak_rss_mib"].items()
            ],
        ).splitlines(),
    ]
    lines += [
        "",
        f"- RSS ratio sequential / in memory: {q['rss_ratio_sequential_over_in_memory']:.3f}; time ratio: "
        f"{q['time_ratio_sequential_over_in_memory']:.2f}",
        "- RSS ratio streaming prune / load-prune-save (`--patch none`): "
        f"{q['rss_ratio_streaming_over_load_prune_save']:.3f}",
        "- largest tensor difference from the in-memory output: "
        + ", ".join(f"{name} {value:.1e}" for name, value in q["largest_tensor_difference"].items()),
        "",
    ]
    return lines


def checks(q: dict) -> list[Claim]:
    ratios = {
        "sequential / in memory": q["rss_ratio_sequential_over_in_memory"],
        "streaming / load-prune-save": q["rss_ratio_streaming_over_load_prune_save"],
    }
    differences = q["largest_tensor_difference"]
    return [
        Claim(
            f"a sequential prune needs at most {MEMORY_RATIO}x the memory of an in-memory one",
            all(value <= MEMORY_RATIO for value in ratios.values()),
            ", ".join(f"{name} {value:.3f}" for name, value in ratios.items()),
        ),
        Claim(
            f"a sequential prune writes the in-memory tensors (to {PATCH_TOLERANCE:g})",
            all(value <= PATCH_TOLERANCE for value in differences.values()),
            ", ".join(f"{name} {value:.1e}" for name, value in differences.items()),
        ),
    ]
